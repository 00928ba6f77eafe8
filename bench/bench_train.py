"""Issue 4 benchmark: end-to-end pre-training of llama_60m on the embedded corpus, methods side by side.

All methods live in ONE process on one thread (``torch.set_num_threads(1)``) and advance *interleaved*: round k
runs step k of every method on the same batch, one after the other. On a shared machine a change of load then hits
every method alike, so the step-time ratios stay meaningful even when absolute times drift. Methods (issue 4):

* ``torch AdamW`` — ``torch.optim.AdamW`` on the fp32 model, lr 1e-3;
* ``galore-torch GaLoreAdamW`` — the published optimizer (``galore_torch.adamw.AdamW``) on the fp32 model, rank
  128 for every attention/MLP linear, ``update_proj_gap``, scale 0.25, lr 0.015 (dense params same lr);
* ``qgalore gated`` / ``qgalore fixed gap`` — :class:`~qgalore_dist.optim.QGaLoreOptimizer` on the INT8 model (INT4
  projectors, 8-bit low-rank and dense moments, layer-wise accumulation, staggered refreshes), rank 128, lr 0.015,
  with and without the convergence gate;
* optionally ``qgalore_dist float`` (``--methods``) — the float reference mode.

Every method: cosine schedule with 10% warm-up to 0.1×, global-norm clipping 1.0, Adam ε 1e-6, no weight decay.
Partial results (every ``--save-every`` rounds) go to ``--out`` as JSON; ``--report-from`` turns such a file —
finished or not — into the docs/benchmarks.md section and the loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import DOCS, table, write_report  # noqa: E402

ALL_METHODS = ("torch AdamW", "galore-torch GaLoreAdamW", "qgalore gated", "qgalore fixed gap", "qgalore_dist float")
DEFAULT_METHODS = ALL_METHODS[:4]
PHASES = ("forward", "backward", "svd", "projection", "optimizer", "requantize")


def _rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class GaloreTimers:
    """Time galore-torch's SVD and projections by wrapping its projector's methods (class-level, once)."""

    def __init__(self) -> None:
        self.svd = 0.0
        self.projection = 0.0
        self.calls = 0  # SVDs (one per refresh of one matrix)
        from bench.bench_core import galore_adamw_class

        galore_adamw_class()  # registers galore_torch without its __init__ (which imports bitsandbytes)
        from galore_torch.galore_projector import GaLoreProjector

        timers = self
        orig_orth, orig_proj, orig_back = (GaLoreProjector.get_orthogonal_matrix, GaLoreProjector.project,
                                           GaLoreProjector.project_back)

        def orth(self_, *a, **k):
            timers.calls += 1
            t = time.perf_counter()
            try:
                return orig_orth(self_, *a, **k)
            finally:
                timers.svd += time.perf_counter() - t

        def proj(self_, *a, **k):  # includes the SVD when due: subtracted below
            t, s0 = time.perf_counter(), timers.svd
            try:
                return orig_proj(self_, *a, **k)
            finally:
                timers.projection += time.perf_counter() - t - (timers.svd - s0)

        def back(self_, *a, **k):
            t = time.perf_counter()
            try:
                return orig_back(self_, *a, **k)
            finally:
                timers.projection += time.perf_counter() - t

        GaLoreProjector.get_orthogonal_matrix, GaLoreProjector.project, GaLoreProjector.project_back = orth, proj, back


class Method:
    """One model + optimizer + scheduler, stepped one round at a time, with its own timings."""

    def __init__(self, label: str, args, config, galore_timers: GaloreTimers | None) -> None:
        from qgalore_dist.nn.convert import find_target_linears
        from qgalore_dist.optim import QGaLoreOptimizer
        from qgalore_dist.train.cli import parse_args
        from qgalore_dist.train.loop import build_training_model
        from qgalore_dist.train.optimizers import ADAM_EPS, TorchAdamW, qgalore_config
        from qgalore_dist.train.schedule import build_scheduler

        self.label = label
        self.kind = {"torch AdamW": "adamw", "galore-torch GaLoreAdamW": "galore_torch", "qgalore gated": "qgalore",
                     "qgalore fixed gap": "qgalore", "qgalore_dist float": "galore"}[label]
        lr = 1e-3 if self.kind == "adamw" else args.lr
        cli_opt = {"adamw": "adamw", "galore_torch": "adamw", "qgalore": "qgalore", "galore": "galore"}[self.kind]
        targs = parse_args(["--model", args.model, "--optimizer", cli_opt, "--rank", str(args.rank),
                            "--update-proj-gap", str(args.gap), "--lr", str(lr), "--batch-size", str(args.batch),
                            "--seq-len", str(args.seq), "--max-steps", str(args.steps), "--seed", "0",
                            "--grad-clip", str(args.grad_clip)])
        rss0 = _rss_bytes()
        self.model = build_training_model(targs, config, torch.device("cpu"), torch.float32)
        self.galore_timers = galore_timers
        self.grad_clip = args.grad_clip
        if self.kind == "adamw":
            self.opt = TorchAdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0,
                                  grad_clip=args.grad_clip)
        elif self.kind == "galore_torch":
            from bench.bench_core import galore_adamw_class

            targets = {id(m.weight) for m in find_target_linears(self.model, tuple(targs.target_module_list)).values()}
            lowrank = [p for p in self.model.parameters() if id(p) in targets]
            regular = [p for p in self.model.parameters() if id(p) not in targets]
            self.opt = galore_adamw_class()(
                [{"params": regular}, {"params": lowrank, "rank": args.rank, "update_proj_gap": args.gap,
                                       "scale": 0.25, "proj_type": "std"}],
                lr=lr, eps=ADAM_EPS, weight_decay=0.0, no_deprecation_warning=True)
        else:
            cfg = qgalore_config(targs)
            if label == "qgalore gated":
                cfg = cfg.replace(gate=True, queue_size=args.gate_queue, gamma_proj=args.gate_gamma,
                                  cos_threshold=args.gate_threshold)
            elif label == "qgalore fixed gap":
                cfg = cfg.replace(gate=False)
            self.opt = QGaLoreOptimizer(self.model, cfg, dense_state_bits=8 if self.kind == "qgalore" else 32,
                                        target_modules=tuple(targs.target_module_list), stagger_refresh=True,
                                        layerwise=True, grad_accum=1, grad_clip=args.grad_clip)
        self.sched = build_scheduler(self.opt, warmup_steps=max(1, args.steps // 10), max_steps=args.steps,
                                     schedule="cosine", min_lr_ratio=0.1)
        self.rss_build = _rss_bytes() - rss0
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.phase_s: list[dict[str, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.svd_counts: list[int] = []

    # --- accounting ---------------------------------------------------------------------------------------
    def _opt_phases(self) -> dict[str, float]:
        if self.kind in ("qgalore", "galore"):
            return dict(self.opt.phase_times)
        if self.kind == "galore_torch":
            return {"svd": self.galore_timers.svd, "projection": self.galore_timers.projection}
        return {}

    def svd_count(self) -> int:
        if self.kind in ("qgalore", "galore"):
            return int(self.opt.svd_count)
        return self.galore_timers.calls if self.kind == "galore_torch" else 0

    def memory_bytes(self) -> dict[str, int]:
        """Exact resident weights + optimizer state (+ projectors), by tensor accounting."""
        if self.kind in ("qgalore", "galore"):
            return {k: int(v) for k, v in self.opt.memory_bytes().items()}
        weights = sum(_tensor_bytes(p) for p in self.model.parameters())
        state = proj = 0
        for st in self.opt.state.values():
            for k, v in st.items():
                if k == "projector":
                    proj += _tensor_bytes(getattr(v, "ortho_matrix", None))
                elif k != "step":
                    state += _tensor_bytes(v)
        return {"weights": weights, "moments": state, "projectors": proj, "total": weights + state + proj}

    def formula_bytes(self) -> dict[str, float] | None:
        """docs/design.md §5 byte arithmetic for the quantised mode with this model's shapes (None otherwise)."""
        if self.kind != "qgalore":
            return None
        opt = self.opt
        blocks = lambda rows, cols: rows * math.ceil(cols / min(256, cols))  # noqa: E731  (blocks inside rows)
        out = {"int8_weights": 0.0, "int4_projectors": 0.0, "lowrank_moments_8bit": 0.0, "dense_weights_fp32": 0.0,
               "dense_moments": 0.0}
        for pm in opt.matrices:
            m, n = pm.shape
            st = opt.mstate[pm.name]
            out["int8_weights"] += m * n + 4 * blocks(m, n)
            br, bc = (st.rank, n) if st.side == "right" else (m, st.rank)
            out["int4_projectors"] += math.ceil(br * bc / 2) + 4 * blocks(br, bc)
            lr_, lc = st.exp_avg.shape
            out["lowrank_moments_8bit"] += 2 * (lr_ * lc + 4 * blocks(lr_, lc)) if lr_ * lc >= 4096 else 8 * lr_ * lc
        for name, p in opt.dense_named:
            out["dense_weights_fp32"] += 4 * p.numel()
            rows = p.numel() // p.shape[-1] if p.dim() > 1 else 1
            cols = p.shape[-1] if p.dim() else 1
            out["dense_moments"] += 2 * (p.numel() + 4 * blocks(rows, cols)) if p.numel() >= 4096 else 8 * p.numel()
        out["total"] = sum(out.values())
        out["dense_weights_bf16_alternative"] = out["dense_weights_fp32"] / 2
        return out

    # --- one round ----------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from qgalore_dist.train.loop import lm_loss

        before = self._opt_phases()
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = lm_loss(self.model, x, y)
        t1 = time.perf_counter()
        loss.backward()  # qgalore: refreshes + projections run inside (layer-wise sinks)
        t2 = time.perf_counter()
        mid = self._opt_phases()
        if self.kind == "galore_torch":
            norm_params = [p for p in self.model.parameters() if p.grad is not None]
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(norm_params, self.grad_clip)
            self.opt.step()
        else:
            self.opt.step()
        self.sched.step()
        t3 = time.perf_counter()
        after = self._opt_phases()
        d_bwd = {k: mid.get(k, 0.0) - before.get(k, 0.0) for k in after}
        d_all = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        ph = {"forward": t1 - t0, "svd": d_all.get("svd", 0.0), "projection": d_all.get("projection", 0.0),
              "requantize": d_all.get("requantize", 0.0)}
        ph["backward"] = (t2 - t1) - sum(d_bwd.values())
        ph["optimizer"] = (t3 - t2) - sum(v for k, v in d_all.items() if k != "optimizer") + sum(d_bwd.values())
        self.phase_s.append(ph)
        self.step_s.append(t3 - t0)
        self.losses.append(float(loss.detach()))
        self.svd_counts.append(self.svd_count())

    def evaluate(self, batcher, batches: int, batch: int, step: int) -> None:
        from qgalore_dist.train.loop import evaluate

        self.evals.append((step, evaluate(self.model, batcher, batches, batch, torch.device("cpu"))))

    def to_json(self) -> dict:
        out = {"label": self.label, "kind": self.kind, "losses": self.losses, "step_s": self.step_s,
               "phase_s": self.phase_s, "evals": self.evals, "svd_counts": self.svd_counts,
               "memory_bytes": self.memory_bytes(), "formula_bytes": self.formula_bytes(),
               "rss_build_bytes": self.rss_build}
        if self.kind in ("qgalore", "galore"):
            st = self.opt.mstate.values()
            out["intervals"] = sorted(s.gate.interval for s in st)
            out["refreshes"] = [[r.step, r.name, r.similarity] for r in self.opt.refresh_log()]
        return out


def run(args) -> dict:
    from qgalore_dist.data import TokenBatcher, get_tokenizer
    from qgalore_dist.models import resolve_model_config

    torch.set_num_threads(args.threads)
    tokenizer = get_tokenizer()
    config = resolve_model_config(args.model, vocab_size=len(tokenizer))
    batcher = TokenBatcher.from_source(None, tokenizer, args.seq, args.batch, seed=0, world_size=1, rank=0)
    timers = GaloreTimers() if "galore-torch GaLoreAdamW" in args.methods else None
    methods = [Method(label, args, config, timers) for label in args.methods]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def dump(done: int, finished: bool) -> dict:
        data = {"args": vars(args), "rounds_done": done, "finished": finished, "wall_s": time.time() - t_start,
                "peak_rss_bytes": _rss_bytes("VmHWM"), "rss_bytes": _rss_bytes(),
                "methods": {m.label: m.to_json() for m in methods}}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(out)
        return data

    for m in methods:
        m.evaluate(batcher, args.eval_batches, args.batch, 0)
    for step in range(1, args.steps + 1):
        x, y = batcher.next_batch()  # one batch per round, the same for every method
        for m in methods:
            m.step(x, y)
        if step % args.eval_every == 0 or step == args.steps:
            for m in methods:
                m.evaluate(batcher, args.eval_batches, args.batch, step)
        if step % args.save_every == 0 or step == args.steps:
            dump(step, step == args.steps)
            print(f"round {step}/{args.steps} ({time.time() - t_start:.0f} s): "
                  + ", ".join(f"{m.label} loss {m.losses[-1]:.3f} step {m.step_s[-1]:.2f}s" for m in methods),
                  flush=True)
    return dump(args.steps, True)


# ================================================================================================== report
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _paired(m: dict, base: dict) -> float:
    """Median over rounds of (this method's step / AdamW's step in the same round): the load a round saw cancels."""
    n = min(len(m["step_s"]), len(base["step_s"]))
    return _median([m["step_s"][i] / base["step_s"][i] for i in range(1, n)] or [float("nan")])


def report(data: dict, png: Path | None, write: bool) -> str:
    a = data["args"]
    ms = data["methods"]
    done = data["rounds_done"]
    base = ms.get("torch AdamW")
    gal = ms.get("galore-torch GaLoreAdamW")

    def steady(m):  # round 1 pays one-off compilation / allocation
        return m["step_s"][1:] or m["step_s"]

    def val(m):
        return m["evals"][-1][1] if m["evals"] else float("nan")

    last_eval = min((m["evals"][-1][0] for m in ms.values() if m["evals"]), default=0)

    def val_at(m, step):
        return next((v for s, v in m["evals"] if s == step), float("nan"))

    common = min(len(m["losses"]) for m in ms.values())  # rounds every run (merged ones too) has done

    def svd_at(m):
        return m["svd_counts"][common - 1] if common else 0

    rows = []
    for label, m in ms.items():
        med = _median(steady(m))
        ph = {k: _median([p[k] for p in m["phase_s"][1:]] or [0.0]) for k in PHASES}
        mean_ph = {k: statistics.mean([p[k] for p in m["phase_s"][1:]] or [0.0]) for k in PHASES}
        rows.append([label, f"{statistics.mean(m['losses'][:common][-10:]):.3f}", f"{val_at(m, last_eval):.3f}",
                     f"{val_at(m, last_eval) / val_at(gal, last_eval):.3f}" if gal else "",
                     f"{val_at(m, last_eval) / val_at(base, last_eval):.3f}" if base else "",
                     *(["–", "–", "– (separate process)"] if "merged_from" in m else [
                         f"{med:.2f}", f"{med / _median(steady(base)):.2f}" if base else "",
                         f"{_paired(m, base):.2f}" if base else ""]),
                     " / ".join(f"{ph[k]:.2f}" for k in ("forward", "backward")),
                     " / ".join(f"{mean_ph[k]:.3f}" for k in ("svd", "projection", "optimizer", "requantize")),
                     f"{m['memory_bytes']['total'] / 2**20:.1f}", svd_at(m)])
    md = [f"{a['model']}, batch {a['batch']}×{a['seq']}, **{done} of {a['steps']} steps**"
          f"{'' if data['finished'] else ' (PARTIAL: the run was still going)'}, rank {a['rank']}, update_proj_gap "
          f"{a['gap']}, warm-up {max(1, a['steps'] // 10)} + cosine to 0.1×, clip {a['grad_clip']}, fp32 compute, "
          f"{a['threads']} thread, all methods in one process stepped **interleaved** (round k = step k of every "
          f"method on the same batch), so load changes on this shared machine hit every method alike. Validation: "
          f"{a['eval_batches']} held-out batches every {a['eval_every']} steps (table: step {last_eval}). Gated "
          f"run: queue {a['gate_queue']}, γ {a['gate_gamma']}, cosine threshold {a.get('gate_threshold', 0.4)} — the issue's queue 5 would "
          f"need 5 refreshes (125 steps at gap 25) before the first lengthening and could act at most once in 300 "
          f"steps. Wall {data['wall_s'] / 60:.0f} min.", "",
          table(["method", "train loss (last 10)", f"val loss @{last_eval}", "val × galore-torch", "val × AdamW",
                 "median step s", "step × AdamW", "paired × AdamW", "fwd / bwd s (median)",
                 "svd / projection / optimizer / requantize s (mean)", "weights+state MiB", "SVDs"], rows)]
    # memory vs formula
    for label, m in ms.items():
        f = m.get("formula_bytes")
        if f:
            meas = m["memory_bytes"]["total"]
            md += ["", f"* {label}: resident weights+state **{meas:,} B = {meas / 1e9:.4f} GB** "
                   f"({', '.join(f'{k} {v:,}' for k, v in m['memory_bytes'].items() if k != 'total')}); formula "
                   f"{f['total']:,.0f} B ({meas / f['total'] - 1:+.3%}). Target ≤ 0.18 GB: "
                   f"{'met' if meas <= 0.18e9 else 'MISSED'}; dense weights are fp32 here "
                   f"({f['dense_weights_fp32']:,.0f} B); with `--dense-dtype bfloat16` (bf16 storage, fp32 compute) they would give "
                   f"{(meas - f['dense_weights_bf16_alternative']) / 1e9:.4f} GB."]
    own = {k: m for k, m in ms.items() if "merged_from" not in m}
    md.append(f"* Peak RSS of the whole process (all {len(own)} models resident at once): "
              f"{data['peak_rss_bytes'] / 2**20:.0f} MiB; RSS added by building each: " +
              ", ".join(f"{k} {m['rss_build_bytes'] / 2**20:.0f} MiB" for k, m in own.items()) + ".")
    if base and gal and "qgalore gated" in ms and "qgalore fixed gap" in ms:
        g, fx = ms["qgalore gated"], ms["qgalore fixed gap"]
        ratio = _median(steady(g)) / _median(steady(base))
        vg, vf = val_at(g, last_eval), val_at(fx, last_eval)
        sg, sf = svd_at(g), svd_at(fx)
        md.append(f"* Targets (val at step {last_eval}, SVDs after {common} steps): step ≤ 1.5× AdamW → gated "
                  f"{ratio:.2f}× (paired "
                  f"{_paired(g, base):.2f}×), fixed {_median(steady(fx)) / _median(steady(base)):.2f}× (paired "
                  f"{_paired(fx, base):.2f}×) "
                  f"({'met' if ratio <= 1.5 else 'MISSED'}); val ≤ 1.03× galore-torch → {vg / val_at(gal, last_eval):.3f}× "
                  f"({'met' if vg <= 1.03 * val_at(gal, last_eval) else 'MISSED'}); within 3% of AdamW → "
                  f"{vg / val_at(base, last_eval):.3f}× ({'met' if vg <= 1.03 * val_at(base, last_eval) else 'MISSED'}); "
                  f"gated SVDs ≤ 0.5× fixed → {sg} / {sf} = {sg / max(1, sf):.2f}× at val {vg / vf:.4f}× the "
                  f"fixed-gap run's ({'met' if sg <= 0.5 * sf and vg <= 1.01 * vf else 'MISSED'}). Gated intervals at "
                  f"the end: {_interval_summary(g.get('intervals', []))}" + _similarity_note(g, a.get("gate_threshold", 0.4)) + ".")
        for label, m in ms.items():
            if label.startswith("qgalore gated,"):
                vm, sm = val_at(m, last_eval), svd_at(m)
                ma = m["merged_from"]["args"]
                md.append(f"* {label} (queue {ma['gate_queue']}, γ {ma['gate_gamma']}): SVDs {sm} / {sf} = "
                          f"{sm / max(1, sf):.2f}× the fixed gap's at val {vm / vf:.4f}× "
                          f"({'met' if sm <= 0.5 * sf and vm <= 1.01 * vf else 'MISSED'}); intervals after its "
                          f"{len(m['losses'])} steps: "
                          f"{_interval_summary(m.get('intervals', []))}"
                          + _similarity_note(m, ma.get("gate_threshold", 0.4)) + ".")
    if png is not None:
        _plot(data, png)
        md += ["", f"![loss curves]({png.relative_to(DOCS).as_posix()})"]
    text = "\n".join(md)
    if write:
        write_report("bench_train", f"End-to-end training, {a['model']} (issue 4)", _compact(data), text)
    else:
        print(text)
    return text


def _similarity_note(m: dict, threshold: float) -> str:
    sims = [r[2] for r in m.get("refreshes", []) if r[2] is not None]
    if not sims:
        return ""
    return (f"; subspace similarity at its {len(sims)} non-initial refreshes: mean {statistics.mean(sims):.3f}, "
            f"min {min(sims):.3f}, max {max(sims):.3f} (threshold {threshold})")


def _compact(data: dict) -> dict:
    """What docs/bench/bench_train.json keeps: curves and summaries (per-step phase times and the refresh log stay
    in the run's own JSON under runs/)."""
    out = {k: v for k, v in data.items() if k != "methods"}
    out["methods"] = {}
    for label, m in data["methods"].items():
        c = {k: v for k, v in m.items() if k not in ("phase_s", "refreshes")}
        c["phase_s_mean"] = {k: statistics.mean([p[k] for p in m["phase_s"][1:]] or [0.0]) for k in PHASES}
        sims = [r[2] for r in m.get("refreshes", []) if r[2] is not None]
        if sims:
            c["similarity"] = {"count": len(sims), "mean": statistics.mean(sims), "min": min(sims), "max": max(sims)}
        out["methods"][label] = c
    return out


def _interval_summary(intervals: list[int]) -> str:
    if not intervals:
        return "-"
    counts: dict[int, int] = {}
    for i in intervals:
        counts[i] = counts.get(i, 0) + 1
    return ", ".join(f"{n}× {i}" for i, n in sorted(counts.items()))


def _plot(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, m in data["methods"].items():
        xs = list(range(1, len(m["losses"]) + 1))
        k = 10  # running mean over 10 steps: single-batch losses are noisy
        sm = [statistics.mean(m["losses"][max(0, i - k + 1):i + 1]) for i in range(len(m["losses"]))]
        ax[0].plot(xs, sm, label=label)
        if m["evals"]:
            ax[1].plot([s for s, _ in m["evals"]], [v for _, v in m["evals"]], marker="o", label=label)
    ax[0].set(xlabel="step", ylabel="train loss (10-step mean)", title="training loss")
    ax[1].set(xlabel="step", ylabel="validation loss", title="validation loss")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(f"{data['args']['model']}, {data['rounds_done']} steps, batch {data['args']['batch']}×"
                 f"{data['args']['seq']}" + ("" if data["finished"] else " (partial)"))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gap", type=int, default=25)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.015, help="low-rank methods (AdamW uses 1e-3)")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--gate-queue", type=int, default=2, help="gated run: similarities per lengthening")
    ap.add_argument("--gate-gamma", type=float, default=3.0, help="gated run: interval multiplier")
    ap.add_argument("--gate-threshold", type=float, default=0.4, help="gated run: |cos| of the top singular "
                    "vectors (mean over the queue) at or above which the interval grows")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=10, help="write the partial JSON every N rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=ALL_METHODS)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_train.json"), help="(partial) results JSON")
    ap.add_argument("--report-from", metavar="JSON", help="only write the report from a (partial) results JSON")
    ap.add_argument("--merge", metavar="JSON", nargs="*", default=[],
                    help="with --report-from: add the methods of these runs (e.g. a gated run with another "
                    "threshold; losses and SVD counts do not depend on timing, so they compare across processes)")
    ap.add_argument("--no-report", action="store_true", help="print the table; do not touch docs/")
    args = ap.parse_args(argv)
    png = None if args.no_report else DOCS / "bench" / "bench_train.png"
    if args.report_from:
        data = json.loads(Path(args.report_from).read_text())
        for extra in args.merge:
            other = json.loads(Path(extra).read_text())
            for label, m in other["methods"].items():
                thr = other["args"].get("gate_threshold", 0.4)
                m["merged_from"] = {"file": Path(extra).name, "rounds_done": other["rounds_done"],
                                    "args": other["args"]}
                data["methods"][f"{label}, threshold {thr} (separate process)"] = m
    else:
        data = run(args)
    report(data, png, write=not args.no_report)


if __name__ == "__main__":
    main()
