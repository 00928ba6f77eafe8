"""Rank side of ``tests/parity/test_fsdp.py``, and its launcher.

``python tests/fsdp_worker.py OUT_DIR 2:PORT 3:PORT`` imports torch, transformers and qgalore_dist once, then forks
every rank of each world; each joins through :func:`qgalore_dist.parallel.launch_env.init_distributed` from
torchrun-style variables, runs every scenario with the :class:`~qgalore_dist.train.engines.fsdp.FSDPEngine` (or,
for the toy with empty shards, ``fully_shard`` + :class:`RowShardedQGaLoreOptimizer` directly) and writes
``OUT_DIR/w{W}_r{R}.json`` plus ``w{W}_{scenario}.pt`` (rank 0: the gathered final model state). Bytes that FSDP2
really all-gathers are counted by wrapping ``torch.distributed``'s all-gather entry points.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_worker import global_batches, loss_fn, make_model, qcfg  # noqa: E402
from helpers import join_within  # noqa: E402

WORLDS = (2, 3)
LOCAL_BATCH = 2
STEPS = 6
CLIP = 0.5
SEEDS = {"parity": 21, "accum": 22, "resume": 23, "toy": 24}
# VLoRP options through the fsdp engine: merged rows that torch.chunk cuts at N = 2 and 3 (64 and 176 rows,
# c = 1/4), ProjFactor's row-additive sums, a random basis, moments rotated on refresh
OPTION_CONFIGS = {"projfactor_merge": dict(optimizer="projfactor", granularity=0.25),
                  "rademacher_fine_rotate": dict(granularity=4.0, projection="rademacher",
                                                 moments_on_refresh="rotate", granularity_fallback=True)}
RESHARD_BATCH = 6  # global rows per step of the N -> M resume scenario: 3 per rank at N = 2, 2 at N = 3
RESHARD_CONFIGS = {"qgalore": {}, "merge": OPTION_CONFIGS["projfactor_merge"]}
# one device vs N ranks: the same gradients up to the order of fp64 sums (6 rows in one mean vs N means of 6/N),
# and an SVD refresh can lift last-bit differences to 1e-5 (measured: ProjFactor at 1/4, a refresh at step 4); the
# engine-crossing runs refresh at step 0 only, so what they compare is the state a checkpoint carries
CROSS_GAP = 100
TOY_SHAPES = {"a": (1, 40), "b": (2, 2), "c": (4, 24), "d": (40, 6)}  # empty shards at N=2 / N=3


def cfg(**kw):
    base = dict(update_proj_gap=2)
    base.update(kw)
    return qcfg(**base)


def engine_args(**kw):
    from qgalore_dist.train.args import TrainArgs

    base = dict(engine="fsdp", optimizer="qgalore", grad_clip=CLIP, dist_timeout=60.0)
    base.update(kw)
    return TrainArgs(**base)


def reference_optimizer(model, config, **kw):
    """The single-device optimizer the fsdp engine must reproduce (full gradient per step, no layer-wise sink)."""
    from qgalore_dist import QGaLoreOptimizer

    return QGaLoreOptimizer(model, config, dense_state_bits=8, stagger_refresh=True, layerwise=False, **kw)


class ToyInt8(torch.nn.Module):
    """Four INT8 linears of :data:`TOY_SHAPES` applied in sequence to a [b, 60] input (empty row shards)."""

    def __init__(self):
        from qgalore_dist.nn.int8_linear import QGaLoreLinear

        super().__init__()
        g = torch.Generator().manual_seed(5)
        for name, (m, n) in TOY_SHAPES.items():
            lin = QGaLoreLinear(n, m, group_size=16)
            from qgalore_dist.quant.int8 import quantize_rows

            codes, scales = quantize_rows(torch.randn(m, n, generator=g, dtype=torch.float64) * 0.3, 16)
            lin.weight_codes.copy_(codes)
            lin.weight_scales.copy_(scales)
            lin.qname = f"{name}.weight"
            setattr(self, name, lin)
        self.head = torch.nn.Linear(6, 3, dtype=torch.float64)

    def forward(self, x):
        y = self.c(torch.cat([self.b(self.a(x[:, :40]).repeat(1, 2)).repeat(1, 2), x[:, 40:60]], 1))  # [b, 4]
        z = self.d(torch.cat([y, y[:, :2]], 1))  # [b, 40]
        return self.head(torch.tanh(z[:, :6]))


def toy_batches(world: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEEDS["toy"])
    return [torch.randn(LOCAL_BATCH * world, 60, generator=g, dtype=torch.float64) for _ in range(steps)]


class _GatherCounter:
    """Bytes that pass through ``torch.distributed``'s all-gather calls in this process (FSDP2's included)."""

    def __init__(self):
        self.bytes = 0
        self.exclude: list = []
        for name in ("all_gather_into_tensor", "all_gather_single"):
            inner = getattr(dist, name, None)
            if inner is None:
                continue

            def counted(out, inp, *a, _inner=inner, **k):
                if k.get("group") not in self.exclude:  # the optimizer's own Collectives group is not FSDP2's
                    self.bytes += out.numel() * out.element_size() - inp.numel() * inp.element_size()
                return _inner(out, inp, *a, **k)

            setattr(dist, name, counted)


def _worker(out_dir: Path, torchrun_env: dict[str, str]) -> None:
    os.environ.update(torchrun_env, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import qgalore_dist.optim.lowrank_adamw as lra
    from qgalore_dist.nn.int8_fsdp import ALL_GATHER_COUNTER
    from qgalore_dist.parallel.launch_env import init_distributed
    from qgalore_dist.train.engines.fsdp import FSDPEngine

    gathered = _GatherCounter()
    svd_calls = [0]
    inner_basis = lra.compute_basis

    def counted_basis(*a, **k):
        svd_calls[0] += 1
        return inner_basis(*a, **k)

    lra.compute_basis = counted_basis
    t0 = time.monotonic()
    timeout = datetime.timedelta(seconds=60)
    env = init_distributed("gloo", timeout=timeout)
    rank, world = env.rank, env.world_size
    record: dict = {"rank": rank, "world": world, "scenarios": {}, "timings": {}}

    def scenario(name, fn):
        t = time.monotonic()
        try:
            record["scenarios"][name] = fn()
        except Exception:
            record["scenarios"][name] = {"error": traceback.format_exc()}
        record["timings"][name] = time.monotonic() - t

    def new_engine(config, **kw):
        engine = FSDPEngine(engine_args(**kw), env, timeout, config=config)
        model, opt = engine.prepare(make_model(), lambda m: None)
        return engine, model, opt

    def run_steps(engine, model, batches, accum=1, per_rank=LOCAL_BATCH):
        out = {"losses": [], "norms": [], "comm_bytes": [], "int8_bytes": [], "int8_elements": [],
               "gathered_bytes": [], "svd_count": []}
        micro = per_rank // accum
        for x in batches:
            mine = x[rank * per_rank:(rank + 1) * per_rank]
            engine.zero_grad()
            ALL_GATHER_COUNTER.reset()
            g0 = gathered.bytes
            total = 0.0
            for i in range(accum):
                loss = loss_fn(model, mine[i * micro:(i + 1) * micro])
                engine.backward(loss / accum)
                total += float(loss) / accum
            out["gathered_bytes"].append(gathered.bytes - g0)
            out["norms"].append(engine.step())
            m = engine.step_metrics()
            out["losses"].append(engine.mean_over_ranks(total))
            out["comm_bytes"].append(m["comm_bytes"])
            out["int8_bytes"].append(m["int8_all_gather_bytes"])
            out["int8_elements"].append(m["int8_all_gather_elements"])
            out["svd_count"].append(m["svd_count"])
        return out

    def save_full(engine, label):
        state = engine.full_state()
        if rank == 0:
            torch.save(state, out_dir / f"w{world}_{label}.pt")

    def parity():
        engine, model, opt = new_engine(cfg())
        gathered.exclude.append(engine.collectives.group)
        # gloo averaging: this rank's rows of the first step's averaged embedding gradient
        x = global_batches(world, 1, SEEDS["parity"])[0][rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        loss_fn(model, x).backward()
        emb = model.model.embed_tokens.weight.grad.to_local().clone()
        engine.zero_grad()
        before = svd_calls[0]
        out = run_steps(engine, model, global_batches(world, STEPS, SEEDS["parity"]))
        rows = {n: r for n, r in engine.rows.items()}
        out.update(svd_calls=svd_calls[0] - before, owned=sorted(opt.owned), rows=rows,
                   refreshed=sorted({r.name for r in opt.refresh_log()}), memory=opt.memory_bytes(),
                   local_rows={n: int(opt._rows(n)) for n in rows}, emb_rows=int(emb.shape[0]),
                   emb_offset=sum(int(-(-128 // world)) for _ in range(rank)))
        torch.save(emb, out_dir / f"w{world}_r{rank}_embgrad.pt")
        save_full(engine, "parity")
        return out

    def accum():
        out = {}
        first = global_batches(world, 1, SEEDS["accum"], per_rank=4)
        later = global_batches(world, 2, SEEDS["accum"] + 1, per_rank=4)
        for label, acc, sync in (("accum1", 1, "micro_batch"), ("accum2", 2, "micro_batch"),
                                 ("accum2_boundary", 2, "boundary")):
            engine, model, opt = new_engine(cfg(update_proj_gap=100), grad_accum=acc, fsdp_grad_sync=sync)
            run_steps(engine, model, first, accum=acc, per_rank=4)
            out[label] = run_steps(engine, model, later, accum=acc, per_rank=4)
            save_full(engine, label)
        return out

    def adamw8bit():
        """The 8-bit dense AdamW baseline over FSDP2's row shards (the row-sharded placement, no projections)."""
        engine = FSDPEngine(engine_args(optimizer="adamw8bit"), env, timeout)
        model, opt = engine.prepare(make_model(quantized=False), lambda m: None)
        out = run_steps(engine, model, global_batches(world, 4, SEEDS["parity"]))
        save_full(engine, "adamw8bit")
        return out

    def options():
        out = {}
        for label, kw in OPTION_CONFIGS.items():
            engine, model, opt = new_engine(cfg(**kw))
            out[label] = run_steps(engine, model, global_batches(world, STEPS, SEEDS["parity"]))
            save_full(engine, f"options_{label}")
        return out

    def resume(label="", **kw):
        ckdir = out_dir / f"ckpt_w{world}{label}"
        batches = global_batches(world, 5, SEEDS["resume"])
        engine, model, opt = new_engine(cfg(**kw))
        run_steps(engine, model, batches[:3])
        path = engine.save_checkpoint(ckdir, 3, {"engine": "fsdp", "world_size": world, "optimizer_kind": "qgalore"},
                                      None)
        a = run_steps(engine, model, batches[3:])
        save_full(engine, f"resume{label}_a")
        engine2, model2, opt2 = new_engine(cfg(**kw))
        engine2.verify_checkpoint(path)
        point = engine2.load_checkpoint(path)
        b = run_steps(engine2, model2, batches[3:])
        save_full(engine2, f"resume{label}_b")
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        # a damaged shard file is refused on every rank (each rank checks every hash), nothing is loaded
        bad = ckdir / "damaged"
        if rank == 0:
            shutil.copytree(path, bad)
            f = bad / f"model_rank{world - 1:05d}.safetensors"
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        dist.barrier()
        try:
            engine2.verify_checkpoint(bad)
            refused = None
        except Exception as exc:  # noqa: BLE001 - the type is checked by the test
            refused = f"{type(exc).__name__}: {exc}"
        return {"a": a["losses"], "b": b["losses"], "step": point.step, "files": files, "refused": refused}

    def reshard(label, **kw):
        """N -> M: this world saves after 3 steps and continues (the uninterrupted run); then it resumes the *other*
        world's checkpoint (2 <-> 3 ranks) and continues from it. The global batch (6 rows) is the same at both."""
        per_rank = RESHARD_BATCH // world
        batches = global_batches(world, 5, SEEDS["resume"], per_rank=per_rank)
        engine, model, opt = new_engine(cfg(**kw))
        run_steps(engine, model, batches[:3], per_rank=per_rank)
        mine = out_dir / f"reshard_{label}_w{world}"
        engine.save_checkpoint(mine, 3, {"engine": "fsdp", "world_size": world, "optimizer_kind": "qgalore"}, None)
        a = run_steps(engine, model, batches[3:], per_rank=per_rank)
        save_full(engine, f"reshard_{label}_a")
        other = out_dir / f"reshard_{label}_w{5 - world}" / "step_000003"
        deadline = time.monotonic() + 300
        while not (other / "trainer.json").is_file():  # published by rename: complete once it exists
            if time.monotonic() > deadline:
                raise TimeoutError(f"{other} never appeared")
            time.sleep(0.2)
        engine2, model2, opt2 = new_engine(cfg(**kw))
        engine2.verify_checkpoint(other)
        point = engine2.load_checkpoint(other)
        b = run_steps(engine2, model2, batches[3:], per_rank=per_rank)
        save_full(engine2, f"reshard_{label}_b")
        # the single-device engine's checkpoint (written by the test before the ranks started; no refresh after
        # step 0, see CROSS_GAP), resumed here, saved again as this world's fsdp checkpoint (the test resumes that
        # on one device), then continued
        engine3, model3, _ = new_engine(cfg(**{**kw, "update_proj_gap": CROSS_GAP}))
        engine3.load_checkpoint(out_dir / f"reshard_{label}_local" / "step_000003")
        engine3.save_checkpoint(out_dir / f"cross_{label}_w{world}", 3,
                                {"engine": "fsdp", "world_size": world, "optimizer_kind": "qgalore"}, None)
        c = run_steps(engine3, model3, batches[3:], per_rank=per_rank)
        save_full(engine3, f"reshard_{label}_c")
        return {"a": a["losses"], "b": b["losses"], "c": c["losses"], "svd_a": a["svd_count"],
                "svd_b": b["svd_count"], "svd_c": c["svd_count"], "step": point.step, "owned": sorted(opt2.owned)}

    def ddp_cross(label, **kw):
        """ddp <-> local <-> fsdp: the ddp engine resumes the single-device checkpoint and saves its own (owners'
        matrices, rank 0's dense state); fsdp resumes the *other* world's ddp checkpoint, ddp the other world's
        fsdp one — each continues as the single-device run does."""
        import qgalore_dist.train.optimizers as topt
        from qgalore_dist.train.engines.ddp import DDPEngine

        config = cfg(**{**kw, "update_proj_gap": CROSS_GAP})
        per_rank = RESHARD_BATCH // world
        later = global_batches(world, 5, SEEDS["resume"], per_rank=per_rank)[3:]

        def ddp_engine():
            real = topt.qgalore_config
            topt.qgalore_config = lambda args: config  # the parity config (its sizes are not all flags)
            try:
                engine = DDPEngine(engine_args(engine="ddp"), env, timeout)
                model, _ = engine.prepare(make_model(), lambda m: None)
            finally:
                topt.qgalore_config = real
            return engine, model

        def steps(engine, model):
            losses = []
            for x in later:
                engine.zero_grad()
                loss = loss_fn(model, x[rank * per_rank:(rank + 1) * per_rank])
                engine.backward(loss)
                engine.step()
                losses.append(engine.mean_over_ranks(float(loss)))
            return losses

        def wait_for(path):
            deadline = time.monotonic() + 300
            while not (path / "trainer.json").is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} never appeared")
                time.sleep(0.2)
            return path

        engine, model = ddp_engine()
        engine.load_checkpoint(out_dir / f"reshard_{label}_local" / "step_000003")
        engine.save_checkpoint(out_dir / f"ddp_{label}_w{world}", 3,
                               {"engine": "ddp", "world_size": world, "optimizer_kind": "qgalore",
                                "rng": None}, None)
        from_local = steps(engine, model)
        fs, fmodel, _ = new_engine(config)
        fs.load_checkpoint(wait_for(out_dir / f"ddp_{label}_w{5 - world}" / "step_000003"))
        fsdp_from_ddp = run_steps(fs, fmodel, later, per_rank=per_rank)["losses"]
        save_full(fs, f"fsdp_from_ddp_{label}")
        engine2, model2 = ddp_engine()
        engine2.load_checkpoint(wait_for(out_dir / f"cross_{label}_w{5 - world}" / "step_000003"))
        ddp_from_fsdp = steps(engine2, model2)
        if rank == 0:
            torch.save(model2.state_dict(), out_dir / f"w{world}_ddp_from_fsdp_{label}.pt")
        return {"ddp_from_local": from_local, "fsdp_from_ddp": fsdp_from_ddp, "ddp_from_fsdp": ddp_from_fsdp}

    def toy():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from qgalore_dist.nn.int8_fsdp import to_fsdp_int8
        from qgalore_dist.parallel.collectives import Collectives
        from qgalore_dist.parallel.row_sharded import RowShard, RowShardedQGaLoreOptimizer, chunk_rows

        model = ToyInt8()
        to_fsdp_int8(model, torch.float64)
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        model.set_force_sum_reduction_for_comms(True)
        coll = Collectives(timeout=timeout)
        shards, params = [], {}
        for name, (m, n) in TOY_SHAPES.items():
            p = getattr(model, name).weight
            params[f"{name}.weight"] = p
            shards.append(RowShard(f"{name}.weight", (m, n), chunk_rows(m, world),
                                   lambda p=p: p.to_local().int8_weight(), param=p))
        dense = [(n, p) for n, p in model.named_parameters() if n.startswith("head")]
        opt = RowShardedQGaLoreOptimizer(shards, toy_config(), coll, dense=dense,
                                         dense_shapes={n: tuple(p.shape) for n, p in dense}, grad_clip=CLIP,
                                         dense_state_bits=8, stagger_refresh=True)
        losses = []
        for x in toy_batches(world, STEPS):
            loss = model(x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]).pow(2).mean()
            loss.backward()
            opt.step(grads={k: p.grad.to_local() for k, p in params.items()})
            opt.zero_grad()
            t = torch.tensor([float(loss)], dtype=torch.float64)
            dist.all_reduce(t)
            losses.append(float(t) / world)
        state = {}
        for k, p in params.items():
            w = p.to_local()
            state[k] = (w.codes.clone(), w.scales.clone())
        torch.save(state, out_dir / f"w{world}_r{rank}_toy.pt")
        return {"losses": losses, "local_rows": {k: int(p.to_local().shape[0]) for k, p in params.items()},
                "svd_count": opt.svd_count}

    def same_args():
        """Ranks started with different --max-steps: the same UsageError on every rank (one all-gather)."""
        from qgalore_dist.errors import UsageError

        engine = FSDPEngine(engine_args(max_steps=3 + rank), env, timeout)
        try:
            engine._check_same_args()
        except UsageError as exc:
            return {"refused": str(exc)}
        return {"refused": None}

    def dies():
        """The last rank leaves (its sockets close) once the model is sharded; the others' next forward (FSDP2's
        all-gather) must end in one DistributedError line, not a gloo traceback nor a wait for the timeout."""
        from qgalore_dist.errors import DistributedError

        engine, model, _ = new_engine(cfg())
        dist.barrier()
        if rank == world - 1:
            return {"left": True}  # exits below, right after writing its record
        time.sleep(0.5)  # let the last rank go first
        x = global_batches(world, 1, SEEDS["parity"])[0][rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        t = time.monotonic()
        try:
            loss_fn(model, x)  # any other exception: its traceback is the scenario's "error"
        except DistributedError as exc:
            return {"message": str(exc), "seconds": time.monotonic() - t}
        raise AssertionError("the forward succeeded without the last rank")

    def sharded_start():
        """The training loop's start: the model on the meta device, each rank allocating and filling only its rows
        (fresh keyed init, and from a Hugging Face directory); rank 0 saves the gathered state."""
        from qgalore_dist.models import resolve_model_config
        from qgalore_dist.nn.int8_fsdp import Int8RowTensor
        from qgalore_dist.train.loop import pending_training_model

        out = {}
        for label, spec in (("fresh", "llama_tiny"), ("pretrained", str(out_dir / "hf"))):
            args = engine_args(model=spec, seed=7)
            config = resolve_model_config(spec, vocab_size=None if label == "pretrained" else 512)
            engine = FSDPEngine(args, env, timeout)
            pending = pending_training_model(args, config, torch.float32)
            model, _ = engine.prepare(pending, lambda m: None)
            held = {}
            for n, p in model.named_parameters():
                local = p.to_local()
                held[n] = int(local.shape[0]) if p.dim() else 1
                if isinstance(local, Int8RowTensor):
                    assert local.codes.shape[0] == held[n]
            state = engine.full_state()
            if rank == 0:
                torch.save(state, out_dir / f"w{world}_start_{label}.pt")
            out[label] = held
        return out

    scenario("sharded_start", sharded_start)
    scenario("parity", parity)
    scenario("toy", toy)
    scenario("accum", accum)
    scenario("resume", resume)
    scenario("options", options)
    scenario("adamw8bit", adamw8bit)
    scenario("resume_options", lambda: resume("_options", **OPTION_CONFIGS["projfactor_merge"]))
    for label, kw in RESHARD_CONFIGS.items():
        scenario(f"reshard_{label}", lambda label=label, kw=kw: reshard(label, **kw))
    for label, kw in RESHARD_CONFIGS.items():
        scenario(f"ddp_cross_{label}", lambda label=label, kw=kw: ddp_cross(label, **kw))
    scenario("same_args", same_args)
    scenario("dies", dies)
    record["timings"]["total_s"] = time.monotonic() - t0
    (out_dir / f"w{world}_r{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    # no final barrier nor destroy_process_group: the group has lost its last rank ("dies")
    os._exit(0)


def toy_config():
    from qgalore_dist import QGaLoreConfig

    return QGaLoreConfig(rank=2, update_proj_gap=2, scale=0.25, lr=1e-2, weight_group_size=16, proj_group_size=16,
                         state_min_numel=32, state_block_size=16, state_bits=8, fused=False)


def main(argv: list[str]) -> int:
    import multiprocessing as mp

    import transformers  # noqa: F401 - imported once, before forking

    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    procs = []
    for spec in argv[1:]:
        world, port = (int(x) for x in spec.split(":"))
        for r in range(world):
            envv = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(ctx.Process(target=_worker, args=(out_dir, envv)))
    return join_within(procs, 600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
