"""Failure handling shared by the multi-process engines (ddp, fsdp, deepspeed).

A collective that fails because a peer died, hung or left becomes one :class:`~qgalore_dist.errors.DistributedError`
line (exit 1) instead of a traceback or a hang; an error on one rank is raised on every rank (one all-reduced flag)
instead of its peers waiting out ``--dist-timeout``; every rank must be started with the same settings; and
leaving the process group never waits on a peer that may be gone.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ...errors import DistributedError, UsageError
from ...parallel.launch_env import watch_launcher
from .base import Engine

__all__ = ["DistributedEngine", "joining", "rank_backend", "short_error"]

_PER_RANK_ARGS = ("local_rank",)  # settings a launcher may give each rank differently
_GLOO_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo prefixes its messages with "[/path/to/pair.cc:537] "


def _is_comm_failure(exc: BaseException) -> bool:
    """A collective failed because a peer is gone or silent (not a bug of ours nor a user error)."""
    if isinstance(exc, dist.DistError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in msg or "NCCL" in msg or "Connection reset" in msg
                                              or "Connection closed" in msg or "Timed out" in msg)


def short_error(exc: BaseException) -> str:
    """The first line of a communication error, without gloo's source path and boilerplate."""
    msg = _GLOO_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return msg.split(". This is typically")[0].rstrip(".")


def rank_backend(args) -> str:
    """nccl when the ranks run on CUDA (``--device cuda`` or, by default, when CUDA exists), else gloo; a fixed
    ``--device cuda:N`` is refused (every rank takes cuda:<its local rank>)."""
    from ..loop import resolve_device

    if args.device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    dev = resolve_device(args.device)
    if dev.type == "cuda" and dev.index is not None:
        raise UsageError(f"--engine {args.engine} --device {args.device}: every rank uses cuda:<its local rank>; "
                         "pass --device cuda (or cpu)")
    return "nccl" if dev.type == "cuda" else "gloo"


@contextlib.contextmanager
def joining(args) -> Iterator[None]:
    """Around joining the process group: malformed launcher variables -> UsageError (exit 2), a group that never
    forms -> one DistributedError line."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(f"--engine {args.engine}: {exc}") from exc
    except RuntimeError as exc:
        raise DistributedError(f"--engine {args.engine}: could not join the process group within --dist-timeout "
                               f"{args.dist_timeout:g}s ({short_error(exc)})") from exc


class DistributedEngine(Engine):
    """An engine over a process group. Subclasses set ``rank``, ``world_size``, ``device``, ``args`` and
    ``_closed = False``; ``_owns_group`` is False where the group belongs to someone else (it is then left open)."""

    _owns_group = True

    def _started(self):
        """This engine, once every rank is known to run the same settings (else the group is left and the
        error raised: the loop never saw this engine, so nobody else would close it)."""
        try:
            self._check_same_args()
        except BaseException:
            self.close()
            raise
        watch_launcher(what=f"rank {self.rank} of {self.world_size}")  # a dead launcher stops us (issue 15)
        return self

    def _check_same_args(self) -> None:
        """Every rank must run the same command line (a different --max-steps or --batch-size would leave ranks in
        different collectives): one all-gather of the settings, a mismatch raises the same UsageError on all."""
        if self.world_size == 1:
            return
        mine = {k: v for k, v in self.args.to_dict().items() if k not in _PER_RANK_ARGS}
        every: list[Any] = [None] * self.world_size
        with self._guard("comparing the ranks' settings"):
            dist.all_gather_object(every, mine)
        differ: dict[str, list[int]] = {}
        for r, theirs in enumerate(every):
            for k in sorted(set(mine) | set(theirs)):
                if theirs.get(k) != every[0].get(k):
                    differ.setdefault(k, []).append(r)
        if differ:
            raise UsageError(f"--engine {self.name}: every rank must be started with the same settings, but "
                             "compared with rank 0: " + "; ".join(
                                 f"--{k.replace('_', '-')} differs on rank(s) {ranks}" for k, ranks in differ.items()))

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn a collective that failed because a peer died / hung into one clear :class:`DistributedError`."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, DistributedError) or not _is_comm_failure(exc):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed — another rank died, hung or left "
                f"(its sockets closed, or no answer within --dist-timeout {self.args.dist_timeout:g}s): "
                f"{short_error(exc)}") from exc

    def _agree(self, error: str | None, exc_type: type[Exception], what: str) -> None:
        """Collective: raise ``exc_type`` on every rank when ``error`` is set on any (so no rank waits for one that
        already gave up); a barrier otherwise. Every rank raises the same text — the lowest failing rank's message,
        ``rank K: `` before it when K is not 0 — so rank 0 prints the one ``error:`` line that names the problem and
        the others, seeing it printed, exit silently (:func:`~qgalore_dist.train.cli.fail`). The raised exception
        has ``agreed = True``: a caller that agrees again on the way out must not (its peers have left)."""
        if self.world_size == 1 or not dist.is_initialized():
            if error is not None:
                raise exc_type(error)
            return
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        with self._guard(what):
            dist.all_reduce(flag)
        if not int(flag):
            return  # the healthy path stays one int all-reduce; messages travel only when a rank failed
        every: list[str | None] = [None] * self.world_size
        with self._guard(what):
            dist.all_gather_object(every, error)
        rank, message = next((r, m) for r, m in enumerate(every) if m is not None)
        exc = exc_type(message if rank == 0 else f"rank {rank}: {message}")
        exc.agreed = True
        raise exc

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise fp64 sum of a few scalars (losses, token counts) over ranks; every rank gets the result."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._metric_device())
        with self._guard("adding metrics (loss, evaluation) over ranks"):
            self._metric_all_reduce(t)
        return t.tolist()

    def mean_over_ranks(self, value: float) -> float:
        return self.sum_over_ranks([value])[0] / self.world_size

    def _metric_device(self) -> torch.device:
        return self.device

    def _metric_all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)  # a few scalars on the default group: metrics, not optimizer traffic

    def close(self) -> None:
        """Leave the process group. After a normal end, a barrier first (no rank closes its sockets while a peer
        still reads from them); after an error, at once (a peer may be gone); after ``--export``, at once too
        (rank 0's export communicates nothing, and a 7B export can outlast ``--dist-timeout``). torch 2.13 + gloo
        can abort at interpreter exit when a group is left undestroyed."""
        if self._closed:
            return
        self._closed = True
        if not (self._owns_group and dist.is_available() and dist.is_initialized()):
            return
        try:
            if sys.exc_info()[0] is None and self.world_size > 1 and not self.args.export:
                with self._guard("the final barrier"):
                    dist.barrier()
        finally:
            dist.destroy_process_group()
