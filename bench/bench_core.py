"""Issue 3 benchmark: bytes and optimizer-step time of one LLaMA-60M-shaped stack of projected matrices.

Side by side in one process: torch AdamW (fp32), galore-torch GaLoreAdamW (rank 128, fp32), qgalore_dist in float
reference mode and in its quantised mode (INT8 weights, INT4 projectors, 8-bit moments). Bytes are exact tensor
accounting of what each method keeps resident for these matrices (weights + optimizer state + projectors).
Also: exact SVD versus randomized SVD refresh time for the same stack.
"""

from __future__ import annotations

import argparse
import importlib
import json
import site
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import median_time, table, write_report  # noqa: E402
from qgalore_dist.config import QGaLoreConfig  # noqa: E402
from qgalore_dist.optim.lowrank_adamw import LowRankAdamW  # noqa: E402
from qgalore_dist.projection.projector import compute_basis, projection_side  # noqa: E402
from qgalore_dist.quant.int8 import Int8Weight  # noqa: E402


def llama60m_matrices(layers: int = 8, hidden: int = 512, inter: int = 1376) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for i in range(layers):
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"layers.{i}.self_attn.{n}.weight", (hidden, hidden)))
        out.append((f"layers.{i}.mlp.gate_proj.weight", (inter, hidden)))
        out.append((f"layers.{i}.mlp.up_proj.weight", (inter, hidden)))
        out.append((f"layers.{i}.mlp.down_proj.weight", (hidden, inter)))
    return out


def galore_adamw_class():
    """galore_torch.adamw.AdamW without running galore_torch/__init__.py (it imports bitsandbytes)."""
    for p in site.getsitepackages():
        root = Path(p) / "galore_torch"
        if (root / "adamw.py").is_file():
            pkg = types.ModuleType("galore_torch")
            pkg.__path__ = [str(root)]
            sys.modules.setdefault("galore_torch", pkg)
            return importlib.import_module("galore_torch.adamw").AdamW
    raise SystemExit("galore-torch is not installed: pip install --no-deps galore-torch==1.0")


def tensor_bytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if hasattr(t, "ortho_matrix"):
        return tensor_bytes(t.ortho_matrix)
    return 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-report", action="store_true", help="print only; do not touch docs/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prev_path = Path(__file__).resolve().parent.parent / "docs" / "bench" / "bench_core.json"
    prev = json.loads(prev_path.read_text()) if prev_path.is_file() else None
    torch.manual_seed(0)
    mats = llama60m_matrices()
    numel = sum(m * n for _, (m, n) in mats)
    grads = [torch.randn(*shape) * 1e-3 for _, shape in mats]
    results: dict[str, dict] = {}

    # --- torch AdamW fp32 ---
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for _, shape in mats]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def adamw_step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    adamw_step()
    state = sum(tensor_bytes(v) for s in opt.state.values() for k, v in s.items() if k != "step")
    results["torch AdamW fp32"] = {"weights": sum(tensor_bytes(p) for p in params), "state": state, "projectors": 0}
    step_fns = {"torch AdamW fp32": adamw_step}

    # --- galore-torch GaLoreAdamW ---
    GaLoreAdamW = galore_adamw_class()
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.02) for _, shape in mats]
    gopt = GaLoreAdamW([{"params": params, "rank": args.rank, "update_proj_gap": 10**9, "scale": 0.25,
                         "proj_type": "std"}], lr=1e-3)

    def galore_step():
        for p, g in zip(params, grads):
            p.grad = g
        gopt.step()

    galore_step()  # step 0: SVD of every matrix (excluded from the timing below)
    st = [gopt.state[p] for p in params]
    results["galore-torch GaLoreAdamW fp32"] = {
        "weights": sum(tensor_bytes(p) for p in params),
        "state": sum(tensor_bytes(s["exp_avg"]) + tensor_bytes(s["exp_avg_sq"]) for s in st),
        "projectors": sum(tensor_bytes(s["projector"]) for s in st)}
    step_fns["galore-torch GaLoreAdamW fp32"] = galore_step

    # --- qgalore_dist, float reference and quantised ---
    for label, quantize in (("qgalore_dist float mode", False), ("qgalore_dist INT8/INT4/8-bit", True)):
        cfg = QGaLoreConfig(rank=args.rank, update_proj_gap=10**6, max_proj_gap=10**6, scale=0.25, lr=1e-3,
                            quantize=quantize)
        rule = LowRankAdamW(cfg)
        states = [rule.init_state(name, shape) for name, shape in mats]
        if quantize:
            weights = [Int8Weight.quantize(torch.randn(*shape) * 0.02, cfg.weight_group_size) for _, shape in mats]
        else:
            weights = [torch.randn(*shape) * 0.02 for _, shape in mats]

        def q_step():
            for s, w, g in zip(states, weights, grads):
                rule.step(s, w, g, lr=1e-3)

        q_step()
        wb = sum(w.nbytes() if quantize else tensor_bytes(w) for w in weights)
        sb = [s.state_bytes() for s in states]
        results[label] = {"weights": wb, "state": sum(b["moments"] for b in sb),
                          "projectors": sum(b["projector"] for b in sb)}
        step_fns[label] = q_step
        q_step()  # warm-up (compilation) outside the timed rounds

    # interleaved rounds: one timed step of every method per round, so load changes on a shared machine hit
    # every method alike; median over rounds
    times: dict[str, list[float]] = {k: [] for k in step_fns}
    for _ in range(args.repeats):
        for label, fn in step_fns.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    for label, ts in times.items():
        results[label]["step_s"] = statistics.median(ts)
        results[label]["step_s_all"] = ts

    # --- refresh cost: exact SVD vs randomized SVD over the whole stack ---
    def refresh(method):
        gen = torch.Generator().manual_seed(0)
        for (name, (m, n)), g in zip(mats, grads):
            compute_basis(g, args.rank, projection_side(m, n), method, generator=gen)

    svd_s = median_time(lambda: refresh("svd"), max(1, args.repeats // 2), warmup=0)
    rsvd_s = median_time(lambda: refresh("rsvd"), max(1, args.repeats // 2), warmup=0)

    galore_total = None
    rows = []
    for label, r in results.items():
        r["total"] = r["weights"] + r["state"] + r["projectors"]
        if label.startswith("galore-torch"):
            galore_total = r["total"]
    adamw_step_s = results["torch AdamW fp32"]["step_s"]
    for label, r in results.items():
        r["vs_galore"] = r["total"] / galore_total
        r["step_vs_adamw"] = r["step_s"] / adamw_step_s
        rows.append([label, f"{r['weights'] / 2**20:.2f}", f"{r['state'] / 2**20:.2f}",
                     f"{r['projectors'] / 2**20:.3f}", f"{r['total'] / 2**20:.2f}", f"{r['vs_galore']:.3f}",
                     f"{r['step_s'] * 1e3:.1f}", f"{r['step_vs_adamw']:.2f}"])
    q = results["qgalore_dist INT8/INT4/8-bit"]
    proj_elems = sum((args.rank * n if projection_side(m, n) == "right" else m * args.rank) for _, (m, n) in mats)
    proj_scale_bytes = q["projectors"] - proj_elems // 2
    md = [f"LLaMA-60M-shaped stack: {len(mats)} projected matrices, {numel / 1e6:.2f} M elements, rank {args.rank}. "
          f"Step time = median of {args.repeats} non-refresh optimizer steps (refresh SVDs excluded), {args.threads} "
          "thread; the methods are timed in interleaved rounds (one step of each per round) so load changes on this "
          "shared machine hit all alike.", "",
          table(["method", "weights MiB", "moments MiB", "projectors MiB", "total MiB", "× galore-torch",
                 "step ms", "step × AdamW"], rows), "",
          f"* Target: qgalore_dist weights+state ≤ 0.35× galore-torch's → measured **{q['vs_galore']:.3f}×** "
          f"({'met' if q['vs_galore'] <= 0.35 else 'MISSED'}).",
          f"* INT4 projectors: {proj_elems:,} elements → {proj_elems // 2:,} bytes of codes (exactly ½ byte each) "
          f"+ {proj_scale_bytes:,} bytes of fp32 group scales.",
          f"* Refresh of the whole stack: exact SVD {svd_s:.2f} s, randomized SVD (rank {args.rank}, oversample 8, "
          f"2 power iterations) {rsvd_s:.2f} s → {svd_s / rsvd_s:.1f}× faster."]
    if prev and "methods" in prev:
        md.append("* Previous run (commit {}, {}): step × AdamW {}.".format(
            prev.get("git"), prev.get("date"), ", ".join(
                f"{k} {v['step_vs_adamw']:.2f}" for k, v in prev["methods"].items() if "step_vs_adamw" in v)))
    data = {"rank": args.rank, "matrices": len(mats), "elements": numel, "methods": results,
            "refresh_svd_s": svd_s, "refresh_rsvd_s": rsvd_s, "int4_code_bytes": proj_elems // 2,
            "int4_scale_bytes": proj_scale_bytes}
    if args.no_report:
        print("\n".join(md))
    else:
        write_report("bench_core", "Q-GaLore core: bytes and step time on a LLaMA-60M matrix stack (issue 3)", data,
                     "\n".join(md))


if __name__ == "__main__":
    main()
