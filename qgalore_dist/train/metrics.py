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
    ``resume_step`` (a resumed run, or ``--resume auto`` starting at step 0): the existing file is continued; its
    records of steps after ``resume_step`` — written by the interrupted run after its last checkpoint, and about
    to be trained again — are dropped first (the file is rewritten whole and replaced atomically, so a crash
    cannot lose the records kept). ``resume_step=None``: a new file (the caller refused an existing one unless
    the user asked to overwrite it). ``dropped`` counts the records removed.
    """

    def __init__(self, path: str | os.PathLike[str] | None, resume_step: int | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._fh: IO[str] | None = None
        self.dropped = 0
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._drop_after(resume_step)
        self._fh = self.path.open("a" if resume_step is not None else "w", encoding="utf-8")

    def _drop_after(self, step: int) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                rec_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                rec_step = None  # a torn last line of a killed run: dropped with the superseded records
                self.dropped += 1
                continue
            if isinstance(rec_step, int) and rec_step > step:
                self.dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
        if self.dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, self.path)

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

    On a terminal at least :data:`MIN_BAR_COLUMNS` wide: a tqdm bar on stderr with loss / lr / throughput in the
    postfix. Otherwise (a pipe, a log file, a terminal too narrow for a bar — a zero-width one would show nothing):
    one plain line on stdout every ``log_every`` steps (and at the last step) with step, loss, lr, tokens/s,
    elapsed time and ETA, and in distributed runs the slowest rank's step time. Evaluations and notes are always
    printed as plain lines (through tqdm.write on a terminal so the bar survives). ``enabled=False`` (ranks other
    than the main one) prints nothing.
    """

    MIN_BAR_COLUMNS = 40

    def __init__(self, total: int, start: int = 0, log_every: int = 10, stream: IO[str] | None = None,
                 enabled: bool = True) -> None:
        self.total = total
        self.start = start
        self.log_every = max(1, log_every)
        self.enabled = enabled
        self._bar = None
        tty_stream = sys.stderr
        if enabled and stream is None and tty_stream.isatty() and _columns(tty_stream) >= self.MIN_BAR_COLUMNS:
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

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, grad_norm: float | None,
               slowest_step_s: float | None = None) -> None:
        if self._bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:.0f}"}
            if grad_norm is not None:
                post["gnorm"] = f"{grad_norm:.3f}"
            if slowest_step_s is not None:
                post["slowest"] = f"{slowest_step_s:.2f}s"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)
            return
        if step % self.log_every == 0 or step == self.total:
            gn = "" if grad_norm is None else f" grad_norm {grad_norm:.4f}"
            slow = "" if slowest_step_s is None else f" slowest rank {slowest_step_s:.2f}s/step"
            elapsed = time.perf_counter() - self._t0
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done > 0 else math.nan
            self.note(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {tokens_per_s:.0f}{gn}{slow} "
                      f"elapsed {_clock(elapsed)} eta {_clock(eta)}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _columns(stream: IO[str]) -> int:
    """The terminal's width (0 when it reports none)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _clock(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``4.1s`` ('?' before the first step's time is known)."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
