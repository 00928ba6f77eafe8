"""The ddp engine (``ShardedQGaLoreOptimizer``) on real gloo processes, world sizes 2 and 3 (uneven ownership).

One launcher (``tests/ddp_worker.py``) forks every rank of both worlds once for the whole module (torchrun-style
variables); beside it, ``mpirun -np 2`` runs a small smoke through the mpi4py discovery path. Each rank runs every
scenario and writes JSON (+ ``.pt`` model / optimizer states). Meanwhile this process trains the single-device
``QGaLoreOptimizer`` on the concatenated batches with the same builders, and the tests compare:

* parity (fp64 model, fp32 moments, eager update): per-step global mean loss and global clipping norm, final
  weights — INT8 codes and scales exactly — for ``full`` and ``lowrank`` modes, ProjFactor on seeded gaussian
  projections, float mode;
* owner-only SVD: SVDs summed over ranks == the single-device count, each rank's SVDs only for matrices it owns;
  low-rank moments summed over ranks == the single-device moments' bytes; owners' merged state == the reference's;
* replicas bit-identical after 20 steps (and under a bf16 wire), a corrupted replica repaired with a warning, and
  ``strict_replicas`` raising on every rank; gradient accumulation (lowrank: 2 × b == 1 × 2b); a mismatched config
  stopped at start-up on every rank; lowrank moving fewer bytes than full; resume from a shard.

World size 1 (no process group) is checked in-process: it must reproduce ``QGaLoreOptimizer`` bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker as W
import pytest
import torch

from qgalore_dist import QGaLoreOptimizer
from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer, merge_state_dicts
from qgalore_dist.parallel.launch_env import discover_launch

PARITY = ("full", "lowrank", *W.VARIANTS)
STEPS = {"full": W.STEPS_FULL, "lowrank": W.STEPS_LOWRANK, **{v: W.STEPS_VARIANT for v in W.VARIANTS}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(world: int) -> dict:
    """Single-device runs on the concatenated batches: losses, SVD count, final model and optimizer state."""
    out = {}
    for label in PARITY:
        kw = W.VARIANTS.get(label, {})
        cfg = W.qcfg(**kw)
        model = W.make_model(cfg.quantize)
        opt = QGaLoreOptimizer(model, cfg, grad_clip=W.CLIP.get(label, 0.0))
        losses, norms = [], []
        for x in W.global_batches(world, STEPS[label], W.SEEDS[label]):
            loss = W.loss_fn(model, x)
            loss.backward()
            opt.step()
            norms.append(opt.last_step.grad_norm)
            opt.zero_grad()
            losses.append(loss.item())
        out[label] = {"losses": losses, "norms": norms, "svd_count": opt.svd_count, "model": model.state_dict(),
                      "optim": opt.state_dict(), "memory": opt.memory_bytes()}
    return out


def _open_mpi_available() -> bool:
    """Open MPI's mpirun (the flags below are its own) and mpi4py."""
    import importlib.util
    import shutil

    if shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None:
        return False
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Fork both worlds from one launcher and (when Open MPI and mpi4py are installed) start the 2-rank mpirun
    smoke beside them; compute the references while they train, then load every record."""
    out = tmp_path_factory.mktemp("ddp")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    worker = str(Path(W.__file__).resolve())
    cmds = [["nice", "-n", "5", sys.executable, worker, str(out), "fork", *[f"{w}:{_free_port()}" for w in W.WORLDS]]]
    if _open_mpi_available():
        cmds.append(["nice", "-n", "5", "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                     *[a for v in ("OMP_NUM_THREADS", "PYTHONPATH", "GLOO_SOCKET_IFNAME") if v in env
                       for a in ("-x", v)], sys.executable, worker, str(out), "mpi-smoke"])
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded: same kernels, same rounding
    try:
        refs = {world: _reference(world) for world in W.WORLDS}
    finally:
        torch.set_num_threads(threads)
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            logs.append((proc.communicate()[0] or "") + "\n[killed: launcher timed out]")
    ranks: dict[int, dict[int, dict]] = {}
    for world in W.WORLDS:
        ranks[world] = {}
        for rank in range(world):
            f = out / f"w{world}_r{rank}.json"
            ranks[world][rank] = json.loads(f.read_text()) if f.exists() else {"missing": logs[0][-3000:]}
    mpi = None
    if len(procs) > 1:
        mpi = [json.loads(f.read_text()) if f.exists() else {"missing": logs[1][-3000:]}
               for f in (out / f"mpi_r{r}.json" for r in range(2))]
    return {"dir": out, "ref": refs, "ranks": ranks, "mpi": mpi}


def _records(run, world: int, scenario: str) -> list[dict]:
    recs = []
    for rank, rec in run["ranks"][world].items():
        if "missing" in rec:
            pytest.fail(f"world {world} rank {rank} wrote no result:\n{rec['missing']}")
        res = rec["scenarios"].get(scenario)
        assert res is not None, f"world {world} rank {rank}: scenario {scenario} did not run"
        assert "error" not in res, f"world {world} rank {rank}: {scenario}:\n{res['error']}"
        recs.append(res)
    return recs


# ------------------------------------------------------------------------------------------------------------
# multi-process
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_every_rank_joined_through_torchrun_variables(run, world):
    for rank, rec in run["ranks"][world].items():
        assert "missing" not in rec, f"world {world} rank {rank} wrote no result:\n{rec.get('missing')}"
        assert rec["env"] == ["torchrun", rank, world, "gloo"]


@pytest.mark.dist
def test_mpirun_ranks_meet_on_loopback_and_train(run):
    if run["mpi"] is None:
        pytest.skip("Open MPI's mpirun or mpi4py is not installed")
    for rank, rec in enumerate(run["mpi"]):
        assert "missing" not in rec, f"mpirun rank {rank} wrote no result:\n{rec['missing']}"
        assert rec["env"] == ["mpi", rank, 2, "gloo", "127.0.0.1"] and rec["port_ok"]
        assert rec["repairs"] == [] and rec["checksums"] == run["mpi"][0]["checksums"]
    assert sum(r["svd_count"] for r in run["mpi"]) == 2 * 2  # 2 matrices, refreshed at steps 0 and 2


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_mismatched_config_is_stopped_at_start_up_on_every_rank(run, world):
    for res in _records(run, world, "setup_mismatch"):
        assert res["raised"], "a rank built the optimizer despite a different config on another rank"
        assert f"config differs on rank(s) [{world - 1}]" in res["message"]
        assert "ownership plan" not in res["message"]  # the plan is the same: only what differs is named


@pytest.mark.dist
@pytest.mark.parametrize("label", PARITY)
@pytest.mark.parametrize("world", W.WORLDS)
def test_parity_with_single_device_on_concatenated_batch(run, world, label):
    recs = _records(run, world, label)
    ref = run["ref"][world][label]
    mean_loss = [sum(r["losses"][i] for r in recs) / world for i in range(len(ref["losses"]))]
    assert mean_loss == pytest.approx(ref["losses"], rel=1e-12, abs=0)
    if W.CLIP.get(label):  # the global norm: same on every rank, equal to the single-device one, and clipping
        assert all(r["norms"] == recs[0]["norms"] for r in recs)
        assert recs[0]["norms"] == pytest.approx(ref["norms"], rel=1e-12)
        assert max(ref["norms"]) > W.CLIP[label]
    for rank in range(world):
        state = torch.load(run["dir"] / f"w{world}_r{rank}_{label}.pt")
        assert state.keys() == ref["model"].keys()
        for k, want in ref["model"].items():
            got = state[k]
            if k.endswith(("weight_codes", "weight_scales")):
                assert torch.equal(got, want), f"rank {rank}: {k} differs from the single-device run"
            else:
                assert torch.allclose(got, want, rtol=1e-10, atol=1e-13), \
                    f"rank {rank}: {k} max diff {(got - want).abs().max():.3e}"


@pytest.mark.dist
@pytest.mark.parametrize("label", ("full", "lowrank", "float"))
@pytest.mark.parametrize("world", W.WORLDS)
def test_svd_runs_once_per_refresh_on_the_owner_only(run, world, label):
    recs = _records(run, world, label)
    assert sum(r["svd_calls"] for r in recs) == run["ref"][world][label]["svd_count"]
    for rank, r in enumerate(recs):
        # every SVD this process ran was a refresh of a matrix it owns, and every owned matrix was refreshed
        assert r["svd_calls"] == r["svd_count"], f"rank {rank}: {r['svd_calls']} SVDs, {r['svd_count']} refreshes"
        assert r["refreshed"] == r["owned"], f"rank {rank} refreshed {r['refreshed']}, owns {r['owned']}"
    owned = [set(r["owned"]) for r in recs]
    assert all(a.isdisjoint(b) for i, a in enumerate(owned) for b in owned[i + 1:])
    assert len({len(o) for o in owned}) > 1 or world == 2  # 3 ranks: 14 matrices cannot split evenly


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_moments_live_at_owners_and_merge_into_the_single_device_state(run, world):
    recs = _records(run, world, "lowrank")
    ref = run["ref"][world]["lowrank"]
    assert sum(r["memory"]["lowrank_moments"] for r in recs) == ref["memory"]["lowrank_moments"]
    assert all(r["memory"]["projectors"] == ref["memory"]["projectors"] for r in recs)  # lowrank: replicated
    shards = [torch.load(run["dir"] / f"w{world}_r{rank}_lowrank_optim.pt") for rank in range(world)]
    merged = merge_state_dicts(shards)
    assert merged["projected"].keys() == ref["optim"]["projected"].keys()
    for name, want in ref["optim"]["projected"].items():
        got = merged["projected"][name]
        assert got["meta"] == want["meta"], name
        for k, t in want["tensors"].items():
            if t.is_floating_point() and k.startswith("exp_avg"):
                assert torch.allclose(got["tensors"][k], t, rtol=1e-6, atol=1e-12), f"{name} {k}"
            else:
                assert torch.equal(got["tensors"][k], t), f"{name} {k}"
    single = QGaLoreOptimizer(W.make_model(), W.qcfg())
    single.load_state_dict(merged)  # keyed by name: loads at world size 1
    with pytest.raises(ValueError, match="two shards"):
        merge_state_dicts([shards[0], shards[0]])


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_replicas_bit_identical_after_training(run, world):
    for scenario in ("lowrank", "bf16_wire"):
        recs = _records(run, world, scenario)
        assert all(r["repairs"] == [] and r["warnings"] == [] for r in recs), scenario
        assert all(r["checksums"] == recs[0]["checksums"] for r in recs), f"{scenario}: replicas differ"


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_corrupted_replica_is_repaired_with_a_warning(run, world):
    recs = _records(run, world, "corrupt")
    name = recs[0]["name"]
    key = name.replace(".weight", ".weight_codes")
    assert recs[-1]["damaged"][key] != recs[0]["damaged"][key]
    for r in recs:
        assert r["bad"] == {name: [world - 1]}
        assert r["again"] == {}
        assert any(name in w and "re-broadcast" in w for w in r["warnings"]), r["warnings"]
        assert r["repaired"] == recs[0]["repaired"] == recs[0]["damaged"]  # rank 0 owns it: its copy was kept


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_strict_replicas_raise_on_every_rank(run, world):
    for r in _records(run, world, "strict"):
        assert r["raised"] and r["name"] in r["message"] and "strict" in r["message"]


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_gradient_accumulation_lowrank(run, world):
    for rank, r in enumerate(_records(run, world, "accum")):
        a, b = r["accum1"], r["accum2"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-12)
        codes = [k for k in a["checksums"] if k.endswith(("weight_codes", "weight_scales"))]
        assert codes and all(a["checksums"][k] == b["checksums"][k] for k in codes), f"rank {rank}"
        for n in a["dense"]:
            assert torch.allclose(torch.tensor(a["dense"][n]), torch.tensor(b["dense"][n]), rtol=1e-10), n


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_lowrank_moves_fewer_bytes_than_full(run, world):
    full = _records(run, world, "full")
    low = _records(run, world, "lowrank")
    for f, lo in zip(full, low):
        assert min(f["comm_bytes"]) > 0 and f["startup_comm"] > 0
        # steady steps (no refresh): low-rank gradients and updates instead of full gradients and INT8 codes
        assert min(lo["comm_bytes"]) < 0.6 * min(f["comm_bytes"])
        assert max(lo["comm_bytes"]) > 1.5 * min(lo["comm_bytes"])  # refresh steps reduce full gradients


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_resume_from_own_shard_continues_identically(run, world):
    for r in _records(run, world, "resume"):
        assert r["losses"][0] == r["losses"][1]
        assert r["checksums"][0] == r["checksums"][1]


# ------------------------------------------------------------------------------------------------------------
# world size 1 (no process group): bit-identical to the single-device optimizer
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, layerwise, stagger, kw", [
    ("full", False, False, {}),
    ("lowrank", True, True, {}),  # staggered: refreshes and plain projections interleave inside one backward
    ("lowrank", True, False, {"optimizer": "projfactor", "projection": "gaussian", "update_proj_gap": 2}),
])
def test_world_size_1_reproduces_single_device(mode, layerwise, stagger, kw):
    """No process group: accumulation (2 micro-batches) and clipping included, the same bits as the reference."""
    cfg = W.qcfg(update_proj_gap=kw.pop("update_proj_gap", 3), **kw)
    a = W.make_model()
    b = copy.deepcopy(a)
    ref = QGaLoreOptimizer(a, cfg, layerwise=layerwise, grad_accum=2, grad_clip=0.5, stagger_refresh=stagger)
    opt = ShardedQGaLoreOptimizer(b, cfg, Collectives(), comm_mode=mode, grad_clip=0.5, stagger_refresh=stagger)
    batches = W.token_batches(8, batch=2, seed=3)
    norms: dict[int, list] = {id(ref): [], id(opt): []}
    for model, o in ((a, ref), (b, opt)):
        for i in range(0, len(batches), 2):
            for x in batches[i:i + 2]:
                (W.loss_fn(model, x) / 2).backward()
            o.step()
            norms[id(o)].append(o.last_step.grad_norm)
            o.zero_grad()
    assert norms[id(ref)] == norms[id(opt)] and None not in norms[id(opt)]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert opt.svd_count == ref.svd_count > 0
    assert opt.comm_bytes == 0 and opt.memory_bytes() == ref.memory_bytes()


def test_constructor_errors_name_the_argument():
    model = W.make_model()
    with pytest.raises(ValueError, match="comm_mode"):
        ShardedQGaLoreOptimizer(model, W.qcfg(), Collectives(), comm_mode="ring")
    with pytest.raises(ValueError, match="update_dtype"):
        ShardedQGaLoreOptimizer(model, W.qcfg(), Collectives(), comm_mode="full", update_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="replica_check_every"):
        ShardedQGaLoreOptimizer(model, W.qcfg(), Collectives(), replica_check_every=-1)


@pytest.mark.parametrize("env, want", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("torchrun", 3, 4, 1, 2)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ("mpi", 1, 2, 1, 2)),
    ({"PMI_RANK": "0", "PMI_SIZE": "3"}, ("mpi", 0, 3, 0, 3)),
    ({}, ("single", 0, 1, 0, 1)),
])
def test_discover_launch(env, want):
    info = discover_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == want


def test_discover_launch_rejects_inconsistent_ranks():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK"):
        discover_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        discover_launch({"RANK": "0", "WORLD_SIZE": "two"})
