"""Fine-tuning side by side (issue 16): full AdamW, LoRA, Q-GaLore and ProjFactor on a checkable task.

The base is a LLaMA pre-trained by this project on the embedded corpus (``qgalore-pretrain ... --export``, cached
under bench/out/). The task is generated arithmetic: "What is a plus b?" -> "a + b = c. #### c" with a, b < 50;
the test pairs are disjoint from the training pairs by construction (every pair is in exactly one split). Every
method fine-tunes the same base on the same examples in the same order for the same number of steps and tokens
through ``launch/finetune.py`` (one subprocess per run, so peak RSS is the run's own), then greedy generation on
the test prompts is scored by exact match of the answer after ``####``.

Per method: held-out loss, exact match (mean and spread over seeds), peak RSS, weights + trainable-state bytes
(measured on the live model and optimizer, next to the byte formula), median step time relative to LoRA r=8 (runs
interleaved: every seed runs every method before the next seed starts, in a rotated order). The 7B table is the
byte formula. Run: ``.venv/bin/python bench/bench_finetune.py`` (``--help`` for the budget knobs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import table, write_report  # noqa: E402

OUT = ROOT / "bench" / "out" / "finetune"

# (label, flags): the methods compared; {r} / {c} filled from the label
METHODS = [
    ("adamw (full)", ["--optimizer", "adamw"]),
    ("lora r=8", ["--method", "lora", "--lora-r", "8"]),
    ("lora r=64", ["--method", "lora", "--lora-r", "64"]),
    ("qgalore r=8", ["--optimizer", "qgalore", "--rank", "8"]),
    ("qgalore r=64", ["--optimizer", "qgalore", "--rank", "64"]),
    ("projfactor c=1", ["--optimizer", "projfactor", "--rank", "64", "--granularity", "1"]),
    ("projfactor c=4", ["--optimizer", "projfactor", "--rank", "16", "--granularity", "4"]),
]


# ------------------------------------------------------------------------------------------------- data
def make_task(out: Path, n_test: int, kind: str = "add", seed: int = 0) -> tuple[Path, Path]:
    """2500 examples, shuffled once; the first ``n_test`` are the test split, the rest train (disjoint by
    construction). ``add``: "What is a plus b?" (a, b < 50) -> "a + b = c. #### c". ``copy``: "Repeat: w" for a
    random 5-letter word w (2500 distinct words) -> "#### w" (a string transform a small model learns in a short
    budget, where two-digit addition needs far more steps than a CPU run can give)."""
    import random

    rng = random.Random(seed)
    if kind == "add":
        items = [(a, b) for a in range(50) for b in range(50)]
    else:
        words: set[str] = set()
        while len(words) < 2500:
            words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)))
        items = sorted(words)
    rng.shuffle(items)

    def rec(item):
        if kind == "add":
            a, b = item
            q, ans = f"What is {a} plus {b}?", f"{a} + {b} = {a + b}. #### {a + b}"
        else:
            q, ans = f"Repeat: {item}", f"#### {item}"
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}

    out.mkdir(parents=True, exist_ok=True)
    test, train = out / f"{kind}_test.jsonl", out / f"{kind}_train.jsonl"
    test.write_text("".join(json.dumps(rec(x)) + "\n" for x in items[:n_test]))
    train.write_text("".join(json.dumps(rec(x)) + "\n" for x in items[n_test:]))
    return train, test


def pretrained_base(model: str, steps: int) -> Path:
    """Our own pre-trained base (cached): ``steps`` of Q-GaLore-free AdamW pre-training on the embedded corpus."""
    out = OUT / f"base_{model}_{steps}"
    if (out / "config.json").is_file():
        return out
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--model", model, "--optimizer", "adamw",
           "--lr", "3e-3", "--max-steps", str(steps), "--batch-size", "16", "--seq-len", "128", "--warmup-steps",
           "50", "--eval-every", "0", "--eval-batches", "4", "--log-every", "50", "--export", str(out),
           "--export-dtype", "float32"]
    print("pre-training the base:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})
    return out


# ------------------------------------------------------------------------------------------------ worker
def _tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def worker(spec: dict) -> None:
    """One fine-tuning run in this process; prints one JSON line: metrics + measured bytes + peak RSS."""
    import qgalore_dist.train.loop as loop
    from qgalore_dist.train.cli import main

    seen = {}
    make = loop.make_optimizer

    def capture(model, args):
        opt = make(model, args)
        seen["model"], seen["opt"] = model, opt
        return opt

    loop.make_optimizer = capture
    result = main(spec["argv"], task="finetune")
    model, opt = seen["model"], seen["opt"]
    weights = sum(t.numel() * t.element_size() for t in model.parameters()) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" not in n and "inv_freq" not in n)
    acct = opt.memory_bytes() if hasattr(opt, "memory_bytes") else None
    if acct is not None:  # the optimizer's exact accounting of its weights (INT8 + dense) and state
        state = acct["projectors"] + acct["lowrank_moments"] + acct["dense_moments"]
    else:
        state = sum(_tensor_bytes(s) for s in opt.state.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("RESULT " + json.dumps({
        "losses": result.losses, "evals": result.evals, "exact_match": result.exact_matches,
        "weights_bytes": weights, "state_bytes": state, "trainable_params": trainable,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }), flush=True)


def run_one(argv: list[str], metrics: Path) -> dict:
    spec = json.dumps({"argv": [*argv, "--metrics-jsonl", str(metrics)]})
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("RESULT "):])
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    out["step_times"] = [r["step_time_s"] for r in recs if r["event"] == "train"]
    return out


# ------------------------------------------------------------------------------------------------ formula
def formula_bytes(method: str, d: int, ff: int, layers: int, vocab: int, r: int, c: int = 1,
                  base_bytes: int = 2, tied: bool = False, kv: int | None = None) -> dict[str, float]:
    """Weights + trainable state of a LLaMA (hidden ``d``, MLP ``ff``, ``layers``, ``vocab``) by shapes alone.

    qgalore / projfactor: targeted matrices INT8 (+ fp32 scale per 256), dense (embeddings, lm_head, norms) in
    ``base_bytes`` and trained with 8-bit AdamW (2 B/element + fp32 absmax per 256-block), INT4 projectors
    (0.5 B/element + fp32 scale per 256) and 8-bit low-rank moments (qgalore: 2 × r × n; projfactor: c·r-sized
    factored moments, taken as the same budget M = c·r); LoRA: the whole base frozen in ``base_bytes``, adapters
    r × (m + n) in fp32 with fp32 AdamW moments (8 B/element); full AdamW: fp32 weights + fp32 moments."""
    kv = d if kv is None else kv  # k/v output width (grouped-query attention: heads_kv × head_dim)
    mats = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
    targeted = layers * sum(m * n for m, n in mats)
    dense = vocab * d * (1 if tied else 2) + layers * 2 * d + d
    total = targeted + dense
    if method == "adamw":
        return {"weights": 4 * total, "state": 8 * total}
    if method == "lora":
        adapters = layers * sum(r * (m + n) for m, n in mats)
        return {"weights": base_bytes * total + 4 * adapters, "state": 8 * adapters}
    budget = r * c
    proj = layers * sum(min(m, n) * budget for m, n in mats) * (0.5 + 4 / 256)
    moments = layers * sum(2 * budget * max(m, n) for m, n in mats) * (1 + 4 / 256)
    return {"weights": targeted * (1 + 4 / 256) + base_bytes * dense,
            "state": proj + moments + dense * (2 + 8 / 256)}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama_20m")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--task", choices=("add", "copy"), default="add")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lrs", default="adamw=3e-4,lora=3e-3,qgalore=3e-3,projfactor=3e-3",
                    help="learning rate per method family (a grid: family=lr1/lr2, chosen on validation loss)")
    ap.add_argument("--methods", default=",".join(str(i) for i in range(len(METHODS))))
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return
    base = pretrained_base(a.model, a.base_steps)
    train, test = make_task(OUT / "task", a.n_test, a.task)
    lrs = {k: [float(x) for x in v.split("/")] for k, v in (kv.split("=") for kv in a.lrs.split(","))}
    methods = [METHODS[int(i)] for i in a.methods.split(",")]
    common = ["--model", str(base), "--data", str(train), "--val-data", str(test), "--max-steps", str(a.steps),
              "--batch-size", str(a.batch_size), "--seq-len", "128", "--warmup-steps", "10",
              "--eval-every", "0", "--eval-batches", "16", "--eval-generate", str(a.n_test), "--max-new-tokens",
              str(a.max_new_tokens), "--log-every", "1000", "--update-proj-gap", "50", "--no-packing", "--overwrite"]
    runs: dict[str, list[dict]] = {label: [] for label, _ in methods}
    chosen: dict[str, float] = {}
    for label, flags in methods:  # learning rate: the grid's best held-out loss at seed 0 (one value: no search)
        family = "lora" if "lora" in label else flags[1] if flags[0] == "--optimizer" else "adamw"
        grid = lrs.get(family, [1e-3])
        if len(grid) == 1:
            chosen[label] = grid[0]
            continue
        best = None
        for lr in grid:
            r = run_one([*common, *flags, "--lr", str(lr), "--seed", "0", "--eval-generate", "0"],
                        OUT / "m_grid.jsonl")
            val = r["evals"][-1][1]
            if best is None or val < best[0]:
                best = (val, lr)
        chosen[label] = best[1]
    for seed in range(a.seeds):
        order = methods[seed % len(methods):] + methods[:seed % len(methods)]  # rotated: interleaved runs
        for label, flags in order:
            print(f"seed {seed}: {label} (lr {chosen[label]:g})", flush=True)
            runs[label].append(run_one([*common, *flags, "--lr", str(chosen[label]), "--seed", str(seed)],
                                       OUT / "m.jsonl"))
    cfg = json.loads((base / "config.json").read_text())
    shape = dict(d=cfg["hidden_size"], ff=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                 vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings")),
                 kv=cfg["hidden_size"] // cfg["num_attention_heads"] * cfg.get("num_key_value_heads",
                                                                             cfg["num_attention_heads"]))
    ref_time = statistics.median(runs["lora r=8"][0]["step_times"]) if runs.get("lora r=8") else None
    rows, summary = [], {}
    for label, _ in methods:
        rs = runs[label]
        ems = [r["exact_match"][-1][1] for r in rs]
        vals = [r["evals"][-1][1] for r in rs]
        t = statistics.median(x for r in rs for x in r["step_times"])
        s = {"lr": chosen[label], "exact_match": ems, "val_loss": vals, "weights_bytes": rs[0]["weights_bytes"],
             "state_bytes": rs[0]["state_bytes"], "trainable_params": rs[0]["trainable_params"],
             "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs), "step_time_s": t}
        family = "lora" if "lora" in label else ("adamw" if "adamw" in label else "qgalore")
        r_ = int(label.split("=")[1]) if "r=" in label else 64
        f = formula_bytes(family, r=r_, base_bytes=4, **shape)
        s["formula_bytes"] = f
        summary[label] = s
        spread = f" ± {statistics.stdev(ems):.3f}" if len(ems) > 1 else ""
        rows.append([label, f"{chosen[label]:g}", f"{statistics.mean(ems):.3f}{spread}",
                     f"{statistics.mean(vals):.4f}", f"{(s['weights_bytes'] + s['state_bytes']) / 2**20:.1f}",
                     f"{(s['weights_bytes'] + s['state_bytes']) / sum(f.values()):.3f}",
                     f"{s['trainable_params'] / 1e6:.2f}M", f"{s['peak_rss_bytes'] / 2**20:.0f}",
                     f"{t / ref_time:.2f}" if ref_time else "-"])
    # 7B by formula: LLaMA-7B (d 4096, ff 11008, 32 layers, vocab 32000), bf16 base, equal ranks
    seven = []
    for r in (8, 64):
        q = formula_bytes("qgalore", 4096, 11008, 32, 32000, r)
        lo = formula_bytes("lora", 4096, 11008, 32, 32000, r)
        lo_int8 = dict(lo, weights=lo["weights"] - 2 * 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
                       + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) * (1 + 4 / 256))
        seven.append([r, f"{sum(q.values()) / 2**30:.2f}", f"{sum(lo.values()) / 2**30:.2f}",
                      f"{sum(q.values()) / sum(lo.values()):.3f}", f"{sum(lo_int8.values()) / 2**30:.2f}"])
    task = ("a + b with a, b < 50 (answer after the worked sum)" if a.task == "add" else
            "copy a random 5-letter word (\"Repeat: w\" -> \"#### w\")")
    md = (f"Base: `{a.model}` pre-trained here for {a.base_steps} AdamW steps on the embedded corpus (cached). Task: "
          f"{task} as chat records, {2500 - a.n_test} training / {a.n_test} test examples (disjoint by "
          f"construction). Every run: {a.steps} steps × {a.batch_size} examples (padding mode, seq 128), the same "
          f"order; greedy exact match on all {a.n_test} test prompts; {a.seeds} seed(s). Compute budget: "
          f"{a.steps * a.batch_size} examples per run. LR per method: {a.lrs} (a '/'-grid is chosen on held-out "
          "loss).\n\n"
          + table(["method", "lr", "exact match", "val loss", "weights + state MiB", "measured / formula",
                   "trainable", "peak RSS MiB",
                   "step time / LoRA r=8"], rows)
          + "\n\nLLaMA-7B by the byte formula (bf16 dense/base weights, fp32 adapters and their AdamW moments; "
          "Q-GaLore trains the embeddings and lm_head, LoRA freezes them):\n\n"
          + table(["rank", "qgalore GiB", "LoRA (bf16 base) GiB", "qgalore / LoRA", "LoRA on our INT8 base GiB"],
                  seven))
    write_report("finetune", "Fine-tuning side by side: AdamW, LoRA, Q-GaLore, ProjFactor (issue 16)",
                 {"args": vars(a), "summary": summary, "seven_b": seven}, md, script="bench_finetune.py")


if __name__ == "__main__":
    main()
