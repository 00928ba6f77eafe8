"""Issue 6 benchmark: optimizer traffic of the data-parallel engine (``ShardedQGaLoreOptimizer``) versus DDP + AdamW.

One run, real gloo processes on this machine: a ``llama_20m``-shaped model (shipped config, vocabulary 8192; 28
projected matrices 256×256 / 256×688 / 688×256) trained a few steps per world size (2 and 3), comm modes ``full``
and ``lowrank`` (N broadcast in bf16: ``update_dtype=torch.bfloat16``), rank 64 (= min(256, 688)/4), batch 2 × seq
64 of random tokens per rank, fixed refresh gap (``gate=False``) so refresh and non-refresh steps alternate,
global-norm clipping on (so the norm all-reduce is counted too). Every byte is the
:class:`~qgalore_dist.parallel.collectives.Collectives` per-rank counter (``step_counters()`` via the optimizer's
``last_comm``): sent + received through one rank's link per optimizer step, refresh traffic inside backward
included. The dense baseline is plain DDP + AdamW all-reducing bf16 gradients with a ring: ``4·P·(N−1)/N`` bytes
sent and as many received per rank (P parameters) — computed from the model's parameter counts and also measured by
a real bucketed bf16 all-reduce through Collectives. Each measured step is checked against the byte formula of its
mode (below, :func:`step_formula`), which is derived from the optimizer's sends, not from the counters.

Also: per-rank SVD seconds (``phase_times['svd']``; balance = max/mean) and plan-level formulas (no training) for
``llama_60m`` (rank 128) and ``llama_1b`` (rank 512) at world sizes 2, 4, 8 with bf16 gradients.

Ranks are forked from this process after the heavy imports (as ``tests/ddp_worker.py`` does), joined through
:func:`~qgalore_dist.parallel.launch_env.init_distributed` from torchrun-style variables on 127.0.0.1; one world at a
time, so the per-rank SVD timings of one world do not compete with another world's ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import table, write_report  # noqa: E402
from qgalore_dist.optim.lowrank_adamw import effective_rank  # noqa: E402
from qgalore_dist.parallel.collectives import DEFAULT_BUCKET_BYTES, all_reduce_bytes  # noqa: E402
from qgalore_dist.projection.projector import basis_shape, lowrank_shape, projection_side  # noqa: E402
from qgalore_dist.quant.groups import num_groups  # noqa: E402

MODEL = "llama_20m"
VOCAB = 8192
RANK = 64
BATCH, SEQ = 2, 64  # per rank
WEIGHT_GROUP = 256
PROJ_GROUP = 256
CLIP = 1.0
PLAN_MODELS = {"llama_60m": 128, "llama_1b": 512}  # rank = min(m, n)/4 of each (Q-GaLore paper ranks)
PLAN_WORLDS = (2, 4, 8)
PLAN_GAP = 200  # QGaLoreConfig's default update_proj_gap, for the amortised column
MiB = 2**20

FORMULAS = r"""
Byte formulas (per rank per optimizer step; ``sent`` / ``received`` as the Collectives counters count them: ring
all-reduce of a P-byte bucket ⌊2(N−1)P/N⌋ each way; reduce: P sent by every non-destination rank, P received by the
destination; broadcast: P sent by the source, P received by every other rank; all-gather: (N−1)·P each way).
K projected matrices m×n owned by one rank each (the plan), D dense parameters, b = gradient element bytes (4 fp32
model, 2 bf16 model), w = 2 (bf16 wire), L = max(m, n)·r low-rank elements, g = 256 weight group, g' = 256
projector group, basis r×n (m ≥ n) or m×r:

| traffic | `full` | `lowrank` non-refresh | `lowrank` refresh (matrices F due) |
|---|---|---|---|
| presence check | all-reduce 4·(K+D) bytes (int32) | same | same |
| dense gradients | all-reduce of the dense gradients (b·P_dense, 64 MiB buckets) | same | same |
| projected gradients | reduce to owner: m·n·b per matrix | reduce to owner: L·b per matrix | reduce to owner: m·n·b per matrix in F (inside backward), L·b per matrix not in F |
| projector sync | — | — | broadcast from owners: 48 bytes header per matrix in F, then its INT4 basis ⌈rows·cols/2⌉ + 4·rows·⌈cols/g'⌉ |
| clip norm | all-reduce 16 bytes (fp64 ×2) | same | same |
| update | broadcast from owners: INT8 codes m·n + fp32 scales 4·m·⌈n/g⌉ | broadcast from owners: N, L·w per matrix, + 8 bytes step size per matrix | same as non-refresh |

"Broadcast from owners" per dtype: one all-gather ((N−1)·P each way, P = one owner's payload) when every owner's
payload is equal and N·P fits a 64 MiB bucket, else one broadcast per owner. In the broadcast path every rank is
counted the same ``(b+w)·ΣL`` bytes of low-rank traffic at any N (b·L reduced + w·L broadcast per matrix, sent or
received: N−1 ranks send each reduce, the owner receives it; the owner sends each broadcast, N−1 ranks receive it),
against a ring all-reduce of bf16 gradients moving ``8·m·n·(N−1)/N`` per rank (sent + received): a ratio of
``(b+w)·r·N / (8·min(m, n)·(N−1))`` — at N = 2, r = min/4: 0.375 (fp32 gradients), 0.25 (bf16).
The counters' convention counts a reduce's bytes at the destination once and a broadcast's at the source once; a
real chain / ring moves N−1 hops of P for either (intermediate ranks forward), the convention the all-gather and
all-reduce counts already follow. The *link model* columns count every hop at both ends (mean over ranks):
``2·(b+w)·ΣL·(N−1)/N``, a ratio to DDP of ``(b+w)·r / (4·min(m, n))`` at every N — 0.375 / 0.25 at r = min/4. Both
conventions agree at N = 2.
Not counted per step (the benchmark disables them): the replica check, one all-gather of 8·(K+D) bytes each way
per ``replica_check_every`` steps, and the start-up setup check + replica check.
"""


# ------------------------------------------------------------------------------------------------------------
# byte formulas (from what the optimizer sends; independent of the counters)
# ------------------------------------------------------------------------------------------------------------
class _Acc:
    """Per-rank, per-primitive [sent, received] of one step's formula."""

    def __init__(self, world: int, chain: bool = False):
        self.n = world
        self.chain = chain  # reduce / broadcast as a chain: every one of the N−1 hops counted at both ends
        self.by = [dict() for _ in range(world)]

    def add(self, rank: int, prim: str, sent: int, received: int) -> None:
        d = self.by[rank].setdefault(prim, [0, 0])
        d[0] += sent
        d[1] += received

    def all_reduce(self, items: list[tuple[str, int]], label: str, bucket: int = DEFAULT_BUCKET_BYTES) -> None:
        """Ring all-reduce of ``(dtype, bytes)`` tensors, packed greedily per dtype into ``bucket``-byte calls."""
        by_dtype: dict[str, list[int]] = {}
        for dt, b in items:
            if b:
                by_dtype.setdefault(dt, []).append(b)
        for sizes in by_dtype.values():
            cur = 0
            flushed = []
            for b in sizes:
                if cur and cur + b > bucket:
                    flushed.append(cur)
                    cur = 0
                cur += b
            flushed.append(cur)
            for p in flushed:
                x = all_reduce_bytes(p, self.n)
                for r in range(self.n):
                    self.add(r, label, x, x)

    def _chain(self, p: int, label: str) -> None:
        # N−1 hops of p bytes, spread evenly over the ranks (exact for the mean over ranks)
        for r in range(self.n):
            self.add(r, label, (self.n - 1) * p / self.n, (self.n - 1) * p / self.n)

    def reduce_to_owners(self, per_owner: dict[int, int], label: str) -> None:
        for o, p in per_owner.items():
            if not p:
                continue
            if self.chain:
                self._chain(p, label)
                continue
            for r in range(self.n):
                if r == o:
                    self.add(r, label, 0, p)
                else:
                    self.add(r, label, p, 0)

    def broadcast_from_owners(self, per_dtype: list[dict[int, int]], label: str,
                              bucket: int = DEFAULT_BUCKET_BYTES) -> None:
        """``per_dtype``: for each dtype (in the order the owners' tensors first show it), bytes per owner."""
        for sizes in per_dtype:
            s = [sizes.get(o, 0) for o in range(self.n)]
            if len(set(s)) == 1 and s[0] > 0 and s[0] * self.n <= bucket:
                for r in range(self.n):
                    self.add(r, label, (self.n - 1) * s[0], (self.n - 1) * s[0])
            else:
                for o, p in enumerate(s):
                    if not p:
                        continue
                    if self.chain:
                        self._chain(p, label)
                        continue
                    for r in range(self.n):
                        if r == o:
                            self.add(r, label, p, 0)
                        else:
                            self.add(r, label, 0, p)

    def totals(self) -> list[dict]:
        out = []
        for d in self.by:
            sent = sum(v[0] for v in d.values())
            recv = sum(v[1] for v in d.values())
            out.append({"sent": sent, "received": recv, "total": sent + recv,
                        "by": {k: list(v) for k, v in sorted(d.items())}})
        return out


def _lowrank_elems(m: int, n: int, rank: int) -> int:
    r = effective_rank((m, n), rank)
    a, b = lowrank_shape(m, n, r, projection_side(m, n))
    return a * b


def _int4_basis_bytes(m: int, n: int, rank: int, group: int) -> tuple[int, int]:
    r = effective_rank((m, n), rank)
    rows, cols = basis_shape(m, n, r, projection_side(m, n))
    return (rows * cols + 1) // 2, 4 * rows * num_groups(cols, min(group, cols))


def step_formula(shapes: dict[str, tuple[int, int]], dense: list[tuple[str, int]], owner: dict[str, int],
                 world: int, mode: str, refreshed: set[str], grad_bytes: int, rank: int, wire_bytes: int = 2,
                 clip: bool = True, weight_group: int = WEIGHT_GROUP, proj_group: int = PROJ_GROUP,
                 chain: bool = False) -> list[dict]:
    """Bytes each rank sends / receives in one optimizer step (see :data:`FORMULAS`); labels: ``control``
    (presence check + clip norm), ``dense``, ``projected`` (gradient reduce + update broadcast), ``refresh``
    (full-gradient reduce + projector sync of the matrices due). ``dense``: ``(dtype, bytes)`` of each dense
    gradient, model order. Every projected matrix has a gradient every step (one forward per step).
    ``chain=True``: the link model instead of the counters' convention (every reduce / broadcast hop counted at
    both ends; only the mean over ranks is meaningful)."""
    acc = _Acc(world, chain)
    names = list(shapes)
    k, d = len(names), len(dense)
    acc.all_reduce([("int32", 4 * (k + d))], "control")  # _present
    acc.all_reduce(dense, "dense")
    if clip:
        acc.all_reduce([("float64", 16)], "control")
    if mode == "full":
        acc.reduce_to_owners(_sum_by_owner(names, owner, lambda n: shapes[n][0] * shapes[n][1] * grad_bytes),
                             "projected")
        acc.broadcast_from_owners([
            _sum_by_owner(names, owner, lambda n: shapes[n][0] * shapes[n][1]),  # int8 codes
            _sum_by_owner(names, owner, lambda n: 4 * shapes[n][0] * num_groups(shapes[n][1], min(
                weight_group, shapes[n][1])))], "projected")  # fp32 scales
        return acc.totals()
    if mode != "lowrank":
        raise ValueError(mode)
    due = [n for n in names if n in refreshed]
    if due:
        acc.reduce_to_owners(_sum_by_owner(due, owner, lambda n: shapes[n][0] * shapes[n][1] * grad_bytes),
                             "refresh")
        acc.broadcast_from_owners([_sum_by_owner(due, owner, lambda n: 48)], "refresh")  # int64 headers
        acc.broadcast_from_owners([
            _sum_by_owner(due, owner, lambda n: _int4_basis_bytes(*shapes[n], rank, proj_group)[0]),  # uint8 codes
            _sum_by_owner(due, owner, lambda n: _int4_basis_bytes(*shapes[n], rank, proj_group)[1])],  # fp32 scales
            "refresh")
    rest = [n for n in names if n not in refreshed]
    acc.reduce_to_owners(_sum_by_owner(rest, owner, lambda n: _lowrank_elems(*shapes[n], rank) * grad_bytes),
                         "projected")
    acc.broadcast_from_owners([
        _sum_by_owner(names, owner, lambda n: _lowrank_elems(*shapes[n], rank) * wire_bytes),  # N
        _sum_by_owner(names, owner, lambda n: 8)], "projected")  # fp64 step sizes
    return acc.totals()


def _sum_by_owner(names, owner, nbytes) -> dict[int, int]:
    out: dict[int, int] = {}
    for n in names:
        out[owner[n]] = out.get(owner[n], 0) + nbytes(n)
    return out


def ddp_bytes(params: int, world: int, grad_bytes: int = 2) -> int:
    """Plain DDP + AdamW: ring all-reduce of the gradients, bytes *sent* per rank (= received):
    2·(N−1)/N · b·P, i.e. 4·P·(N−1)/N for bf16."""
    return 2 * (world - 1) * grad_bytes * params // world


def model_layout(model_name: str, vocab: int | None = None):
    """(projected shapes {name: (m, n)}, dense [(name, numel)]) from a meta build (no storage)."""
    from qgalore_dist.models import build_model, resolve_model_config
    from qgalore_dist.parallel.plan import model_matrix_shapes

    config = resolve_model_config(model_name, vocab_size=vocab)
    model = build_model(config, meta=True)
    shapes = model_matrix_shapes(model)
    dense = [(n, p.numel()) for n, p in model.named_parameters() if n not in shapes]
    return config, shapes, dense


def lowrank_plan(shapes, world: int, rank: int):
    """The ownership plan the engine computes by default (``default_plan`` with this config's options)."""
    from qgalore_dist.config import QGaLoreConfig
    from qgalore_dist.parallel.plan import make_plan, plan_options

    return make_plan(shapes, world, **plan_options(QGaLoreConfig(rank=rank, weight_group_size=WEIGHT_GROUP,
                                                                 proj_group_size=PROJ_GROUP)))


# ------------------------------------------------------------------------------------------------------------
# rank side
# ------------------------------------------------------------------------------------------------------------
def _batch(step: int, world: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    x = torch.randint(0, VOCAB, (world * BATCH, SEQ), generator=g)
    return x[rank * BATCH:(rank + 1) * BATCH]


def _train_run(coll, rank: int, world: int, dtype: torch.dtype, mode: str, steps: int, gap: int) -> dict:
    from qgalore_dist import QGaLoreConfig, quantize_model
    from qgalore_dist.models import build_model, resolve_model_config
    from qgalore_dist.parallel import ShardedQGaLoreOptimizer

    torch.manual_seed(0)  # identical initial weights on every rank
    model = build_model(resolve_model_config(MODEL, vocab_size=VOCAB), dtype=dtype)
    quantize_model(model, group_size=WEIGHT_GROUP, seed=0)
    cfg = QGaLoreConfig(rank=RANK, update_proj_gap=gap, gate=False, fused=False, weight_group_size=WEIGHT_GROUP,
                        proj_group_size=PROJ_GROUP, lr=1e-3)
    opt = ShardedQGaLoreOptimizer(model, cfg, coll, comm_mode=mode,
                                  update_dtype=torch.bfloat16 if mode == "lowrank" else None,
                                  replica_check_every=0, grad_clip=CLIP)
    per_step, losses, step_s = [], [], []
    for t in range(steps):
        t0 = time.perf_counter()
        x = _batch(t, world, rank, seed=7)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        per_step.append(opt.last_comm)
    bad = opt.check_replicas()  # replicas still bit-identical after the run (not part of the step counters)
    coll.reset_step()
    return {"dtype": str(dtype).removeprefix("torch."), "mode": mode, "steps": per_step, "losses": losses,
            "step_s": step_s, "svd_s": opt.phase_times["svd"], "phase_times": dict(opt.phase_times),
            "svd_count": opt.svd_count, "owned": sorted(opt.owned), "owner": dict(opt.plan.owner),
            "refreshed": [[r.step, r.name] for r in opt.refresh_log()], "replica_mismatch": bad,
            "startup_comm": opt.startup_comm["comm_bytes"],
            "grad_bytes": torch.empty(0, dtype=dtype).element_size()}


def _ddp_measure(coll, shapes, dense) -> dict:
    """A real bucketed ring all-reduce of bf16 gradients of every parameter through Collectives (the dense
    baseline): projected matrices alone, dense parameters alone, the whole model in one call."""
    out = {}
    proj = [torch.zeros(m, n, dtype=torch.bfloat16) for m, n in shapes.values()]
    dns = [torch.zeros(numel, dtype=torch.bfloat16) for _, numel in dense]
    for label, ts in (("projected", proj), ("dense", dns), ("whole", proj + dns)):
        coll.reset_step()
        coll.all_reduce(ts, op="avg")
        c = coll.reset_step()
        out[label] = {"sent": c["comm_bytes_sent"], "received": c["comm_bytes_received"], "calls": c["comm_calls"]}
    return out


def _rank_main(out_dir: str, env_vars: dict, opts: dict) -> None:
    os.environ.update(env_vars, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    record: dict = {"runs": []}
    try:
        from qgalore_dist.parallel import Collectives
        from qgalore_dist.parallel.launch_env import init_distributed

        env = init_distributed("gloo", timeout=datetime.timedelta(seconds=600))
        rank, world = env.rank, env.world_size
        record.update(rank=rank, world=world)
        coll = Collectives(timeout=datetime.timedelta(seconds=600))
        for dt in opts["dtypes"]:
            for mode in opts["modes"]:
                record["runs"].append(_train_run(coll, rank, world, getattr(torch, dt), mode, opts["steps"],
                                                 opts["gap"]))
        _, shapes, dense = model_layout(MODEL, VOCAB)
        record["ddp_measured"] = _ddp_measure(coll, shapes, dense)
        coll.barrier()
    except Exception:
        record["error"] = traceback.format_exc()
    Path(out_dir, f"r{env_vars['RANK']}.json").write_text(json.dumps(record))
    os._exit(0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, opts: dict, timeout_s: float) -> list[dict]:
    """Fork ``world`` ranks, wait (bounded), return their records in rank order."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (heavy imports shared by the forked ranks)

    import qgalore_dist.parallel  # noqa: F401

    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_rank_main, args=(out, {
            "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}, opts)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        recs = []
        for r in range(world):
            f = Path(out, f"r{r}.json")
            rec = json.loads(f.read_text()) if f.exists() else {"error": "no record (killed or crashed)"}
            if "error" in rec:
                raise SystemExit(f"world {world} rank {r} failed:\n{rec['error']}")
            recs.append(rec)
        return recs


# ------------------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------------------
def _proj_bytes(by: dict) -> int:
    """Projected-matrix traffic of a step from a per-primitive breakdown: everything but all-reduces (which
    carry only the dense gradients and the control scalars)."""
    return sum(v["sent"] + v["received"] for k, v in by.items() if k != "all_reduce")


def _formula_proj(f: dict) -> int:
    return sum(s + r for k, (s, r) in f["by"].items() if k in ("projected", "refresh"))


def analyse_world(world: int, recs: list[dict], shapes, dense_numel) -> dict:
    n_runs = len(recs[0]["runs"])
    params_proj = sum(m * n for m, n in shapes.values())
    params_dense = sum(n for _, n in dense_numel)
    ddp = {"projected": ddp_bytes(params_proj, world), "whole": ddp_bytes(params_proj + params_dense, world)}
    runs = []
    for i in range(n_runs):
        rr = [rec["runs"][i] for rec in recs]
        mode, dt, gb = rr[0]["mode"], rr[0]["dtype"], rr[0]["grad_bytes"]
        owner = rr[0]["owner"]
        plan = lowrank_plan(shapes, world, RANK)
        assert all(r["owner"] == owner for r in rr) and owner == plan.owner, "plan differs between ranks / formula"
        refreshed_at: dict[int, set[str]] = {}
        for r in rr:
            for step, name in r["refreshed"]:
                refreshed_at.setdefault(step, set()).add(name)
        dense = [(dt, numel * gb) for _, numel in dense_numel]
        steps = []
        for t in range(len(rr[0]["steps"])):
            due = refreshed_at.get(t, set()) if mode == "lowrank" else set()
            kind = "refresh" if refreshed_at.get(t) else "non-refresh"
            form = step_formula(shapes, dense, owner, world, mode, due, gb, RANK)
            link = step_formula(shapes, dense, owner, world, mode, due, gb, RANK, chain=True)
            meas = [r["steps"][t] for r in rr]
            per_rank = []
            for rk in range(world):
                m_tot, f_tot = meas[rk]["comm_bytes"], form[rk]["total"]
                per_rank.append({"measured": m_tot, "formula": f_tot,
                                 "rel_err": abs(m_tot - f_tot) / f_tot,
                                 "measured_projected": _proj_bytes(meas[rk]["by_primitive"]),
                                 "formula_projected": _formula_proj(form[rk]),
                                 "sent": meas[rk]["comm_bytes_sent"], "received": meas[rk]["comm_bytes_received"],
                                 "by_primitive": meas[rk]["by_primitive"], "formula_by": form[rk]["by"]})
            labels = sorted({k for f in form for k in f["by"]})
            breakdown = {k: sum(sum(f["by"].get(k, (0, 0))) for f in form) / world for k in labels}
            if any(s["kind"] == kind for s in steps):  # breakdowns kept for the first step of each kind only
                for r in per_rank:
                    del r["by_primitive"], r["formula_by"]
            steps.append({"step": t, "kind": kind, "refreshed": len(refreshed_at.get(t, ())), "ranks": per_rank,
                          "formula_mean_by_label": breakdown,
                          "link_model_projected_mean": sum(_formula_proj(f) for f in link) / world,
                          "link_model_total_mean": sum(f["total"] for f in link) / world})
        svd = [r["svd_s"] for r in rr]
        mean_svd = sum(svd) / len(svd)
        runs.append({"mode": mode, "dtype": dt, "grad_bytes": gb, "steps": steps,
                     "svd_s": svd, "svd_balance": max(svd) / mean_svd if mean_svd > 0 else 1.0,
                     "svd_count": [r["svd_count"] for r in rr], "owned": [len(r["owned"]) for r in rr],
                     "plan_balance": plan.balance(), "plan_cost_share": [c / plan.total_cost for c in plan.svd_cost],
                     "losses": [r["losses"] for r in rr], "step_s": [r["step_s"] for r in rr],
                     "replica_mismatch": [r["replica_mismatch"] for r in rr],
                     "startup_comm": [r["startup_comm"] for r in rr]})
    return {"world": world, "params_projected": params_proj, "params_dense": params_dense, "ddp_bf16_sent": ddp,
            "ddp_measured": [rec["ddp_measured"] for rec in recs], "runs": runs}


def _agg(steps: list[dict], key: str) -> tuple[float, float]:
    """(mean, max) of a per-rank ``key`` over the ranks and the given steps."""
    vals = [r[key] for st in steps for r in st["ranks"]]
    return sum(vals) / len(vals), max(vals)


def _kinds(run: dict) -> list[tuple[str, list[dict]]]:
    """Step groups to report: full mode's traffic does not depend on refreshes (one group, "every")."""
    if run["mode"] == "full":
        return [("every", run["steps"])]
    return [(k, [s for s in run["steps"] if s["kind"] == k]) for k in ("non-refresh", "refresh")]


def plan_level(model_name: str, rank: int, worlds=PLAN_WORLDS) -> list[dict]:
    """Formula bytes per rank per step for a model with bf16 gradients and a bf16 wire (no training)."""
    config, shapes, dense = model_layout(model_name)
    pp = sum(m * n for m, n in shapes.values())
    pd = sum(n for _, n in dense)
    dense_b = [("bfloat16", 2 * n) for _, n in dense]
    out = []
    for w in worlds:
        owner = lowrank_plan(shapes, w, rank).owner
        row = {"model": model_name, "rank": rank, "world": w, "params": pp + pd, "params_projected": pp,
               "ddp_whole": 2 * ddp_bytes(pp + pd, w), "ddp_projected": 2 * ddp_bytes(pp, w)}
        for label, mode, due in (("full", "full", set()), ("lowrank", "lowrank", set()),
                                 ("lowrank_refresh", "lowrank", set(shapes))):
            f = step_formula(shapes, dense_b, owner, w, mode, due, 2, rank)
            link = step_formula(shapes, dense_b, owner, w, mode, due, 2, rank, chain=True)
            row[label] = {"mean": sum(x["total"] for x in f) / w, "max": max(x["total"] for x in f),
                          "proj_mean": sum(_formula_proj(x) for x in f) / w,
                          "proj_max": max(_formula_proj(x) for x in f),
                          "link_mean": sum(x["total"] for x in link) / w,
                          "link_proj_mean": sum(_formula_proj(x) for x in link) / w}
        row["lowrank_amortised"] = row["lowrank"]["mean"] + (row["lowrank_refresh"]["mean"]
                                                             - row["lowrank"]["mean"]) / PLAN_GAP
        out.append(row)
    return out


def _mib(b: float) -> str:
    return f"{b / MiB:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,3", help="comma-separated world sizes (one run each, in turn)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gap", type=int, default=2, help="update_proj_gap (fixed: gate off)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="model dtypes (gradient dtype follows)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per world before its ranks are killed")
    ap.add_argument("--no-report", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args(argv)
    opts = {"steps": args.steps, "gap": args.gap, "dtypes": args.dtypes.split(","), "modes": ["full", "lowrank"]}
    worlds = [int(w) for w in args.worlds.split(",")]
    torch.set_num_threads(1)

    _, shapes, dense_numel = model_layout(MODEL, VOCAB)
    results, wall = [], {}
    for w in worlds:
        t0 = time.monotonic()
        recs = run_world(w, opts, args.timeout)
        wall[w] = time.monotonic() - t0
        results.append(analyse_world(w, recs, shapes, dense_numel))
        print(f"world {w}: {wall[w]:.0f} s", flush=True)
    plans = [row for name, r in PLAN_MODELS.items() for row in plan_level(name, r)]

    # --- tables ---------------------------------------------------------------------------------------------
    pp = results[0]["params_projected"]
    pd = results[0]["params_dense"]
    rows, brk_rows, checks, max_err = [], [], [], 0.0
    for res in results:
        w = res["world"]
        ddp_p, ddp_w = 2 * res["ddp_bf16_sent"]["projected"], 2 * res["ddp_bf16_sent"]["whole"]
        meas = res["ddp_measured"]
        m_whole = max(m["whole"]["sent"] + m["whole"]["received"] for m in meas)
        m_proj = max(m["projected"]["sent"] + m["projected"]["received"] for m in meas)
        err = max(abs(m["whole"]["sent"] + m["whole"]["received"] - ddp_w) / ddp_w for m in meas)
        rows.append([w, "DDP+AdamW bf16, formula", "-", "every", _mib(ddp_w), _mib(ddp_w), _mib(ddp_w), "-",
                     _mib(ddp_p), "1", "1", "1", "1"])
        rows.append([w, "DDP+AdamW bf16, all-reduce run", "-", "every", _mib(m_whole), _mib(m_whole), _mib(ddp_w),
                     f"{err:.1e}", _mib(m_proj), f"{m_proj / ddp_p:.3f}", "", f"{m_whole / ddp_w:.3f}", ""])
        for run in res["runs"]:
            for kind, steps in _kinds(run):
                mean_m, max_m = _agg(steps, "measured")
                mean_f, _ = _agg(steps, "formula")
                _, e = _agg(steps, "rel_err")
                max_err = max(max_err, e)
                mean_pm, max_pm = _agg(steps, "measured_projected")
                link_p = sum(s["link_model_projected_mean"] for s in steps) / len(steps)
                link_t = sum(s["link_model_total_mean"] for s in steps) / len(steps)
                rows.append([w, run["mode"], run["dtype"], f"{kind} ({len(steps)})", _mib(mean_m), _mib(max_m),
                             _mib(mean_f), f"{e:.1e}", _mib(mean_pm), f"{max_pm / ddp_p:.3f}",
                             f"{link_p / ddp_p:.3f}", f"{max_m / ddp_w:.3f}", f"{link_t / ddp_w:.3f}"])
                if run["mode"] == "lowrank" and kind == "non-refresh":
                    checks.append((w, run["dtype"], max_pm / ddp_p, link_p / ddp_p, max_m / ddp_w, link_t / ddp_w))
                by = steps[0]["formula_mean_by_label"]
                brk_rows.append([w, run["mode"], run["dtype"], kind, f"{by.get('control', 0):.0f}",
                                 *(_mib(by.get(k, 0)) for k in ("dense", "projected", "refresh"))])
    svd_rows = []
    for res in results:
        for run in res["runs"]:
            svd_rows.append([res["world"], run["mode"], run["dtype"], " / ".join(f"{x:.2f}" for x in run["svd_s"]),
                             f"{run['svd_balance']:.3f}", f"{run['plan_balance']:.3f}",
                             " / ".join(str(c) for c in run["svd_count"]),
                             " / ".join(str(c) for c in run["owned"])])
    plan_rows = []
    for row in plans:
        plan_rows.append([row["model"], row["rank"], row["world"], f"{row['params'] / 1e6:.1f}",
                          _mib(row["ddp_whole"]), _mib(row["full"]["max"]), _mib(row["lowrank"]["max"]),
                          _mib(row["lowrank_refresh"]["max"]), _mib(row["lowrank_amortised"]),
                          f"{row['lowrank']['proj_max'] / row['ddp_projected']:.3f}",
                          f"{row['lowrank']['link_proj_mean'] / row['ddp_projected']:.3f}",
                          f"{row['lowrank']['max'] / row['ddp_whole']:.3f}",
                          f"{row['lowrank']['link_mean'] / row['ddp_whole']:.3f}",
                          f"{row['full']['max'] / row['ddp_whole']:.3f}"])

    proj_ok = all(c[2] <= 0.5 and c[3] <= 0.5 for c in checks)
    err_ok = max_err <= 0.05
    plan_worst = max(max(row["lowrank"]["proj_max"] / row["ddp_projected"],
                         row["lowrank"]["link_proj_mean"] / row["ddp_projected"]) for row in plans)
    plan_ok = plan_worst <= 0.5
    mshapes = sorted({v for v in shapes.values()})
    md = [
        f"`{MODEL}` shapes (shipped config, vocabulary {VOCAB}): {len(shapes)} projected matrices "
        f"({', '.join(f'{m}×{n}' for m, n in mshapes)}; {pp / 1e6:.3f} M elements) + {len(dense_numel)} dense "
        f"parameters ({pd / 1e6:.3f} M — embeddings + head, {100 * pd / (pp + pd):.0f}% of the model). Rank {RANK} "
        f"(= min(256, 688)/4), batch {BATCH} × seq {SEQ} random tokens per rank, {args.steps} steps, fixed refresh "
        f"gap {args.gap} (`gate=False`: every matrix refreshes at steps 0, {args.gap}, …), global-norm clipping "
        f"{CLIP}, `fused=False`, replica checks off; `lowrank` broadcasts N in bf16 (`update_dtype=torch.bfloat16`). "
        f"Gloo ranks forked on this machine, one world at a time (wall: "
        + ", ".join(f"N={w}: {x:.0f} s" for w, x in wall.items()) + ").",
        "",
        "Bytes per rank per optimizer step, **sent + received**, MiB, from the Collectives counters. DDP + AdamW is "
        "a ring all-reduce of bf16 gradients, 4·P·(N−1)/N bytes sent and as many received per rank (P parameters); "
        "the *all-reduce run* row is that all-reduce actually run through Collectives (64 MiB buckets). *dtype*: "
        "model / gradient dtype; *steps*: which steps (how many), mean and max over ranks and those steps; *err*: "
        "largest |measured − formula| / formula over ranks and steps; *proj*: projected-matrix traffic (everything "
        "but the all-reduces: gradient reduces, update and projector broadcasts); *ratio* columns: worst rank's "
        "bytes over DDP's (counters), and the link model's mean over DDP's (see the formulas below).",
        "",
        table(["N", "method", "dtype", "steps", "mean", "max", "formula mean", "err", "proj mean",
               "proj / DDP proj", "proj / DDP proj (link)", "whole / DDP", "whole / DDP (link)"], rows),
        "",
        "Where the bytes go (formula, mean over ranks, MiB per step): *control* (bytes) = presence check + clip "
        "norm all-reduces, *dense* = dense-gradient all-reduce, *projected* = gradient reduces + update broadcast, "
        "*refresh* = full-gradient reduce + projector sync inside backward:",
        "",
        table(["N", "mode", "dtype", "steps", "control B", "dense", "projected", "refresh"], brk_rows),
        "",
        f"Plan-level formulas (no training; bf16 gradients, bf16 wire, shipped vocabulary 32000, every matrix "
        f"refreshing on a refresh step; *amortised* = mean of non-refresh + (refresh − non-refresh)/{PLAN_GAP}, the "
        f"default gap). MiB per step, sent + received, worst rank (counters' convention) unless marked *link* "
        f"(link model, mean over ranks); DDP = 8·P·(N−1)/N:",
        "",
        table(["model", "rank", "N", "params M", "DDP bf16", "full", "lowrank", "lowrank refresh",
               "lowrank amortised", "lowrank proj / DDP proj", "same (link)", "lowrank / DDP", "same (link)",
               "full / DDP"], plan_rows),
        "",
        "Refresh (SVD) seconds per rank (`phase_times['svd']`, all refreshes of the run; the ranks share 2 busy "
        "cores, so the timings are noisy) against the plan's cost model (max/mean of Σ m·n·min(m, n) per rank):",
        "",
        table(["N", "mode", "dtype", "SVD s per rank", "balance max/mean", "plan balance", "SVDs per rank",
               "matrices owned"], svd_rows),
        "",
        FORMULAS.strip(),
        "",
        f"* Measured bytes match the formulas: largest relative error **{max_err:.1e}** over every rank and step "
        f"({'within' if err_ok else 'OUTSIDE'} 5%).",
        "* Target — projected matrices, `lowrank` non-refresh ≤ 0.5× DDP + AdamW (bf16) for them, r ≤ min(m, n)/4, "
        "bf16 broadcast: " + "; ".join(f"N={w} {dt}: **{a:.3f}×** (link {b:.3f}×)" for w, dt, a, b, _, _ in checks)
        + f" → **{'met' if proj_ok else 'MISSED'}**; plan-level llama_60m / llama_1b at N = 2, 4, 8: "
        f"**{'met' if plan_ok else 'MISSED'}** (worst {plan_worst:.3f}×).",
        "* Whole model (embeddings + head are dense, all-reduced in the gradient dtype): `lowrank` non-refresh moves "
        + "; ".join(f"N={w} {dt}: {a:.3f}× (link {b:.3f}×)" for w, dt, _, _, a, b in checks)
        + " of DDP's bytes. The fp32 runs all-reduce fp32 dense gradients — twice DDP's bf16 bytes for the 57% of "
        "this small model that is embeddings — so only the bf16 runs compare like for like; refresh steps add the "
        "full-gradient reduce (one step in `update_proj_gap`).",
    ]
    data = {"model": MODEL, "vocab": VOCAB, "rank": RANK, "batch": BATCH, "seq": SEQ, "steps": args.steps,
            "update_proj_gap": args.gap, "grad_clip": CLIP, "wall_s": wall, "measured": results,
            "plan_level": plans, "max_rel_err": max_err, "target_projected_met": proj_ok,
            "target_plan_level_met": plan_ok, "formula_within_5pct": err_ok, "formulas": FORMULAS.strip()}
    if args.no_report:
        print("\n".join(md))
    else:
        write_report("bench_comm", "Data-parallel optimizer traffic: full / lowrank vs DDP + AdamW (issue 6)", data,
                     "\n".join(md))


if __name__ == "__main__":
    main()
