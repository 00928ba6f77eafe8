"""``--engine ddp`` through the real CLI (``qgalore_dist.train.cli.main``) in forked ranks, world sizes 2 and 3.

One launcher (``tests/ddp_engine_worker.py``) forks every rank of both worlds once for the module; each rank runs the
scenarios in order (each a ``main(argv)`` call with its own process group) and writes JSON. Beside it, ``mpirun -np 2
python launch/pretrain.py --engine ddp`` runs the real launcher, and this process runs the single-device references
(``--engine local --batch-size 6``, the global batch of both worlds). Everything in fp64 (codes compared exactly).

Checked: loss per step and final weights equal the single-device run (lowrank and full modes); metrics written by
rank 0 only, with ``comm_bytes``; the job's SVD total equals the single-device count; resume at the same world size
equals the uninterrupted run bit for bit, and at the other world size (and on one device) it continues the same
run; ``--full-reduce micro_batch`` equals ``boundary`` and moves ``grad_accum`` times the gradient bytes; the adamw
baseline in DistributedDataParallel; a mismatched config, a corrupted optimizer shard (exit 2 on every rank,
nothing rewritten), a rank that dies and one that stops answering (the others exit 1 within ``--dist-timeout`` with
one line). Bad input is checked in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ddp_engine_worker as W
import pytest
import torch
from safetensors.torch import load_file

from qgalore_dist.data import default_corpus_files, get_tokenizer
from qgalore_dist.parallel.collectives import all_reduce_bytes
from qgalore_dist.train import main

ROOT = Path(__file__).resolve().parents[2]


def _open_mpi_available() -> bool:
    if shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None:
        return False
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr


def _train_lines(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("ddp_engine")
    out, cache = root / "out", root / "cache"
    out.mkdir()
    corpus = root / "sonnets.txt"
    shutil.copy(next(p for p in default_corpus_files() if p.name.startswith("sonnets")), corpus)
    get_tokenizer(vocab_size=512, corpus=corpus, cache_dir=cache).save_pretrained(str(root / "tok"))
    spec = {"out": str(out), "tok": str(root / "tok"), "corpus": str(corpus), "ref": str(root / "ref"),
            "limit_s": 400}
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", QGALORE_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmds = [["nice", "-n", "5", sys.executable, str(Path(W.__file__).resolve()), str(root / "spec.json")]]
    mpi = _open_mpi_available()
    if mpi:  # the real launcher script under mpirun (rank discovery through mpi4py, store on loopback)
        cmds.append(["nice", "-n", "5", "mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2",
                     *[a for v in ("OMP_NUM_THREADS", "PYTHONPATH", "GLOO_SOCKET_IFNAME", "QGALORE_CACHE")
                       if v in env for a in ("-x", v)],
                     sys.executable, str(ROOT / "launch" / "pretrain.py"), "--engine", "ddp",
                     *W.base_args(spec, 3, "--max-steps", "2", "--metrics-jsonl", str(out / "mpi.jsonl"),
                                  "--save-dir", str(out / "mpi_ckpt"))])
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    # the single-device references, meanwhile (same patch as the ranks, one thread like them)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    undo = W.patch_rmsnorm()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("QGALORE_CACHE", str(cache))
            ref = main(W.base_args(spec, W.GLOBAL_BATCH, "--engine", "local", "--save-dir", str(root / "ref"),
                                   "--save-every", str(W.SAVE_EVERY), "--metrics-jsonl", str(root / "ref.jsonl")))
            ref_adamw = main(W.base_args(spec, W.GLOBAL_BATCH, "--engine", "local", "--optimizer", "adamw",
                                         "--max-steps", "3"))
    finally:
        undo()
        torch.set_num_threads(threads)
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=480)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            logs.append((proc.communicate()[0] or "") + "\n[killed: launcher timed out]")
    ranks = {}
    for world in W.WORLDS:
        for rank in range(world):
            f = out / f"w{world}_r{rank}.json"
            ranks[(world, rank)] = json.loads(f.read_text()) if f.exists() else {"missing": logs[0][-3000:]}
    return SimpleNamespace(root=root, out=out, ref=ref, ref_adamw=ref_adamw, ranks=ranks, cache=cache,
                           launcher_rc=procs[0].returncode, logs=logs,
                           mpi=(procs[1].returncode, logs[1]) if mpi else None)


def _res(run, world: int, rank: int, scenario: str) -> dict:
    rec = run.ranks[(world, rank)]
    if "missing" in rec:
        pytest.fail(f"world {world} rank {rank} wrote no result:\n{rec['missing']}")
    res = rec["scenarios"].get(scenario)
    assert res is not None, f"world {world} rank {rank}: scenario {scenario} did not run\n{run.logs[0][-3000:]}"
    assert res.get("exit") != "exception", f"world {world} rank {rank} {scenario}:\n{res.get('traceback')}"
    return res


def _ok(run, world: int, scenario: str) -> list[dict]:
    out = []
    for rank in range(world):
        res = _res(run, world, rank, scenario)
        assert res["exit"] == 0, f"world {world} rank {rank} {scenario} exited {res['exit']}:\n{res['stderr'][-2000:]}"
        out.append(res)
    return out


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """INT8 codes exactly (fp64 runs), scales and dense weights to fp64 reduction-order noise."""
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype == torch.int8:
            assert torch.equal(a[k], b[k]), f"{k}: {(a[k] != b[k]).sum()} codes differ"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=k)


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.dist
def test_launcher_ended_and_every_rank_reported(run):
    assert run.launcher_rc == 0, run.logs[0][-3000:]
    for (world, rank), rec in run.ranks.items():
        assert "missing" not in rec, rec.get("missing")


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
@pytest.mark.parametrize("mode", ["lowrank", "full"])
def test_losses_and_weights_equal_single_device(run, world, mode):
    recs = _ok(run, world, mode)
    for res in recs:  # every rank reports the global mean loss
        torch.testing.assert_close(res["losses"], run.ref.losses, rtol=0, atol=1e-10)
        # each rank evaluated its slice of every global held-out batch: the sum is the single-device value
        assert [s for s, _ in res["evals"]] == [s for s, _ in run.ref.evals]
        torch.testing.assert_close([v for _, v in res["evals"]], [v for _, v in run.ref.evals], rtol=0, atol=1e-10)
        assert res["ddp_wrapped"] is False  # INT8 buffers never enter a DDP bucket: no DDP wrapper at all
    assert all(r["checksums"] == recs[0]["checksums"] for r in recs)  # replicas bit-identical
    if mode == "full":  # --export: rank 0 writes the dequantised transformers model, the others nothing
        assert [r["export_dir"] for r in recs] == [str(run.out / f"w{world}_export")] + [None] * (world - 1)
        exported = load_file(str(run.out / f"w{world}_export" / "model.safetensors"))
        assert "model.layers.0.self_attn.q_proj.weight" in exported and not any("codes" in k for k in exported)
    step = f"step_{W.STEPS:06d}"
    _assert_same_weights(load_file(str(run.out / f"w{world}_{mode}" / step / "model.safetensors")),
                         load_file(str(run.root / "ref" / step / "model.safetensors")))


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_metrics_from_rank0_only_with_comm_bytes_and_job_svd_total(run, world):
    _ok(run, world, "lowrank")
    ref = _train_lines(run.root / "ref.jsonl")
    by_mode = {}
    for mode in ("lowrank", "full"):
        lines = _train_lines(run.out / f"w{world}_{mode}.jsonl")
        assert [r["step"] for r in lines] == list(range(1, W.STEPS + 1))  # one writer: no duplicate lines
        for r in lines:
            assert r["comm_bytes"] > 0 and r["comm_bytes"] == r["comm_bytes_sent"] + r["comm_bytes_received"]
            assert r["tokens"] == r["step"] * W.GLOBAL_BATCH * 32
        # each refresh once in the job (at its owner): the total equals the single device's, rank 0 has a part
        assert [r["svd_count"] for r in lines] == [r["svd_count"] for r in ref]
        assert 0 < lines[-1]["svd_count_rank"] < lines[-1]["svd_count"]
        by_mode[mode] = lines
    # a step without refreshes: lowrank moves low-rank gradients/updates, full the gradients + INT8 codes
    quiet = [i for i in range(1, W.STEPS) if ref[i]["svd_count"] == ref[i - 1]["svd_count"]]
    assert quiet, "no step without a refresh"
    for i in quiet:
        assert by_mode["lowrank"][i]["comm_bytes"] < by_mode["full"][i]["comm_bytes"]
    # evaluation is split too: rank 0 ran its slice (batch GLOBAL_BATCH / world) of each of the 2 global batches
    ev = [json.loads(ln) for ln in (run.out / f"w{world}_lowrank.jsonl").read_text().splitlines()]
    ev = [r for r in ev if r.get("event") == "eval"]
    assert ev and all(r["eval_batches_this_rank"] == 2 for r in ev)


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_resume_at_same_world_size_equals_uninterrupted(run, world):
    full = _ok(run, world, "lowrank")
    for res, base in zip(_ok(run, world, "resume"), full):
        assert res["start_step"] == W.SAVE_EVERY
        assert res["losses"] == base["losses"][W.SAVE_EVERY:]  # bit for bit
        assert res["checksums"] == base["checksums"]


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_resume_at_another_world_size_continues_the_run(run, world):
    other = [w for w in W.WORLDS if w != world][0]
    _ok(run, other, "lowrank")
    recs = _ok(run, world, "reshard")
    for res in recs:
        assert res["start_step"] == W.SAVE_EVERY
        torch.testing.assert_close(res["losses"], run.ref.losses[W.SAVE_EVERY:], rtol=0, atol=1e-10)
    assert all(r["checksums"] == recs[0]["checksums"] for r in recs)
    codes = {k: v for k, v in recs[0]["checksums"].items() if k.endswith("weight_codes")}
    base = _ok(run, world, "lowrank")[0]["checksums"]
    assert codes == {k: base[k] for k in codes}


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_ddp_resumes_a_single_device_checkpoint(run, world):
    recs = _ok(run, world, "from_local")
    for res in recs:
        assert res["start_step"] == W.SAVE_EVERY
        torch.testing.assert_close(res["losses"], run.ref.losses[W.SAVE_EVERY:], rtol=0, atol=1e-10)
    codes = {k: v for k, v in recs[0]["checksums"].items() if k.endswith("weight_codes")}
    base = _ok(run, world, "lowrank")[0]["checksums"]
    assert codes == {k: base[k] for k in codes}


def test_single_device_resumes_a_sharded_checkpoint(run, monkeypatch, tmp_path):
    """--engine local on a ddp checkpoint: the shards are merged (each matrix from its owner)."""
    _ok(run, 3, "lowrank")
    monkeypatch.setenv("QGALORE_CACHE", str(run.cache))
    # one thread, like the reference: fp64 matmuls summed in another order can flip a stochastic-rounding decision
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    undo = W.patch_rmsnorm()
    try:
        res = main(W.base_args({"tok": str(run.root / "tok"), "corpus": str(run.root / "sonnets.txt")},
                               W.GLOBAL_BATCH, "--engine", "local", "--resume",
                               str(run.out / "w3_lowrank" / "step_000003")))
    finally:
        undo()
        torch.set_num_threads(threads)
    assert res.start_step == W.SAVE_EVERY
    torch.testing.assert_close(res.losses, run.ref.losses[W.SAVE_EVERY:], rtol=0, atol=1e-10)


def test_export_tool_reads_a_sharded_checkpoint(run, tmp_path):
    """``python -m qgalore_dist.checkpoint.export`` on a ddp checkpoint: the same weights as --export wrote."""
    from qgalore_dist.checkpoint.export import main as export_main

    _ok(run, 2, "full")
    export_main([str(run.out / "w2_full" / f"step_{W.STEPS:06d}"), str(tmp_path / "exp"), "--dtype", "float64"])
    a = load_file(str(tmp_path / "exp" / "model.safetensors"))
    b = load_file(str(run.out / "w2_export" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-6, atol=0, msg=k)


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_full_mode_accumulation_reduce_per_micro_batch_or_at_boundary(run, world):
    boundary, micro = _ok(run, world, "accum_boundary"), _ok(run, world, "accum_micro")
    for b, m in zip(boundary, micro):
        torch.testing.assert_close(m["losses"], b["losses"], rtol=0, atol=1e-12)
        assert {k: v for k, v in m["checksums"].items() if k.endswith("weight_codes")} == \
               {k: v for k, v in b["checksums"].items() if k.endswith("weight_codes")}
    lb = _train_lines(run.out / f"w{world}_accum_boundary.jsonl")
    lm = _train_lines(run.out / f"w{world}_accum_micro.jsonl")
    for b, m in zip(lb, lm):  # rank 0's view: gradient reductions twice (grad_accum 2), code broadcasts alike
        rb, rm = b["comm_by_primitive"]["reduce"], m["comm_by_primitive"]["reduce"]
        assert rm["sent"] + rm["received"] == 2 * (rb["sent"] + rb["received"]) > 0
        assert m["comm_by_primitive"].get("broadcast") == b["comm_by_primitive"].get("broadcast")
        assert m["comm_by_primitive"].get("all_gather") == b["comm_by_primitive"].get("all_gather")


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_bf16_update_broadcast_keeps_replicas_identical_with_fewer_bytes(run, world):
    recs = _ok(run, world, "bf16_wire")
    assert all(r["checksums"] == recs[0]["checksums"] for r in recs)
    torch.testing.assert_close(recs[0]["losses"], run.ref.losses[:3], rtol=0, atol=0.05)
    wire = _train_lines(run.out / f"w{world}_bf16_wire.jsonl")
    native = _train_lines(run.out / f"w{world}_lowrank.jsonl")[:3]
    for a, b in zip(wire, native):  # fp64 N on the wire -> bf16: the update broadcast shrinks 4x
        assert a["comm_bytes"] < b["comm_bytes"]


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_adamw_baseline_in_distributed_data_parallel(run, world):
    recs = _ok(run, world, "adamw")
    for res in recs:
        assert res["ddp_wrapped"] is True
        torch.testing.assert_close(res["losses"], run.ref_adamw.losses, rtol=0, atol=1e-10)
    assert all(r["checksums"] == recs[0]["checksums"] for r in recs)
    lines = _train_lines(run.out / f"w{world}_adamw.jsonl")
    grad_bytes = recs[0]["param_bytes"]
    for r in lines:  # the comm hook's count: a ring all-reduce of every gradient, per bucket
        expect = 2 * all_reduce_bytes(grad_bytes, world)
        assert abs(r["comm_bytes"] - expect) <= 2 * r["comm_calls"], (r["comm_bytes"], expect)


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_mismatched_config_stops_every_rank_at_start_up(run, world):
    """Every rank exits 2; the job prints the one ``error:`` line (rank 0's), the other ranks stay silent."""
    for rank in range(world):
        res = _res(run, world, rank, "mismatch")
        assert res["exit"] == 2, res["stderr"][-2000:]
        if rank:
            assert "error:" not in res["stderr"], res["stderr"][-2000:]
            continue
        line = _one_error_line(res["stderr"])
        assert "same settings" in line and f"--lr differs on rank(s) [{world - 1}]" in line


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_corrupted_optimizer_shard_exits_2_on_every_rank_and_nothing_is_written(run, world):
    for rank in range(world):
        res = _res(run, world, rank, "corrupt")
        assert res["exit"] == 2, res["stderr"][-2000:]
        if rank:  # one line for the job: rank 0's
            assert "error:" not in res["stderr"], res["stderr"][-2000:]
            continue
        line = _one_error_line(res["stderr"])
        assert "corrupted" in line and "optimizer_rank00001.safetensors" in line
    r0 = _res(run, world, 0, "corrupt")
    assert r0["digest_after"] == r0["digest_before"]


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_a_dead_rank_ends_the_others_within_the_timeout(run, world):
    died = _res(run, world, world - 1, "dies")["died_at"]
    for rank in range(world - 1):
        res = _res(run, world, rank, "dies")
        assert res["exit"] == 1, res["stderr"][-2000:]
        line = _one_error_line(res["stderr"])
        assert "another rank died" in line and f"rank {rank} of {world}" in line
        assert res["ended_at"] - died < W.DIST_TIMEOUT + 10


@pytest.mark.dist
@pytest.mark.parametrize("world", W.WORLDS)
def test_a_silent_rank_ends_the_others_within_the_timeout(run, world):
    hung = _res(run, world, world - 1, "hangs")
    assert hung["exit"] == 1  # it wakes up into a group its peers have left
    for rank in range(world - 1):
        res = _res(run, world, rank, "hangs")
        assert res["exit"] == 1, res["stderr"][-2000:]
        line = _one_error_line(res["stderr"])
        assert "another rank died, hung or left" in line and f"--dist-timeout {W.HANG_TIMEOUT}s" in line
        assert res["ended_at"] - hung["hung_at"] < W.HANG_TIMEOUT + 10
        assert res["ended_at"] < hung["ended_at"]  # the others did not wait for it


@pytest.mark.dist
def test_mpirun_launches_the_real_script(run):
    if run.mpi is None:
        pytest.skip("Open MPI's mpirun or mpi4py is not installed")
    rc, log = run.mpi
    assert rc == 0, log[-3000:]
    lines = _train_lines(run.out / "mpi.jsonl")
    assert [r["step"] for r in lines] == [1, 2] and all(r["comm_bytes"] > 0 for r in lines)
    ckpt = run.out / "mpi_ckpt" / "step_000002"
    assert (ckpt / "optimizer_rank00000.safetensors").is_file() and (ckpt / "optimizer_rank00001.safetensors").is_file()
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert trainer["engine"] == "ddp" and trainer["world_size"] == 2 and trainer["optimizer_shards"] == 2


# ------------------------------------------------------------------------------------------- bad input, in-process
def _exit2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return _one_error_line(capsys.readouterr().err)


def test_full_reduce_and_update_dtype_need_their_mode(capsys):
    assert "--full-reduce micro_batch applies to --engine ddp --comm-mode full" in _exit2(
        capsys, ["--engine", "ddp", "--full-reduce", "micro_batch"])
    assert "applies to" in _exit2(capsys, ["--comm-mode", "full", "--full-reduce", "micro_batch"])
    assert "--update-dtype bfloat16 applies to --engine ddp --comm-mode lowrank" in _exit2(
        capsys, ["--engine", "ddp", "--comm-mode", "full", "--update-dtype", "bfloat16"])


@pytest.mark.parametrize("flags, shown", [
    (["--comm-mode", "full"], "--comm-mode full"),
    (["--comm-mode", "full", "--full-reduce", "micro_batch"], "--comm-mode full"),
    (["--update-dtype", "bfloat16"], "--update-dtype bfloat16"),
    (["--strict-replicas"], "--strict-replicas"),
    (["--replica-check-every", "5"], "--replica-check-every 5"),
])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_dense_baselines_refuse_the_sharded_optimizers_flags(capsys, flags, shown, optimizer):
    """DistributedDataParallel reads none of these: a non-default value is refused, not silently ignored."""
    line = _exit2(capsys, ["--engine", "ddp", "--optimizer", optimizer, *flags, "--model", "llama_tiny"])
    assert f"{shown} does nothing with --engine ddp --optimizer {optimizer}" in line


def test_malformed_launcher_variables(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    line = _exit2(capsys, ["--engine", "ddp", "--model", "llama_tiny", "--max-steps", "1"])
    assert "--engine ddp" in line and "rank 3" in line


def test_ddp_device_must_follow_the_local_rank(capsys):
    line = _exit2(capsys, ["--engine", "ddp", "--device", "cuda:1", "--model", "llama_tiny"])
    assert "cuda" in line


def test_full_reduce_option_in_process():
    """One process (Collectives in local mode): micro_batch reduces to the only owner, bit-identical to boundary;
    it needs full mode."""
    from helpers import tiny_llama, token_batches

    from qgalore_dist import QGaLoreConfig, quantize_model
    from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer

    cfg = QGaLoreConfig(rank=8, update_proj_gap=2, lr=5e-3, weight_group_size=32, proj_group_size=32, fused=False)
    states = []
    for full_reduce in ("boundary", "micro_batch"):
        model = tiny_llama(0, torch.float64)
        quantize_model(model, group_size=32, seed=0)
        opt = ShardedQGaLoreOptimizer(model, cfg, Collectives(), comm_mode="full", full_reduce=full_reduce,
                                      grad_clip=0.5)
        for i, x in enumerate(token_batches(6, seed=3)):
            (model(input_ids=x, labels=x).loss / 2).backward()
            if i % 2:
                opt.step()
                opt.zero_grad()
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    with pytest.raises(ValueError, match="needs comm_mode='full'"):
        ShardedQGaLoreOptimizer(tiny_llama(0, torch.float64), cfg.replace(quantize=False), Collectives(),
                                comm_mode="lowrank", full_reduce="micro_batch")


def test_ddp_engine_without_a_launcher_is_one_rank(run, monkeypatch, tmp_path):
    """No launcher variables: one process, no process group; the checkpoint is a one-shard ddp checkpoint."""
    for k in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("QGALORE_CACHE", str(run.cache))
    spec = {"tok": str(run.root / "tok"), "corpus": str(run.root / "sonnets.txt")}
    res = main(W.base_args(spec, 2, "--engine", "ddp", "--max-steps", "2", "--save-dir", str(tmp_path / "ck"),
                           "--metrics-jsonl", str(tmp_path / "m.jsonl")))
    assert res.steps == 2 and not torch.distributed.is_initialized()
    lines = _train_lines(tmp_path / "m.jsonl")
    assert [r["comm_bytes"] for r in lines] == [0, 0] and lines[-1]["svd_count"] == lines[-1]["svd_count_rank"] > 0
    trainer = json.loads((tmp_path / "ck" / "step_000002" / "trainer.json").read_text())
    assert trainer["engine"] == "ddp" and trainer["optimizer_shards"] == 1
