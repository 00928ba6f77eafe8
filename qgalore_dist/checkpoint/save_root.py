"""A checkpoint root (``--save-dir``) over the life of a run: one writer, no leftovers, bounded retention, and a
resume that falls back past a damaged checkpoint.

Every engine publishes a checkpoint the same way — it writes ``<name>.tmp[-<tag>]`` and renames it to ``<name>``
(replacing a checkpoint of the same step by moving it to ``<name>.old-<tag>`` first, see
:func:`~qgalore_dist.checkpoint.save_load.publish_checkpoint`) — so what a crash can leave behind is the same
for all of them, whatever their layout inside the directory:

* ``<name>.tmp*``: an interrupted save. Never complete under its real name: deleted.
* ``<name>.old-*`` next to ``<name>``: the replaced copy, deleted; without ``<name>`` (a crash between the two
  renames of a replacement): the previous complete checkpoint, renamed back.

This module is engine-agnostic: it handles directories only; which ones are checkpoints and whether they are
intact is the engine's (``list_checkpoints`` / ``verify_checkpoint``), passed in as functions.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import CheckpointError, UsageError

__all__ = ["LOCK_FILE", "ResumeChoice", "SaveRootLock", "choose_resume", "clean_leftovers", "prune_checkpoints"]

LOCK_FILE = ".qgalore.lock"
# <published name>.tmp, .tmp-<tag> (interrupted save) or .old-<tag> (a replaced copy); published names are
# step_NNNNNN (local, ddp, fsdp) and global_stepN (deepspeed)
_LEFTOVER = re.compile(r"^((?:step_\d+|global_step\d+))\.(tmp|old)(?:-[0-9A-Za-z]+)?$")


def clean_leftovers(root: str | os.PathLike[str]) -> list[str]:
    """Remove what interrupted saves left in ``root`` (only the caller may write there: hold the lock); returns
    what was done, one line per directory, for the log. A replaced checkpoint whose replacement never arrived is
    renamed back rather than deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    for p in entries:  # first the rescues, so a rescued name is not deleted as a leftover below
        m = _LEFTOVER.match(p.name)
        # a pruned checkpoint (.old-prune) was being deleted on purpose: never brought back half-deleted
        if m and m.group(2) == "old" and not p.name.endswith(".old-prune") and p.is_dir() \
                and not (root / m.group(1)).exists():
            os.replace(p, root / m.group(1))
            done.append(f"restored {m.group(1)} from {p.name} (a save was interrupted while replacing it)")
    for p in entries:
        if _LEFTOVER.match(p.name) and p.exists() and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by an interrupted save)")
    return done


def prune_checkpoints(found: Sequence[tuple[int, Path]], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` of ``found`` (``(step, path)``, any order); 0 keeps every one.
    Returns the deleted paths. A checkpoint is first renamed to a ``.old`` leftover name and then deleted, so a
    crash mid-delete never leaves a half-deleted directory under a checkpoint's name."""
    if keep_last <= 0:
        return []
    gone = []
    for _, path in sorted(found)[:-keep_last]:
        aside = path.with_name(f"{path.name}.old-prune")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
        gone.append(path)
    return gone


@dataclass
class ResumeChoice:
    """The checkpoint a resume starts from (None: nothing to resume), what ``verify`` returned for it, and the
    newer ones skipped as damaged (``(path, reason)``)."""

    path: Path | None
    record: Any = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def choose_resume(found: Sequence[tuple[int, Path]], verify: Callable[[Path], Any]) -> ResumeChoice:
    """The newest of ``found`` that ``verify`` accepts (it raises :class:`CheckpointError` otherwise), with the
    newer ones it rejected. None when ``found`` is empty; :class:`CheckpointError` when none is intact."""
    skipped: list[tuple[Path, str]] = []
    for _, path in sorted(found, reverse=True):
        try:
            record = verify(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        return ResumeChoice(path, record, skipped)
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume: {len(skipped)} found, the newest "
                              f"({skipped[0][0].name}) {skipped[0][1]}")
    return ResumeChoice(None)


class SaveRootLock:
    """One run per checkpoint root: an exclusive ``flock`` on ``<root>/.qgalore.lock``, which names its holder
    (host, pid, start time, command).

    The kernel drops a ``flock`` when its process dies, however it dies, so the lock of a crashed or killed run is
    never stale: the next run takes it over (and says whose it was). Hosts that share the root over NFS need a
    file system whose ``flock`` is cluster-wide (NFSv4 maps it to byte-range locks); otherwise two hosts can both
    believe they hold it.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None
        self.previous: dict | None = None  # the holder recorded by a run that died holding the lock
        self._created_root = False

    @staticmethod
    def _describe(holder: dict) -> str:
        when = holder.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
        return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since} "
                f"({holder.get('command', '?')})")

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self, flag: str = "--save-dir") -> "SaveRootLock":
        """Take the lock or raise :class:`UsageError` naming the run that holds it."""
        try:
            self._created_root = self._created_root or not self.root.exists()
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"{flag} {self.root}: cannot create its lock file ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{flag} {self.root} is in use by another run: {self._describe(self._read())}; wait "
                             "for it to finish or choose another directory") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            same = False
        if not same:  # the holder unlinked the file while releasing it after we opened it: lock the new one
            os.close(fd)
            return self.acquire(flag)
        self._fd = fd
        self.previous = self._read() or None  # a lock file with a holder but no flock: that run died
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return self

    def describe_previous(self) -> str | None:
        """A line for the log when a dead run's lock was taken over."""
        if not self.previous:
            return None
        return f"took over the lock of {self.root} from a run that is gone: {self._describe(self.previous)}"

    def release(self) -> None:
        """Drop the lock; the lock file goes too (and the root, if this run created it and left it empty)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None
        if self._created_root:
            try:
                self.root.rmdir()  # only succeeds when empty: a run refused before writing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> "SaveRootLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
