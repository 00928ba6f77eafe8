"""Sharded start-up: per-rank anonymous memory of fsdp and ZeRO-3 at N = 1, 2, 3, fresh and from a directory.

Each configuration is one ``torchrun`` launch; every rank samples its ``RssAnon`` (``/proc/self/status``: file-mapped
pages of a memory-mapped checkpoint do not count) every 2 ms, builds the model exactly as the training loop does
(:func:`~qgalore_dist.train.loop.pending_training_model` → ``engine.prepare``: meta device, each rank
materialising its own rows), records RssAnon after start-up (model + optimizer built) and the peak through
start-up and one training step (batch 1 × 32). The runtime is the same launch with ``llama_tiny``: every number
is reported minus it. Allocator settings are the same for every configuration (glibc defaults, one OpenMP thread).

Targets (issue 15): the model part after start-up within 5 % of the byte formula (the optimizer's exact tensor
accounting, ``memory_bytes()``), at N=2 ≤ 0.55× and at N=3 ≤ 0.40× of N=1; loading from a safetensors directory
adds at most the largest fp32 tensor + 5 % over a fresh start-up. A 7B table applies the validated formula.

    python bench/bench_startup.py                     # llama_1b, rank 512 (about 40 min on 2 cores)
    python bench/bench_startup.py --model llama_20m --rank 64 --worlds 1,2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import ROOT, table, write_report  # noqa: E402

OUT = ROOT / "bench" / "out" / "startup"
MiB = 2 ** 20


# ------------------------------------------------------------------------------------------------ rank side
def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, rss_anon(), False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.period)


def worker(spec: dict) -> None:
    sampler = PeakSampler()
    sampler.start()
    import torch

    torch.set_num_threads(1)
    from qgalore_dist.models import resolve_model_config
    from qgalore_dist.train.cli import parse_args
    from qgalore_dist.train.engines import make_engine
    from qgalore_dist.train.loop import lm_loss, pending_training_model
    from qgalore_dist.train.optimizers import make_optimizer

    argv = ["--model", spec["model"], "--rank", str(spec["rank"]), "--batch-size", "1", "--seq-len", "32",
            "--max-steps", "1", "--projection", "rsvd", "--dist-timeout", "1800", "--seed", "0"]
    argv += ["--ds_config", spec["ds_config"]] if spec["engine"] == "zero3" else ["--engine", "fsdp"]
    args = parse_args(argv)
    engine = make_engine(args)
    base = rss_anon()
    t0 = time.perf_counter()
    # a shipped config keeps its vocabulary (32000) here: no tokenizer is involved in a synthetic step
    config = resolve_model_config(spec["model"])
    pending = pending_training_model(args, config, torch.float32)
    model, _ = engine.prepare(pending, lambda m: make_optimizer(m, args))
    t_start = time.perf_counter() - t0
    start, peak_start = rss_anon(), sampler.peak
    accounted_start = engine.memory_bytes() or {}
    t_step = None
    if spec["step"]:
        g = torch.Generator().manual_seed(engine.rank)
        x = torch.randint(0, config.vocab_size, (1, 33), generator=g)
        t1 = time.perf_counter()
        engine.zero_grad()
        engine.backward(lm_loss(model, x[:, :-1], x[:, 1:]))
        engine.step()
        t_step = time.perf_counter() - t1
    time.sleep(0.01)
    sampler.stop = True
    rec = {"rank": engine.rank, "world": engine.world_size, "base": base, "start": start, "peak_start": peak_start,
           "after_step": rss_anon(), "peak": max(sampler.peak, rss_anon()), "accounted_start": accounted_start,
           "accounted_step": engine.memory_bytes() or {}, "t_start_s": t_start, "t_step_s": t_step}
    engine.close()
    Path(spec["out"]).joinpath(f"{spec['name']}_r{rec['rank']}.json").write_text(json.dumps(rec))


# ------------------------------------------------------------------------------------------ driver side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ds_config(path: Path, rank: int) -> str:
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1000000,
        "qgalore": {"optimizer": "qgalore", "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_bits": 4,
                    "comm_mode": "lowrank", "projection": "rsvd", "dense_state_bits": 8}}))
    return str(path)


def pretrained_dir(model: str) -> Path:
    """A safetensors directory of ``model`` (fp32, sharded at 2 GB), written once from the keyed fresh init."""
    d = OUT / f"{model}_hf"
    if (d / "config.json").is_file():
        return d
    import torch

    from qgalore_dist.models import build_model, resolve_model_config
    from qgalore_dist.nn.materialize import KeyedRandomInit, materialize

    m = build_model(resolve_model_config(model), meta=True)
    materialize(m, KeyedRandomInit(m, seed=1), quantize=False, dense_dtype=torch.float32)
    m.save_pretrained(str(d), safe_serialization=True, max_shard_size="2GB")
    del m
    return d


def launch_ranks(script: Path, out: Path, name: str, spec: dict, world: int, torchrun: bool = True) -> list[dict]:
    """Run ``script --worker SPEC`` as ``world`` ranks under torchrun (or one plain process) and return the
    ``{out}/{name}_r<R>.json`` records its ranks write."""
    # the same allocator settings for every configuration: a fixed mmap threshold, so a freed transient (a
    # matrix's fp32 rows, a gathered gradient) goes back to the kernel instead of staying in glibc's heap and
    # counting as resident (the default threshold grows after the first large free, up to 32 MB)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
            str(_free_port())] if torchrun else [sys.executable]
    cmd = [*head, str(script), "--worker", json.dumps(spec)]
    for f in out.glob(f"{name}_r*.json"):
        f.unlink()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
    recs = [json.loads(f.read_text()) for f in sorted(out.glob(f"{name}_r*.json"))]
    if p.returncode != 0 or len(recs) != world:
        raise RuntimeError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return recs


def launch(name: str, engine: str, world: int, model: str, rank: int, step: bool) -> list[dict]:
    spec = {"name": name, "engine": engine, "model": model, "rank": rank, "out": str(OUT), "step": step,
            "ds_config": _ds_config(OUT / f"{name}.ds.json", rank)}
    return launch_ranks(Path(__file__).resolve(), OUT, name, spec, world)


def formula_bytes(model: str, world: int, rank: int, engine: str) -> dict[str, int]:
    """Per-rank weights + optimizer state after start-up, from shapes alone (the largest rank's share): INT8 codes
    and one fp32 scale per 256-element row group of each projected matrix's ceil(m/N) rows; right-projected
    matrices' 8-bit low-rank moments of their rows (m/N × r, two moments, one fp32 absmax per 256-element block);
    left-projected ones held whole by their owner (at most ⌈L/N⌉ of them per rank, counted at the largest); dense
    parameters fp32 / N with 8-bit moments; ZeRO-3 adds DeepSpeed's fp32 master partition of the dense part.
    Projectors (INT4, replicated) appear only after the first refresh (the step)."""
    from qgalore_dist.models import build_model, resolve_model_config
    from qgalore_dist.nn.convert import find_target_linears

    m = build_model(resolve_model_config(model), meta=True)
    targets = {n: (mod.out_features, mod.in_features) for n, mod in find_target_linears(m).items()}
    target_ids = {id(mod.weight) for mod in find_target_linears(m).values()}
    out = {"projected_weights": 0, "lowrank_moments": 0, "dense_weights": 0, "dense_moments": 0}
    left = []
    for rows, cols in targets.values():
        k = math.ceil(rows / world)
        out["projected_weights"] += k * cols + k * math.ceil(cols / 256) * 4
        r = min(rank, rows, cols)
        if rows >= cols:
            held = k * r
            out["lowrank_moments"] += 2 * held + 2 * math.ceil(held / 256) * 4
        else:
            left.append(2 * r * cols + 2 * math.ceil(r * cols / 256) * 4)
    left.sort(reverse=True)
    out["lowrank_moments"] += sum(left[: math.ceil(len(left) / world)])
    dense = sum(p.numel() for p in m.parameters() if id(p) not in target_ids)
    share = math.ceil(dense / world)
    out["dense_weights"] = 4 * share
    out["dense_moments"] = 2 * share + 2 * math.ceil(share / 256) * 4
    if engine == "zero3":
        out["dense_master"] = 4 * share
    out["total"] = sum(out.values())
    return out


def run(model: str, rank: int, worlds: list[int], engines: list[str], sources: list[str], steps: set[str]) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    dirs = {"dir": (pretrained_dir(model), pretrained_dir("llama_tiny"))} if "dir" in sources else {}
    for engine in engines:
        for world in worlds:
            for source in sources:
                big = str(dirs[source][0]) if source == "dir" else model
                tiny = str(dirs[source][1]) if source == "dir" else "llama_tiny"
                key = f"{engine}_N{world}_{source}"
                print(f"[bench_startup] {key} ...", flush=True)
                step = key in steps or "all" in steps
                runtime = launch(f"{key}_tiny", engine, world, tiny, 8, step)
                recs = launch(key, engine, world, big, rank, step)
                results[key] = {"engine": engine, "world": world, "source": source, "ranks": recs,
                                "runtime": runtime}
    return results


def summarize(model: str, rank: int, results: dict) -> tuple[dict, str]:
    def over_runtime(r: dict, field: str) -> int | None:
        if r["ranks"][0].get(field) is None:
            return None
        return max(x[field] for x in r["ranks"]) - max(x[field] for x in r["runtime"])

    summary = {}
    for key, r in results.items():
        stepped = r["ranks"][0]["t_step_s"] is not None
        summary[key] = {
            "model_part_start": over_runtime(r, "start"), "peak_start": over_runtime(r, "peak_start"),
            "model_part_after_step": over_runtime(r, "after_step") if stepped else None,
            "peak_step": over_runtime(r, "peak") if stepped else None,
            "accounted_start": max(x["accounted_start"].get("total", 0) for x in r["ranks"]),
            "accounted_step": max(x["accounted_step"].get("total", 0) for x in r["ranks"]) if stepped else None,
            "formula": formula_bytes(model, r["world"], rank, r["engine"])["total"],
            "t_start_s": max(x["t_start_s"] for x in r["ranks"]),
            "t_step_s": max(x["t_step_s"] for x in r["ranks"]) if stepped else None}

    def mib(v) -> str:
        return "—" if v is None else f"{v / MiB:.0f}"

    rows = []
    for key, s in summary.items():
        r = results[key]
        base = summary.get(f"{r['engine']}_N1_{r['source']}")
        fresh = summary.get(f"{r['engine']}_N{r['world']}_fresh")
        rows.append([r["engine"], r["world"], r["source"], mib(s["model_part_start"]), mib(s["accounted_start"]),
                     mib(s["formula"]), f"{s['model_part_start'] / s['formula']:.3f}",
                     f"{s['model_part_start'] / base['model_part_start']:.3f}" if base else "",
                     mib(s["peak_start"]),
                     f"{(s['model_part_start'] - fresh['model_part_start']) / MiB:+.0f}"
                     if r["source"] == "dir" and fresh else "",
                     mib(s["model_part_after_step"]), mib(s["accounted_step"]), mib(s["peak_step"]),
                     f"{s['t_start_s']:.1f}", "—" if s["t_step_s"] is None else f"{s['t_step_s']:.1f}"])
    md = table(["engine", "N", "source", "after start-up MiB", "accounted MiB", "formula MiB", "÷ formula", "÷ N=1",
                "peak through start-up MiB", "dir − fresh MiB", "after step MiB", "accounted after step MiB",
                "peak through step MiB", "start-up s", "first step s"], rows)
    return summary, md


def seven_b_table(rank: int) -> tuple[list, str]:
    rows = []
    for engine in ("fsdp", "zero3"):
        for world in (1, 2, 4, 8):
            f = formula_bytes("llama_7b", world, rank, engine)
            rows.append([engine, world, f"{f['projected_weights'] / 2**30:.2f}", f"{f['lowrank_moments'] / 2**30:.2f}",
                         f"{(f['dense_weights'] + f.get('dense_master', 0)) / 2**30:.2f}",
                         f"{f['dense_moments'] / 2**30:.2f}", f"{f['total'] / 2**30:.2f}"])
    md = table(["engine", "N", "INT8 weights GiB", "low-rank moments GiB", "dense weights (+master) GiB",
                "dense moments GiB", "per-rank start-up GiB"], rows)
    return rows, md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--engines", default="fsdp,zero3")
    ap.add_argument("--sources", default="fresh,dir")
    ap.add_argument("--step", default="fsdp_N1_fresh,fsdp_N2_fresh,fsdp_N3_fresh",
                    help="configurations that also take the first training step (peak through it); 'all'")
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return
    worlds = [int(w) for w in a.worlds.split(",")]
    results = run(a.model, a.rank, worlds, a.engines.split(","), a.sources.split(","), set(a.step.split(",")))
    summary, md = summarize(a.model, a.rank, results)
    rows7, md7 = seven_b_table(a.rank)
    text = (f"{a.model}, rank {a.rank} (rsvd), vocabulary 32000, fp32 dense, batch 1 × 32, CPU/gloo, one "
            "torchrun launch per row; per-rank `RssAnon` (maximum over ranks) minus the same launch with "
            "llama_tiny (the runtime). *after start-up*: model + optimizer built; *accounted*: the optimizer's "
            "exact tensor accounting (`memory_bytes()`); *formula*: shapes alone (`formula_bytes`); *peak*: "
            "through start-up and one training step (its first refresh included).\n\n" + md +
            "\n\nLLaMA-7B from the formula (rank 512; projectors, activations and the step's transients not "
            "included):\n\n" + md7 + "\n")
    write_report("startup", "Sharded start-up: per-rank memory, fresh and from a directory (issue 15)",
                 {"model": a.model, "rank": a.rank, "summary": summary, "results": results, "llama_7b": rows7},
                 text, script="bench_startup.py")
    print(text)


if __name__ == "__main__":
    main()
