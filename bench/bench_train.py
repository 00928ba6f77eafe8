"""Issue 4 benchmark: end-to-end pre-training of llama_60m on the embedded corpus, methods side by side.

Each method runs ``launch/pretrain.py`` in its own process (so peak RSS is per method) with identical data, seed and
schedule; metrics come from ``--metrics-jsonl``. ``galore`` is the float reference mode, bit-identical to
galore-torch's GaLoreAdamW (tests/test_optim_core.py), so it stands for galore-torch here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import table, write_report  # noqa: E402

METHODS = {
    "torch AdamW": ["--optimizer", "adamw", "--lr", "1e-3"],
    "galore (= galore-torch)": ["--optimizer", "galore", "--lr", "0.015"],
    "qgalore gated": ["--optimizer", "qgalore", "--lr", "0.015"],
    "qgalore fixed gap": ["--optimizer", "qgalore", "--lr", "0.015", "--no-gate"],
}


def run(label: str, extra: list[str], args, out: Path) -> dict:
    metrics = out / f"{label.split()[0]}-{abs(hash(label)) % 10**6}.jsonl"
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--model", args.model, "--rank", str(args.rank),
           "--update-proj-gap", str(args.gap), "--batch-size", str(args.batch), "--seq-len", str(args.seq),
           "--max-steps", str(args.steps), "--warmup-steps", str(max(1, args.steps // 10)),
           "--eval-every", str(args.steps), "--eval-batches", str(args.eval_batches), "--seed", "0",
           "--metrics-jsonl", str(metrics), "--log-every", str(max(1, args.steps // 5)), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x.get("event") == "train"]
    evals = [x for x in lines if x.get("event") == "eval"]
    steady = [x["step_time_s"] for x in train[1:]]  # step 1 pays one-off compilation
    phases = {}
    if train and "phase_times_s" in train[-1]:
        first = train[0].get("phase_times_s", {})
        for k, v in train[-1]["phase_times_s"].items():
            phases[k] = (v - first.get(k, 0.0)) / max(1, len(train) - 1)
    return {"final_train_loss": statistics.mean(x["loss"] for x in train[-10:]),
            "val_loss": evals[-1]["val_loss"], "val_loss_start": evals[0]["val_loss"],
            "median_step_s": statistics.median(steady), "peak_mem_bytes": max(x["peak_mem_bytes"] for x in train),
            "svd_count": train[-1].get("svd_count"), "phase_s_per_step": phases,
            "loss_curve": [x["loss"] for x in train]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama_60m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gap", type=int, default=25)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in METHODS.items():
            results[label] = run(label, extra, args, Path(tmp))
    base = results["torch AdamW"]
    gal = results["galore (= galore-torch)"]
    rows = []
    for label, r in results.items():
        rows.append([label, f"{r['final_train_loss']:.3f}", f"{r['val_loss']:.3f}",
                     f"{r['val_loss'] / gal['val_loss']:.3f}", f"{r['median_step_s']:.2f}",
                     f"{r['median_step_s'] / base['median_step_s']:.2f}", f"{r['peak_mem_bytes'] / 2**20:.0f}",
                     r["svd_count"], ", ".join(f"{k} {v:.2f}" for k, v in r["phase_s_per_step"].items())])
    g, f = results["qgalore gated"], results["qgalore fixed gap"]
    md = [f"{args.model}, batch {args.batch}×{args.seq}, {args.steps} steps each, rank {args.rank}, update_proj_gap "
          f"{args.gap}, warmup {max(1, args.steps // 10)} + cosine, {args.threads} threads, fp32 compute on CPU, "
          "one process per method, same data and seed.", "",
          table(["method", "train loss (last 10)", "val loss", "val × galore", "median step s", "step × AdamW",
                 "peak RSS MiB", "SVDs", "optimizer phases s/step"], rows), "",
          f"* Targets: step ≤ 1.5× AdamW → qgalore {g['median_step_s'] / base['median_step_s']:.2f}×; val ≤ 1.03× "
          f"galore → {g['val_loss'] / gal['val_loss']:.3f}×, within 3% of AdamW → "
          f"{g['val_loss'] / base['val_loss']:.3f}×; gated SVDs ≤ 0.5× fixed → "
          f"{(g['svd_count'] or 0) / max(1, f['svd_count'] or 1):.2f}× at val {g['val_loss'] / f['val_loss']:.3f}× "
          "the fixed-gap run's."]
    if args.no_report:
        print("\n".join(md))
    else:
        write_report("bench_train", f"End-to-end training, {args.model} (issue 4)", {"args": vars(args),
                     "results": results}, "\n".join(md))


if __name__ == "__main__":
    main()
