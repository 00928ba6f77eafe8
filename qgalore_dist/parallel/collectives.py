"""The one place that calls ``torch.distributed`` for optimizer traffic (docs/design.md §3, "Collectives").

:class:`Collectives` runs on a process group of its own, created with ``dist.new_group`` over the default group's
ranks, so its calls never interleave with DeepSpeed's ``overlap_comm`` or FSDP2's streams on their groups. Every
method takes *lists* of tensors and flattens them into as few calls as possible: tensors are grouped by dtype
(first-appearance order, identical on every rank) and packed greedily, in order, into buckets of at most
``bucket_bytes`` (default 64 MiB; a single larger tensor gets a bucket of its own). A bucket made of one contiguous
tensor already on the communication device is sent as is; otherwise it is staged through one flat buffer, so the
inputs may live on any device (NCCL needs its buffers on the current CUDA device: staging puts them there).

All ranks must call the same methods in the same order with tensors of the same shapes and dtypes, like any
collective. Results are written back in place, except :meth:`Collectives.gather_to`, which returns the gathered
tensor on ``dst``.

Byte accounting
---------------
Counters are per rank and per call, in bytes of this rank's payload ``P`` (the bucket's size on this rank), for
ring / chain algorithms (NCCL's defaults; gloo's are of the same order), N = world size:

=====================  =========================================  ==========================================
primitive              sent                                       received
=====================  =========================================  ==========================================
all_reduce             ⌊2·(N−1)·P / N⌋ (ring: reduce-scatter +    same
                       all-gather, 2(N−1) steps of P/N)
reduce → dst           P on every rank but dst                    P on dst (partial sums flow along the chain;
                                                                  the owner receives one reduced payload)
broadcast ← src        P on src                                   P on every other rank
all_gather (P = local  (N−1)·P (ring: forward every other         same
chunk)                 rank's chunk once)
gather_to → dst        P' on every rank but dst                   (N−1)·P' on dst
(P' = padded shard)
scatter_rows ← src     (N−1)·P' on src                            P' on every rank but src
(P' = padded shard)
barrier                0                                          0 (one call)
=====================  =========================================  ==========================================

``broadcast_from_owners`` is made of the above: every rank must *receive* every other owner's payload, Σ_{o≠r} P_o —
a floor no algorithm beats. One broadcast per owner meets it exactly; one all-gather pads every owner's chunk to
the largest, receiving (N−1)·max_o P_o ≥ Σ_{o≠r} P_o, equal only when all owners' payloads are equal. So it
all-gathers (one call instead of N) exactly when the payloads are equal and the gathered buffer fits one bucket,
and broadcasts per owner otherwise. ``reduce_to_owners`` mirrors it with one bucketed reduce per owner.

Failure bound
-------------
``timeout`` (a ``datetime.timedelta``) is the group's timeout: on gloo a collective that a dead or stuck rank never
joins raises on the others after at most that long (a rank whose process is gone usually makes them fail at once,
when its sockets close). On NCCL the same timeout arms the watchdog, which aborts the communicator (and by
default the process, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``) instead of hanging forever.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["Collectives", "CommCounters", "DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT", "all_reduce_bytes"]

DEFAULT_BUCKET_BYTES = 64 * 2**20
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT}


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); 2.8 only has the old one
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce_bytes(payload: int, world_size: int) -> int:
    """Ring all-reduce bytes sent (= received) by one rank for a ``payload``-byte buffer."""
    return 2 * (world_size - 1) * payload // world_size


@dataclass
class CommCounters:
    """Bytes and calls of one rank: totals since construction, plus the current step (``reset_step``)."""

    sent: int = 0
    received: int = 0
    calls: int = 0
    by_primitive: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, primitive: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.calls += 1
        d = self.by_primitive.setdefault(primitive, {"sent": 0, "received": 0, "calls": 0})
        d["sent"] += sent
        d["received"] += received
        d["calls"] += 1

    def as_dict(self) -> dict:
        """Flat metrics: ``comm_bytes`` is sent + received (traffic through this rank's link, both ways)."""
        return {"comm_bytes": self.sent + self.received, "comm_bytes_sent": self.sent,
                "comm_bytes_received": self.received, "comm_calls": self.calls,
                "by_primitive": {k: dict(v) for k, v in sorted(self.by_primitive.items())}}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Collectives:
    """Bucketed, byte-counted collectives on a private process group.

    ``Collectives()`` must be constructed at the same point on every rank of the default group (``new_group`` is
    itself collective). Without an initialised default group (single process) it runs in local mode: world size
    1, every method is an exact no-op on the data and counts nothing. On NCCL, select the rank's GPU
    (``torch.cuda.set_device``) before constructing: staging buffers go to the current CUDA device.

    Args:
        backend: backend of the private group; default: the default group's (gloo or nccl).
        timeout: group timeout; a collective that a dead rank never joins fails within it.
        bucket_bytes: largest staged buffer per call.
        group: use this existing group instead of creating one (tests, or sharing one between engines).
    """

    def __init__(self, backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, group: dist.ProcessGroup | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes!r} is invalid: must be >= 1")
        if not isinstance(timeout, datetime.timedelta):
            raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__}")
        self.bucket_bytes = int(bucket_bytes)
        self.timeout = timeout
        self.local = not (dist.is_available() and dist.is_initialized())
        if self.local:
            self.group = None
            self.backend = "local"
            self.rank, self.world_size = 0, 1
        else:
            if group is None:
                backend = backend or dist.get_backend()
                # all ranks of the default group, in order: a group of our own, not shared with DeepSpeed/FSDP2
                group = dist.new_group(ranks=list(range(dist.get_world_size())), backend=backend, timeout=timeout)
            self.group = group
            self.backend = str(dist.get_backend(group)).lower()
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._total = CommCounters()
        self._step = CommCounters()

    # --- counters -------------------------------------------------------------------------------------------
    def _count(self, primitive: str, sent: int, received: int) -> None:
        self._total.add(primitive, sent, received)
        self._step.add(primitive, sent, received)

    def step_counters(self) -> dict:
        """This step's bytes and calls (since the last :meth:`reset_step`) as flat metrics."""
        return self._step.as_dict()

    def total_counters(self) -> dict:
        """Bytes and calls since construction."""
        return self._total.as_dict()

    def reset_step(self) -> dict:
        """Return this step's counters and start a new step."""
        out = self._step.as_dict()
        self._step = CommCounters()
        return out

    # --- bucketing --------------------------------------------------------------------------------------------
    def buckets(self, tensors: Sequence[torch.Tensor], scale: int = 1) -> list[list[int]]:
        """Indices of ``tensors`` grouped into buckets: same dtype, at most ``bucket_bytes`` (counting
        ``scale`` × payload, for all-gather outputs), greedy in order. Empty tensors are left out."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                by_dtype.setdefault(t.dtype, []).append(i)
        out: list[list[int]] = []
        for idx in by_dtype.values():
            cur: list[int] = []
            size = 0
            for i in idx:
                b = _nbytes(tensors[i]) * scale
                if cur and size + b > self.bucket_bytes:
                    out.append(cur)
                    cur, size = [], 0
                cur.append(i)
                size += b
            if cur:
                out.append(cur)
        return out

    def _direct(self, ts: list[torch.Tensor]) -> bool:
        # a lone contiguous tensor on the communication device needs no staging copy
        return len(ts) == 1 and ts[0].is_contiguous() and ts[0].device == self.device

    def _pack(self, ts: list[torch.Tensor]) -> torch.Tensor:
        """One flat buffer of ``ts`` (a lone contiguous tensor is used as is: callers that need 1-D reshape)."""
        if self._direct(ts):
            return ts[0]
        flat = torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=self.device)
        off = 0
        for t in ts:
            flat[off:off + t.numel()].view(t.shape).copy_(t)
            off += t.numel()
        return flat

    def _unpack(self, flat: torch.Tensor, ts: list[torch.Tensor]) -> None:
        if self._direct(ts) and flat is ts[0]:
            return
        off = 0
        for t in ts:
            t.copy_(flat[off:off + t.numel()].view(t.shape))
            off += t.numel()

    # --- primitives -------------------------------------------------------------------------------------------
    def present_everywhere(self, labels: Sequence[str], mine: Sequence[bool], what: str) -> list[bool]:
        """Collective: which of ``labels`` are present (e.g. got a gradient) — on every rank or on none. One int32
        all-reduce; a label present on some ranks only raises ``RuntimeError`` (``what`` + the first five) on every
        rank, rather than collectives of different shapes hanging."""
        counts = torch.tensor(list(mine), dtype=torch.int32, device=self.device)
        self.all_reduce([counts])
        counts = counts.tolist()
        partial = [f"{lab} ({c} of {self.world_size})" for lab, c in zip(labels, counts) if 0 < c < self.world_size]
        if partial:
            raise RuntimeError(f"{what}: " + ", ".join(partial[:5]))
        return [c > 0 for c in counts]

    def agreed(self, fn: Callable[[], None], what: str) -> None:
        """Run ``fn`` on this rank; if it raises (ValueError, KeyError, TypeError, RuntimeError) on *any* rank, raise
        ``ValueError`` (``what`` + the local reason, or "on another rank") on *every* rank — one int32 all-reduce —
        so no rank goes on to a collective its peers never reach."""
        error = None
        try:
            fn()
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.device)
        self.all_reduce([flag])
        if int(flag) or error is not None:
            raise ValueError(f"{what} on rank {self.rank}: {error}" if error else
                             f"{what} on another rank (see its error)")

    def all_reduce(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """In place on every rank: the element-wise ``op`` ("sum", "avg", "max", "min", "product") over ranks.

        "avg" is a sum divided by N (gloo has no AVG), for floating tensors only."""
        if op != "avg" and op not in _OPS:
            raise ValueError(f"op={op!r} is invalid: allowed: avg, {', '.join(_OPS)}")
        if op == "avg" and any(not t.is_floating_point() for t in tensors):
            raise ValueError("op='avg' needs floating-point tensors")
        if self.world_size == 1:
            return
        rop = _OPS["sum" if op == "avg" else op]
        for bucket in self.buckets(tensors):
            ts = [tensors[i] for i in bucket]
            flat = self._pack(ts)
            dist.all_reduce(flat, op=rop, group=self.group)
            if op == "avg":
                flat.div_(self.world_size)
            self._unpack(flat, ts)
            b = all_reduce_bytes(_nbytes(flat), self.world_size)
            self._count("all_reduce", b, b)

    def reduce(self, tensors: Sequence[torch.Tensor], dst: int, op: str = "sum") -> None:
        """Element-wise ``op`` over ranks, into ``tensors`` on rank ``dst`` (e.g. gradients summed at their owner).

        Other ranks' tensors are left as they were (they are staged, or — for a lone tensor sent as is — copied
        back after the call, since backends may use a non-root buffer as scratch)."""
        self._check_rank(dst, "dst")
        if op not in _OPS:
            raise ValueError(f"op={op!r} is invalid: allowed: {', '.join(_OPS)}")
        if self.world_size == 1:
            return
        for bucket in self.buckets(tensors):
            ts = [tensors[i] for i in bucket]
            flat = self._pack(ts)
            if flat is ts[0] and self.rank != dst:
                flat = flat.clone()  # keep the caller's tensor intact on non-root ranks
            dist.reduce(flat, dst=self._global(dst), op=_OPS[op], group=self.group)
            p = _nbytes(flat)
            if self.rank == dst:
                self._unpack(flat, ts)
                self._count("reduce", 0, p)
            else:
                self._count("reduce", p, 0)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s."""
        self._check_rank(src, "src")
        if self.world_size == 1:
            return
        for bucket in self.buckets(tensors):
            ts = [tensors[i] for i in bucket]
            flat = self._pack(ts) if self.rank == src or self._direct(ts) else torch.empty(
                sum(t.numel() for t in ts), dtype=ts[0].dtype, device=self.device)
            dist.broadcast(flat, src=self._global(src), group=self.group)
            p = _nbytes(flat)
            if self.rank == src:
                self._count("broadcast", p, 0)
            else:
                self._unpack(flat, ts)
                self._count("broadcast", 0, p)

    def broadcast_from_owners(self, tensors_by_owner: Mapping[int, Sequence[torch.Tensor]]) -> None:
        """Every owner rank sends its tensors to all ranks: afterwards every rank holds every owner's values.

        Every rank passes the same mapping (its own tensors as sources, the others' as receive buffers). Per dtype:
        one all-gather when every rank owns an equal payload and the gathered buffer fits a bucket, else one
        bucketed broadcast per owner with a non-empty payload (see the module docstring: fewest bytes received).
        """
        if self.world_size == 1:
            return
        for o in tensors_by_owner:
            self._check_rank(o, "owner")
        dtypes: list[torch.dtype] = []
        for o in sorted(tensors_by_owner):
            for t in tensors_by_owner[o]:
                if t.numel() and t.dtype not in dtypes:
                    dtypes.append(t.dtype)
        for dtype in dtypes:
            per_owner = {o: [t for t in tensors_by_owner.get(o, ()) if t.dtype == dtype and t.numel()]
                         for o in range(self.world_size)}
            sizes = {o: sum(_nbytes(t) for t in ts) for o, ts in per_owner.items()}
            equal = len(set(sizes.values())) == 1 and sizes[0] > 0
            if equal and sizes[0] * self.world_size <= self.bucket_bytes:
                self._all_gather_owners(per_owner)
            else:
                for o in range(self.world_size):
                    if per_owner[o]:
                        self.broadcast(per_owner[o], o)

    def broadcast_owner_updates(self, names: Sequence[str], owner: Callable[[str], int],
                                tensors: Callable[[str], Sequence[torch.Tensor]],
                                scalars: Mapping[str, float]) -> dict[str, float]:
        """:meth:`broadcast_from_owners` of each matrix's ``tensors(name)`` (owner: source, others: receive
        buffers) plus one float64 scalar per matrix (``scalars``: this rank's owned names -> value, e.g. the
        step size), packed with its owner's payload; returns ``{name: scalar}`` for every name, on every rank."""
        mine = {o: [n for n in names if owner(n) == o] for o in range(self.world_size)}
        sizes = {o: torch.tensor([scalars[n] for n in ns] if o == self.rank else [0.0] * len(ns),
                                 dtype=torch.float64, device=self.device) for o, ns in mine.items() if ns}
        by_owner: dict[int, list[torch.Tensor]] = {}
        for n in names:
            by_owner.setdefault(owner(n), []).extend(tensors(n))
        for o, t in sizes.items():
            by_owner[o].append(t)
        self.broadcast_from_owners(by_owner)
        return {n: v for o, t in sizes.items() for n, v in zip(mine[o], t.tolist())}

    def _all_gather_owners(self, per_owner: dict[int, list[torch.Tensor]]) -> None:
        mine = self._pack(per_owner[self.rank]).reshape(-1)  # gloo's all_gather wants 1-D
        n = mine.numel()
        out = torch.empty(n * self.world_size, dtype=mine.dtype, device=self.device)
        _all_gather_flat(out, mine, group=self.group)
        for o, ts in per_owner.items():
            if o != self.rank:
                self._unpack(out[o * n:(o + 1) * n], ts)
        b = (self.world_size - 1) * _nbytes(mine)
        self._count("all_gather", b, b)

    def reduce_to_owners(self, tensors_by_owner: Mapping[int, Sequence[torch.Tensor]], op: str = "sum") -> None:
        """Each owner receives the ``op`` over ranks of its tensors (low-rank gradients to their owners): one
        bucketed :meth:`reduce` per owner, in rank order."""
        if self.world_size == 1:
            return
        for o in sorted(tensors_by_owner):
            if tensors_by_owner[o]:
                self.reduce(tensors_by_owner[o], o, op)

    def gather_to(self, tensor: torch.Tensor, dst: int, sizes: Sequence[int] | None = None) -> torch.Tensor | None:
        """Concatenate every rank's row shard (dim 0) on rank ``dst`` only — a full gradient to its owner, never
        materialised on the other ranks. Returns the full tensor on ``dst``, None elsewhere.

        ``sizes``: every rank's number of rows, identical on all ranks (default: all equal to this rank's);
        uneven shards are padded to the largest for the transfer (the counters count the padded payload).
        """
        self._check_rank(dst, "dst")
        rows = list(sizes) if sizes is not None else [tensor.shape[0]] * self.world_size
        if len(rows) != self.world_size or rows[self.rank] != tensor.shape[0]:
            raise ValueError(f"sizes={rows} do not match world size {self.world_size} and this rank's "
                             f"{tensor.shape[0]} rows")
        if self.world_size == 1:
            return tensor.clone()
        width = max(rows)
        shard = tensor.contiguous()
        if shard.device != self.device or shard.shape[0] != width:
            padded = torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=self.device)
            padded[:tensor.shape[0]].copy_(tensor)
            shard = padded
        p = _nbytes(shard)
        if self.rank == dst:
            parts = [torch.empty_like(shard) for _ in range(self.world_size)]
            dist.gather(shard, gather_list=parts, dst=self._global(dst), group=self.group)
            self._count("gather", 0, (self.world_size - 1) * p)
            return torch.cat([part[:n] for part, n in zip(parts, rows)]).to(tensor.device)
        dist.gather(shard, gather_list=None, dst=self._global(dst), group=self.group)
        self._count("gather", p, 0)
        return None

    def scatter_rows(self, tensor: torch.Tensor | None, src: int, sizes: Sequence[int], *,
                     like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`gather_to`: rank ``src`` holds ``tensor`` (dim 0 = ``sum(sizes)`` rows) and every
        rank k receives its rows ``[Σ_{j<k} sizes[j], Σ_{j<=k} sizes[j])`` (e.g. a left projector's rows to the
        ranks holding those weight rows). ``like`` gives the dtype, device and trailing shape on every rank
        (``tensor`` is ignored elsewhere than on ``src``). Uneven shards are padded to the largest for the
        transfer (counted padded); the source keeps its own rows without sending them."""
        self._check_rank(src, "src")
        rows = [int(x) for x in sizes]
        if len(rows) != self.world_size:
            raise ValueError(f"sizes={rows} do not match world size {self.world_size}")
        tail = tuple(like.shape[1:])
        if self.world_size == 1:
            return tensor.clone()
        width = max(rows)
        starts = [sum(rows[:k]) for k in range(self.world_size)]
        out = torch.zeros((width, *tail), dtype=like.dtype, device=self.device)
        p = _nbytes(out)
        if self.rank == src:
            parts = []
            for k in range(self.world_size):
                part = torch.zeros((width, *tail), dtype=like.dtype, device=self.device)
                part[:rows[k]].copy_(tensor[starts[k]:starts[k] + rows[k]])
                parts.append(part)
            dist.scatter(out, scatter_list=parts, src=self._global(src), group=self.group)
            self._count("scatter", (self.world_size - 1) * p, 0)
        else:
            dist.scatter(out, scatter_list=None, src=self._global(src), group=self.group)
            self._count("scatter", 0, p)
        return out[:rows[self.rank]].to(like.device)

    def all_gather_into(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        """``outputs[i]`` ← the concatenation along dim 0 of every rank's ``inputs[i]`` (equal shards on all
        ranks: e.g. INT8 weight rows gathered for a forward pass). Bucketed: many shards share one call."""
        if len(outputs) != len(inputs):
            raise ValueError(f"{len(outputs)} outputs for {len(inputs)} inputs")
        for o, i in zip(outputs, inputs):
            if o.dtype != i.dtype or o.numel() != i.numel() * self.world_size or \
                    tuple(o.shape[1:]) != tuple(i.shape[1:]):
                raise ValueError(f"output {tuple(o.shape)} {o.dtype} cannot hold {self.world_size} shards "
                                 f"{tuple(i.shape)} {i.dtype}")
        if self.world_size == 1:
            for o, i in zip(outputs, inputs):
                o.copy_(i)
            return
        for bucket in self.buckets(inputs, scale=self.world_size):
            ins = [inputs[i] for i in bucket]
            mine = self._pack(ins).reshape(-1)  # gloo's all_gather wants 1-D
            n = mine.numel()
            out = torch.empty(n * self.world_size, dtype=mine.dtype, device=self.device)
            _all_gather_flat(out, mine, group=self.group)
            shards = out.view(self.world_size, n)  # row k: rank k's packed chunk
            off = 0
            for k in bucket:
                m = inputs[k].numel()
                part = shards[:, off:off + m]  # [N, m]: every rank's shard of tensor k, in rank order
                dst = outputs[k]
                if dst.is_contiguous():
                    dst.view(self.world_size, m).copy_(part)
                else:
                    dst.copy_(part.reshape(dst.shape))
                off += m
            b = (self.world_size - 1) * _nbytes(mine)
            self._count("all_gather", b, b)

    def barrier(self) -> None:
        """Wait for every rank of the group (gloo: ``monitored_barrier``, which names a missing rank)."""
        if self.world_size == 1:
            return
        if self.backend == "gloo":
            dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        else:
            dist.barrier(group=self.group, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._count("barrier", 0, 0)

    # --- helpers ----------------------------------------------------------------------------------------------
    def _check_rank(self, r: int, what: str) -> None:
        if not 0 <= r < self.world_size:
            raise ValueError(f"{what}={r} is not a rank of this group (world size {self.world_size})")

    def _global(self, group_rank: int) -> int:
        # torch's src/dst are global ranks; our group spans the default group's ranks in order, but stay exact
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank
