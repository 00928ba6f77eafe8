"""Resuming at another world size: what each fsdp rank reads and holds when it loads a checkpoint written by N ranks.

One ``torchrun`` launch writes an fsdp checkpoint at ``--save-world`` ranks (start-up, one training step, save);
then, for every M of ``--worlds``, a launch starts fresh at M ranks (the model and optimizer built as the training
loop builds them: meta device, each rank materialising its rows), loads that checkpoint and takes one more step.
Each rank samples its ``RssAnon`` (file-mapped pages of the memory-mapped checkpoint do not count) every 2 ms and
reports: RssAnon after start-up, the growth through the load (the state lands in tensors that exist already, so
anything above zero is what loading holds on the side) and its peak over start-up, the load and the step; the
load time; and (computed from the shapes, not measured) the bytes of the pieces this rank's share overlaps (the files hold
all ranks' shares). The single-device engine's load of the same checkpoint (``--engine local``) is the M = 1 row
of a reader that joins every piece.

Target (issue 15, "every rank reads and holds only its share"): the growth through the load ≤ what the
checkpoint adds to the accounted state (projectors exist only after a first refresh) + the largest single tensor
this rank reads + 5 % of its resident share, at every M; its share of the files ≈ the checkpoint's size / M.

    python bench/bench_resume.py                              # llama_130m, rank 128, written at N = 2, M = 1, 2, 3
    python bench/bench_resume.py --model llama_20m --rank 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_startup import PeakSampler, launch_ranks, rss_anon  # noqa: E402
from bench.report import ROOT, table, write_report  # noqa: E402

OUT = ROOT / "bench" / "out" / "resume"
MiB = 2 ** 20


def worker(spec: dict) -> None:
    sampler = PeakSampler()
    sampler.start()
    import torch

    torch.set_num_threads(1)
    from qgalore_dist.checkpoint.pieces import PieceReader
    from qgalore_dist.checkpoint.save_load import model_files, optimizer_files, verify_checkpoint
    from qgalore_dist.models import resolve_model_config
    from qgalore_dist.train.cli import parse_args
    from qgalore_dist.train.engines import make_engine
    from qgalore_dist.train.loop import finish_training_model, lm_loss, pending_training_model
    from qgalore_dist.train.optimizers import make_optimizer

    argv = ["--model", spec["model"], "--rank", str(spec["rank"]), "--batch-size", "1", "--seq-len", "32",
            "--max-steps", "2", "--projection", "rsvd", "--seed", "0", "--engine", spec["engine"]]
    argv += ["--dist-timeout", "1800"] if spec["engine"] != "local" else []
    args = parse_args(argv)
    engine = make_engine(args)
    config = resolve_model_config(spec["model"])
    pending = pending_training_model(args, config, torch.float32)
    if not engine.sharded_start:
        pending = finish_training_model(args, pending.materialize(engine.device), torch.float32)
    model, _ = engine.prepare(pending, lambda m: make_optimizer(m, args))
    start = rss_anon()

    def step(seed: int) -> float:
        g = torch.Generator().manual_seed(seed * 100 + engine.rank)
        x = torch.randint(0, config.vocab_size, (1, 33), generator=g)
        engine.zero_grad()
        loss = lm_loss(model, x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        return float(loss)

    rec: dict = {"rank": engine.rank, "world": engine.world_size, "start": start,
                 "resident": (engine.memory_bytes() or {}).get("total")}
    ckpt = Path(spec["ckpt"])
    if spec["mode"] == "save":
        rec["loss"] = step(1)
        engine.save_checkpoint(ckpt.parent, 1, {"engine": spec["engine"], "world_size": engine.world_size,
                                                "optimizer_kind": "qgalore", "rng": None}, None)
    else:
        record = verify_checkpoint(ckpt)
        sampler.peak = rss_anon()  # the load's own peak from here
        t0 = time.perf_counter()
        engine.load_checkpoint(ckpt)
        rec["t_load_s"] = time.perf_counter() - t0
        rec["after_load"], rec["peak_load"] = rss_anon(), sampler.peak
        rec["resident_after_load"] = (engine.memory_bytes() or {}).get("total")
        rec["read_bytes"], rec["largest_read"] = _share_bytes(PieceReader, ckpt, record, model_files,
                                                              optimizer_files, engine)
        rec["loss"] = step(2)
    rec["peak"] = sampler.peak
    sampler.stop = True
    engine.close()
    Path(spec["out"]).joinpath(f"{spec['name']}_r{rec['rank']}.json").write_text(json.dumps(rec))


def _share_bytes(PieceReader, ckpt: Path, record: dict, model_files, optimizer_files, engine) -> tuple[int, int]:
    """Bytes of the saved pieces that overlap this rank's rows (fsdp: ceil-chunk of every cut tensor's rows,
    whole tensors counted where it owns them — approximated as 1/M of the whole ones), and the largest one."""
    total, largest = 0, 0
    m_world = engine.world_size
    for files in (model_files(record), optimizer_files(record)):
        with PieceReader(ckpt, files=files) as reader:
            for key in reader.keys():
                shape = reader.shape(key)
                n = 1
                for s in shape:
                    n *= s
                size = n * reader.dtype(key).itemsize
                ax = reader.axis(key)
                part = size if engine.name == "local" else (size if ax is None and n < 4096 else
                                                            -(-size // m_world))
                total += part
                largest = max(largest, part)
    return total, largest


def launch(name: str, spec: dict, world: int) -> list[dict]:
    return launch_ranks(Path(__file__).resolve(), OUT, name, {**spec, "name": name, "out": str(OUT)}, world,
                        torchrun=spec["engine"] != "local")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama_130m")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--save-world", type=int, default=2)
    ap.add_argument("--worlds", default="1,2,3")
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return
    import shutil

    OUT.mkdir(parents=True, exist_ok=True)
    ckpt_root = OUT / f"{a.model}_ckpt"
    shutil.rmtree(ckpt_root, ignore_errors=True)
    ckpt = ckpt_root / "step_000001"
    base = {"model": a.model, "rank": a.rank, "ckpt": str(ckpt)}
    saved = launch("save", {**base, "engine": "fsdp", "mode": "save"}, a.save_world)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    rows, results = [], {"model": a.model, "rank": a.rank, "save_world": a.save_world, "checkpoint_bytes": size,
                         "save": saved, "loads": {}}
    configs = [("local", 1)] + [("fsdp", int(w)) for w in a.worlds.split(",")]
    for engine, world in configs:
        recs = launch(f"load_{engine}{world}", {**base, "engine": engine, "mode": "load"}, world)
        results["loads"][f"{engine}{world}"] = recs
        worst = max(recs, key=lambda r: r["after_load"] - r["start"])
        growth = worst["after_load"] - worst["start"]
        # what the checkpoint adds to the state (projectors exist only after a refresh) + one tensor in flight + 5 %
        added = (worst["resident_after_load"] or 0) - (worst["resident"] or 0)
        bound = added + worst["largest_read"] + 0.05 * (worst["resident"] or 0)
        rows.append([f"{engine} M={world}", f"{(worst['resident'] or 0) / MiB:.1f} → "
                     f"{(worst['resident_after_load'] or 0) / MiB:.1f}",
                     f"{max(r['read_bytes'] for r in recs) / MiB:.1f}", f"{size / MiB / world:.1f}",
                     f"{growth / MiB:.1f}", f"{bound / MiB:.1f}", "met" if growth <= bound else "MISSED",
                     f"{max(r['peak_load'] - r['start'] for r in recs) / MiB:.1f}",
                     f"{max(r['t_load_s'] for r in recs):.2f}"])
    header = ["resume of an N=%d fsdp checkpoint" % a.save_world, "resident share before → after load MiB", "its share of the files MiB (computed)",
              "checkpoint / M MiB", "RssAnon growth through load MiB", "bound MiB", "target",
              "peak over start-up MiB", "load s"]
    md = table(header, rows)
    (OUT / "resume.json").write_text(json.dumps(results, indent=1))
    md += ("\n\nllama_%s, rank %d, the checkpoint written by %d fsdp ranks after one step, resumed by one process "
           "(`--engine local`, whose reader joins every piece) and by fsdp at M ranks. The growth through the load is "
           "what stays resident after it (the state lands in the tensors start-up built); the peak column is the "
           "transient over start-up (one device reads the whole state before copying it in; an fsdp rank one "
           "tensor's rows at a time)." % (a.model.removeprefix("llama_"), a.rank, a.save_world))
    write_report("resume", "Resuming at another world size (issue 15)", results, md, script="bench_resume.py")
    print(md)


if __name__ == "__main__":
    main()
