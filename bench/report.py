"""Shared output of the benchmarks: JSON under docs/bench/ and a markdown section in docs/benchmarks.md.

Each benchmark owns one section of docs/benchmarks.md between ``<!-- bench:NAME -->`` markers, rewritten on every
run, so the file always holds the latest numbers of every benchmark with the machine they ran on.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def machine() -> str:
    """One line naming the machine: CPU model and core count, RAM, GPU if any, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}, torch {torch.__version__}"


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(name: str, title: str, data: dict, markdown: str, script: str | None = None) -> None:
    """Write docs/bench/<name>.json and replace this benchmark's section of docs/benchmarks.md (``script``: the
    bench/ file that reruns it, when it is not ``<name>.py``)."""
    data = {"benchmark": name, "machine": machine(), "git": git_rev(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **data}
    (DOCS / "bench").mkdir(parents=True, exist_ok=True)
    (DOCS / "bench" / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    section = (f"<!-- bench:{name} -->\n## {title}\n\n"
               f"Machine: {data['machine']}. Commit {data['git']}, {data['date']}. "
               f"Raw numbers: [docs/bench/{name}.json](bench/{name}.json); rerun: `make bench` or "
               f"`.venv/bin/python bench/{script or name}.py`.\n\n{markdown.strip()}\n<!-- /bench:{name} -->")
    path = DOCS / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here comes from a script in `bench/`, " \
        "run side by side in one process on the machine named in its section.\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    print(markdown)
