"""Training telemetry: one JSON object per optimizer step / evaluation (``--metrics-jsonl``), peak memory, and a
progress display (tqdm on a terminal, plain log lines otherwise — CI logs stay readable)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["MetricsWriter", "Progress", "limit_heap_retention", "peak_memory_bytes", "perplexity"]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run so far: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak
    resident set size (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Make glibc return freed tensor memory to the OS (CPU runs); returns whether it could be set.

    glibc serves allocations below its mmap threshold from the heap, and raises that threshold dynamically (up to
    32 MiB) each time a larger mmapped block is freed — after which the layer-sized temporaries of a training step
    (gradients, SVD workspaces, 1-30 MiB each) come from the heap and stay resident after ``free`` when other
    blocks pin the heap around them; the peak RSS then counts memory nobody uses. A fixed threshold turns the
    dynamic adjustment off, so every block of ``threshold`` bytes or more is its own mapping, unmapped on free
    (``mallopt(3)``, M_MMAP_THRESHOLD). No effect (False) where libc is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def perplexity(loss: float) -> float:
    """``exp(loss)``, saturating to ``inf`` instead of raising on a diverged run."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (or does nothing when ``path`` is None).

    Each line is flushed at once, so a crashed or preempted run keeps every record written before the crash.
    ``append=True`` (resumed runs) continues an existing file instead of truncating it.
    """

    def __init__(self, path: str | os.PathLike[str] | None, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self._fh: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            return
        # allow_nan: a diverged loss is recorded as NaN/Infinity (Python's json reads them back) rather than lost
        self._fh.write(json.dumps(record, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """Progress over optimizer steps ``start+1 .. total``.

    On a TTY: a tqdm bar on stderr with loss / lr / throughput in the postfix. Otherwise: one plain line on stdout
    every ``log_every`` steps (and at the last step) — progress bars written to a log file are unreadable.
    Evaluations and notes are always printed as plain lines (through tqdm.write on a TTY so the bar survives).
    ``enabled=False`` (ranks other than the main one) prints nothing.
    """

    def __init__(self, total: int, start: int = 0, log_every: int = 10, stream: IO[str] | None = None,
                 enabled: bool = True) -> None:
        self.total = total
        self.log_every = max(1, log_every)
        self.enabled = enabled
        self._bar = None
        tty_stream = sys.stderr
        if enabled and stream is None and tty_stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=tty_stream)
        self._out = stream or sys.stdout
        self._t0 = time.perf_counter()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=self._out, flush=True)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, grad_norm: float | None) -> None:
        if self._bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:.0f}"}
            if grad_norm is not None:
                post["gnorm"] = f"{grad_norm:.3f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)
            return
        if step % self.log_every == 0 or step == self.total:
            gn = "" if grad_norm is None else f" grad_norm {grad_norm:.4f}"
            elapsed = time.perf_counter() - self._t0
            self.note(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:.0f}{gn} "
                      f"elapsed {elapsed:.1f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
