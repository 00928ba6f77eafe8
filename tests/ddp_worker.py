"""Rank side of ``tests/parity/test_ddp.py``, and its launcher.

``python tests/ddp_worker.py OUT_DIR fork 2:PORT 3:PORT`` imports torch, transformers and qgalore_dist once, then
forks every rank of each world, which joins through :func:`qgalore_dist.parallel.launch_env.init_distributed` from
torchrun-style variables (127.0.0.1), runs every scenario in order with one :class:`Collectives`, and writes
``OUT_DIR/w{W}_r{R}.json``
(losses, checksums, byte counters, SVD counts, warnings, errors) plus ``w{W}_r{R}_{scenario}.pt`` (final model
state) for the parity scenarios. The test compares them with the single-device ``QGaLoreOptimizer`` on the
concatenated batch, using the same builders (imported from here).

``mpirun -np 2 python tests/ddp_worker.py OUT_DIR mpi-smoke`` runs one rank per MPI process through the mpi4py path
(rank 0's store on loopback, its port agreed by ``MPI.bcast``) on a toy model, so it never imports transformers.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import join_within, tiny_llama, token_batches  # noqa: E402

WORLDS = (2, 3)
LOCAL_BATCH = 2
STEPS_FULL = 6
STEPS_LOWRANK = 20  # replicas compared after this many steps
STEPS_VARIANT = 5
CLIP = {"full": 0.5, "lowrank": 0.5}  # global-norm clipping in the two main parity runs (0: off)
SEEDS = {"full": 11, "lowrank": 12, "projfactor": 13, "float": 14, "accum": 15, "bf16": 16, "vlorp_merge": 17,
         "vlorp_fine_full": 18, "lion": 19}
# parity variants: ProjFactor on seeded gaussian projections (its 3-tensor update on the wire, drawn projectors,
# moments carried into each new draw), the float reference mode (fp32 projectors on the wire), VLoRP granularity
# 1/4 with a Rademacher basis and rotated moments, and granularity 4 with randomized SVD in full traffic mode
VARIANTS = {"projfactor": {"optimizer": "projfactor", "projection": "gaussian", "update_proj_gap": 2},
            "float": {"quantize": False},
            "vlorp_merge": {"granularity": 0.25, "projection": "rademacher", "moments_on_refresh": "rotate",
                            "update_proj_gap": 2},
            "vlorp_fine_full": {"granularity": 4.0, "projection": "rsvd", "update_proj_gap": 2},
            "lion": {"optimizer": "lion", "granularity": 0.25, "update_proj_gap": 2, "lr": 1e-3}}
VARIANT_MODES = {"vlorp_fine_full": "full"}  # the others run in lowrank mode


# ------------------------------------------------------------------------------------------------------------
# builders shared with the test (the single-device reference uses exactly these)
# ------------------------------------------------------------------------------------------------------------
def qcfg(**kw):
    """fp32 moments and the eager update: the fp64 parity runs then agree to ~1e-16, never flipping a code."""
    from qgalore_dist import QGaLoreConfig

    base = dict(rank=8, update_proj_gap=4, scale=0.25, lr=5e-3, weight_group_size=32, proj_group_size=32,
                state_min_numel=256, state_block_size=64, state_bits=32, fused=False)
    base.update(kw)
    return QGaLoreConfig(**base)


def _rmsnorm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def make_model(quantized: bool = True):
    """The tiny LLaMA in fp64, INT8-converted (or float, for ``quantize=False`` configs).

    transformers' ``LlamaRMSNorm`` computes in fp32 even for fp64 inputs, so its backward rounds every gradient
    that flows through it at fp32 precision — after scaling by 1/(tokens of the batch): with 3 ranks, 1/(3T) on
    one device and (1/T)/3 across ranks then differ by ~1e-7 and flip codes (with 2 ranks the factor is exact).
    The norms here compute in the input dtype, so the whole graph is fp64.
    """
    import types

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qgalore_dist import quantize_model

    m = tiny_llama(0, torch.float64)
    for mod in m.modules():
        if isinstance(mod, LlamaRMSNorm):
            mod.forward = types.MethodType(_rmsnorm_in_input_dtype, mod)
    if quantized:
        quantize_model(m, group_size=32, seed=0)
    return m


def global_batches(world: int, steps: int, seed: int, per_rank: int = LOCAL_BATCH) -> list[torch.Tensor]:
    """The global batch of each step: rank r's rows are ``[r·per_rank, (r+1)·per_rank)``."""
    return token_batches(steps, batch=per_rank * world, seed=seed)


def loss_fn(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in the model's dtype (fp64 here: transformers' own loss upcasts to fp32, and
    1/(3T) vs (1/T)/3 then differs at fp32 precision)."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def engine_options(label: str) -> dict:
    """Options of the parity runs: replica checks every 5 steps, clipping where :data:`CLIP` says, and small
    refresh buckets, so lowrank refresh gradients are reduced mid-backward, a few matrices at a time."""
    return {"replica_check_every": 5, "grad_clip": CLIP.get(label, 0.0), "refresh_bucket_bytes": 20_000}


def checksums(model) -> dict[str, int]:
    from qgalore_dist.parallel.replicas import tensor_checksum

    return {k: tensor_checksum(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------------------------
class _SvdCounter:
    """Counts compute_basis calls (every exact / randomized SVD of a refresh goes through it) in this process."""

    def __init__(self):
        import qgalore_dist.optim.lowrank_adamw as lra

        self.calls = 0
        inner = lra.compute_basis

        def counted(*a, **k):
            self.calls += 1
            return inner(*a, **k)

        lra.compute_basis = counted


def _train(model, opt, batches, rank: int, accum: int = 1, per_rank: int = LOCAL_BATCH) -> dict:
    """Steps over this rank's rows of each global batch, ``accum`` micro-batches each; per-step loss + bytes."""
    losses, comm, norms = [], [], []
    micro = per_rank // accum
    for x in batches:
        mine = x[rank * per_rank:(rank + 1) * per_rank]
        total = 0.0
        for i in range(accum):
            loss = loss_fn(model, mine[i * micro:(i + 1) * micro])
            (loss / accum).backward()
            total += float(loss) / accum
        opt.step()
        norms.append(opt.last_step.grad_norm)
        opt.zero_grad()
        losses.append(total)
        comm.append(opt.comm_bytes)
    return {"losses": losses, "comm_bytes": comm, "norms": norms}


def _worker(out_dir: Path, torchrun_env: dict[str, str]) -> None:
    """One forked rank, placed by torchrun-style variables."""
    os.environ.update(torchrun_env, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer
    from qgalore_dist.parallel.launch_env import init_distributed
    from qgalore_dist.parallel.replicas import ReplicaMismatch

    t0 = time.monotonic()
    env = init_distributed("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = env.rank, env.world_size
    coll = Collectives(timeout=datetime.timedelta(seconds=60))
    svd = _SvdCounter()
    record: dict = {"rank": rank, "world": world, "env": [env.launcher, env.rank, env.world_size, env.backend],
                    "scenarios": {}, "timings": {"init_s": time.monotonic() - t0}}
    keep: dict = {}

    def scenario(name, fn):
        t = time.monotonic()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = fn()
            res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            record["scenarios"][name] = res
        except Exception:
            record["scenarios"][name] = {"error": traceback.format_exc()}
        record["timings"][name] = time.monotonic() - t

    def setup_mismatch():
        # the last rank runs another learning rate: the start-up check must stop every rank, before any step
        cfg = qcfg(lr=1e-3) if rank == world - 1 else qcfg()
        try:
            ShardedQGaLoreOptimizer(make_model(), cfg, coll)
            return {"raised": False}
        except ValueError as exc:
            return {"raised": True, "message": str(exc)}

    def parity(label: str, mode: str, steps: int, seed: int, **cfg_kw):
        def run():
            cfg = qcfg(**cfg_kw)
            model = make_model(cfg.quantize)
            before = svd.calls
            opt = ShardedQGaLoreOptimizer(model, cfg, coll, comm_mode=mode, **engine_options(label))
            out = _train(model, opt, global_batches(world, steps, seed), rank)
            out.update(svd_calls=svd.calls - before, svd_count=opt.svd_count, owned=sorted(opt.owned),
                       refreshed=sorted({r.name for r in opt.refresh_log()}), repairs=list(opt.replica_repairs),
                       checksums=checksums(model), startup_comm=opt.startup_comm["comm_bytes"],
                       memory=opt.memory_bytes())
            torch.save(model.state_dict(), out_dir / f"w{world}_r{rank}_{label}.pt")
            torch.save(opt.state_dict(), out_dir / f"w{world}_r{rank}_{label}_optim.pt")
            keep[label] = (model, opt)
            return out
        return run

    def accum():
        # lowrank mode: 2 micro-batches of b == 1 batch of 2b; step 0 (the refresh) is taken alike by both runs
        first = global_batches(world, 1, SEEDS["accum"], per_rank=4)
        later = global_batches(world, 2, SEEDS["accum"] + 1, per_rank=4)
        out = {}
        for label, acc in (("accum1", 1), ("accum2", 2)):
            model = make_model()
            opt = ShardedQGaLoreOptimizer(model, qcfg(update_proj_gap=100), coll, grad_clip=0.5)
            _train(model, opt, first, rank, per_rank=4)
            out[label] = _train(model, opt, later, rank, accum=acc, per_rank=4)
            out[label]["checksums"] = checksums(model)
            out[label]["dense"] = {n: p.detach().tolist() for n, p in model.named_parameters()
                                   if n.endswith("norm.weight")}
        return out

    def corrupt():
        # one replica of a matrix owned by rank 0 is damaged on the last rank; the check must restore it
        model, opt = keep["lowrank"]
        name = sorted(n for n, o in opt.plan.owner.items() if o == 0)[0]
        codes = opt._pm[name].module.weight_codes
        if rank == world - 1:
            codes[0, :4] = torch.where(codes[0, :4] < 100, codes[0, :4] + 3, codes[0, :4] - 3)
        damaged = checksums(model)
        bad = opt.check_replicas()
        again = opt.check_replicas()
        return {"name": name, "bad": bad, "again": again, "damaged": damaged, "repaired": checksums(model)}

    def resume():
        # a fresh optimizer loading this rank's shard (replicas get projectors + step counts from the owners) then
        # steps exactly like the original
        import copy

        model, opt = keep["lowrank"]
        model2 = copy.deepcopy(model)
        opt2 = ShardedQGaLoreOptimizer(model2, qcfg(), coll, **engine_options("lowrank"))
        opt2.load_state_dict(opt.state_dict())
        batches = global_batches(world, 2, SEEDS["lowrank"] + 1)
        a, b = _train(model, opt, batches, rank), _train(model2, opt2, batches, rank)
        return {"losses": [a["losses"], b["losses"]], "checksums": [checksums(model), checksums(model2)]}

    def strict():
        model = make_model()
        opt = ShardedQGaLoreOptimizer(model, qcfg(), coll, strict_replicas=True)
        _train(model, opt, global_batches(world, 1, SEEDS["lowrank"]), rank)
        name = sorted(n for n, o in opt.plan.owner.items() if o == 0)[0]
        if rank == world - 1:
            opt._pm[name].module.weight_scales[0, 0] *= 1.5
        try:
            opt.check_replicas()
            return {"raised": False, "name": name}
        except ReplicaMismatch as exc:
            return {"raised": True, "message": str(exc), "name": name}

    def bf16_wire():
        model = make_model()
        opt = ShardedQGaLoreOptimizer(model, qcfg(), coll, update_dtype=torch.bfloat16, replica_check_every=2)
        out = _train(model, opt, global_batches(world, 3, SEEDS["bf16"]), rank)
        out.update(checksums=checksums(model), repairs=list(opt.replica_repairs))
        return out

    scenario("setup_mismatch", setup_mismatch)
    scenario("full", parity("full", "full", STEPS_FULL, SEEDS["full"]))
    scenario("lowrank", parity("lowrank", "lowrank", STEPS_LOWRANK, SEEDS["lowrank"]))
    for v, kw in VARIANTS.items():
        scenario(v, parity(v, VARIANT_MODES.get(v, "lowrank"), STEPS_VARIANT, SEEDS[v], **kw))
    scenario("accum", accum)
    scenario("corrupt", corrupt)
    scenario("resume", resume)
    scenario("strict", strict)
    scenario("bf16_wire", bf16_wire)
    coll.barrier()  # nobody leaves while a peer still reads from it
    record["timings"]["total_s"] = time.monotonic() - t0
    (out_dir / f"w{world}_r{rank}.json").write_text(json.dumps(record))
    os._exit(0)


class _Toy(torch.nn.Module):
    """Two targeted linears between an embedding and a head: a model without the (slow) transformers import."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 16)
        self.q_proj = torch.nn.Linear(16, 24, bias=False)
        self.down_proj = torch.nn.Linear(24, 16, bias=False)
        self.head = torch.nn.Linear(16, 32, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.down_proj(torch.tanh(self.q_proj(h)))
        return self.head(h)


def _mpi_smoke(out_dir: Path) -> None:
    """One rank started by ``mpirun``: join through the mpi4py path, train a toy model 3 lowrank steps, record."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from qgalore_dist import quantize_model
    from qgalore_dist.parallel import Collectives, ShardedQGaLoreOptimizer, init_distributed

    env = init_distributed("gloo", timeout=datetime.timedelta(seconds=60))
    coll = Collectives(timeout=datetime.timedelta(seconds=60))
    model = _Toy().double()
    quantize_model(model, group_size=8)
    opt = ShardedQGaLoreOptimizer(model, qcfg(rank=4, proj_group_size=8, weight_group_size=8, update_proj_gap=2),
                                  coll, replica_check_every=1)
    for x in token_batches(3, batch=2 * env.world_size, seq=8, vocab=32, seed=5):
        logits = model(x[env.rank * 2:(env.rank + 1) * 2])
        F.cross_entropy(logits[:, :-1].reshape(-1, 32), x[env.rank * 2:(env.rank + 1) * 2, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    record = {"env": [env.launcher, env.rank, env.world_size, env.backend, env.master_addr],
              "port_ok": bool(env.master_port), "svd_count": opt.svd_count, "owned": sorted(opt.owned),
              "repairs": opt.replica_repairs, "checksums": checksums(model)}
    (out_dir / f"mpi_r{env.rank}.json").write_text(json.dumps(record))
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()  # mpirun aborts the job when a rank leaves without MPI_Finalize
    MPI.Finalize()
    os._exit(0)


def _launch(out_dir: Path, worlds: dict[int, int]) -> int:
    """Import once, fork every rank of the worlds ``{world size: port}``, wait (bounded), kill stragglers."""
    import multiprocessing as mp

    import transformers.models.llama.modeling_llama  # noqa: F401  (heavy imports shared by the forked ranks)

    import qgalore_dist.parallel  # noqa: F401

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(out_dir, {
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})) for world, port in worlds.items()
        for rank in range(world)]
    return join_within(procs, 240)


if __name__ == "__main__":
    # python ddp_worker.py OUT_DIR fork WORLD:PORT [...]   |   mpirun -np N python ddp_worker.py OUT_DIR mpi-smoke
    if sys.argv[2] == "mpi-smoke":
        _mpi_smoke(Path(sys.argv[1]))
    sys.exit(_launch(Path(sys.argv[1]), dict(tuple(int(x) for x in a.split(":")) for a in sys.argv[3:])))
