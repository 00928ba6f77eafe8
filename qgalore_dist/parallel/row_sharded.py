"""The ``row_sharded`` placement: Q-GaLore / VLoRP over row-sharded weights (FSDP2, DeepSpeed ZeRO-3;
docs/design.md §3, §3a).

Every rank holds a *row shard* of every projected ``m×n`` matrix — rows ``[r0, r1)`` of its INT8 codes + scales
(split like ``torch.chunk``: ``ceil(m/N)`` rows per rank, the last ranks shorter or empty) — and receives the
gradient of exactly those rows, already averaged over ranks by the engine (FSDP2's reduce-scatter, or the ZeRO-3
side-car's own). Each matrix has one **owner** (:class:`~qgalore_dist.parallel.plan.OwnershipPlan`), the only rank
that computes its SVD and decides its refresh gate. The math is the rule's (:class:`~..optim.lowrank_adamw.
LowRankAdamW`, :class:`~..optim.projfactor.ProjFactor`, any projection, any VLoRP granularity ``c``, moments kept
or rotated on refresh); this class only moves data between the rule's phases. What lives where (``N`` ranks,
``k`` = this rank's rows, ``m'×n'`` the VLoRP-reshaped gradient, ``r`` the rank):

======================  =====================================  =========================================
                        right projection (m >= n)              left projection (m < n)
======================  =====================================  =========================================
projector               Q (r×n') INT4, replicated              P (m'×r) INT4, replicated (small)
low-rank gradient       R = G'_rows Qᵀ, reshaped rows that     R = Σ_ranks P_rowsᵀ G'_rows (r×n'),
                        cover the shard, row-local             reduced to the owner
moments (8-bit)         rows-sharded: each reshaped row's      owner only (r×n')
                        moments at the rank holding its first
                        weight row
ProjFactor factors      row factor rows-sharded, column        owner only (m + n)
                        factor replicated
update                  ΔW_rows = N_rows Q, row-local          owner normalises and broadcasts N (r×n');
                                                               every rank applies ΔW_rows = P_rows N
bytes per step          0 (see "cut rows" for c < 1;           r·n'·b reduced + r·n'·b broadcast
                        ProjFactor: an all-reduce of n + 1)    (ProjFactor: + (m + n)·b)
======================  =====================================  =========================================

**Cut rows** (right projection, ``c < 1``): a reshaped row glues ``1/c`` weight rows together, and a shard
boundary (``torch.chunk``'s, not moved) may cut one. Each rank projects its part of such a row (the rule's
:meth:`~..optim.lowrank_adamw.LowRankAdamW.project_rows`, with the neighbours' part taken as zero); one bucketed
all-reduce of every cut row's r-vector completes them on the ranks that touch them; the rank holding the row's
first weight row holds its moments and normalises it; a second all-reduce brings the normalised r-vector (for
ProjFactor its first moment) back. Bytes: ``2 × (cut rows) × r × b`` all-reduced per step, at most ``N − 1`` cut
rows per matrix; none when ``c >= 1`` or the boundaries fall on whole reshaped rows.

**Row-additive sums** (ProjFactor, right projection): the rule's
:meth:`~..optim.projfactor.ProjFactor.shard_sums` returns what each shard adds up (its partial column sums of Ĝ²
and the sum of its rows' row factor); one bucketed all-reduce sums them, bitwise identically on every rank.

**Refresh** (a matrix's gate says it is due; every rank knows when, the owner broadcasts the next refresh step
after each one): every rank sends its gradient rows to the owner only (bucketed: all due matrices of one owner
share one gather, up to ``refresh_bucket_bytes``), the owner rebuilds the full (already averaged) gradient, runs
the SVD + gate, then broadcasts the projector (INT4 codes + scales). The full gradient never exists on a
non-owner. Random projections (gaussian, rademacher) need no gradient: the owner draws, and the draw's step
travels instead of the matrix. With moments rotated on refresh, each rank rotates the moment rows it holds with
the old and the new stored basis (the owner does the same inside the rule's refresh).

**Stochastic rounding** is keyed by (seed, step, name, *global* element index): the row shard passes its global
row offset, so a sharded run rounds exactly like the single-device one. With fp64 gradients (parity runs) the
whole step reproduces :class:`~qgalore_dist.optim.optimizer.QGaLoreOptimizer` (``layerwise=False``) up to the
summation order of the matmuls (≈1e-16), which practically never flips a rounding decision.

**Clipping**: ``√(‖dense‖² + Σ‖R‖²)`` — the reference's definition — from one all-reduce of each rank's partial
sums (right: the rows of R whose moments it holds; left: the owner's reduced R; dense: its shards' gradients).
Norm and clip factor are in :attr:`last_step` after ``step()``; an engine that must put its own step between the
halves (DeepSpeed ZeRO-3) calls ``begin_step``, ``shared_norm(extra_sq)`` (adding the norm² of what it steps
itself) and ``finish_step`` — :class:`~qgalore_dist.optim.optimizer.QGaLoreBase`'s halves.

**Dense parameters** (optional): ``(name, tensor)`` pairs whose local data and ``.grad`` are this rank's shards
(a DTensor is read through ``to_local()``), already averaged; they are stepped by the element-wise
:func:`~qgalore_dist.optim.dense_adamw.dense_adamw_step`, fp32 or 8-bit state (8-bit blocks lie inside rows of
the local shard; whether a tensor is 8-bit is decided on the *global* element count, as on one device).

Every rank must call ``step``, ``load_state_dict`` at the same point; ``state_dict`` is local.
An engine builds one :class:`RowShard` per matrix over its local rows and calls ``step(grads=...)`` with the averaged
gradient rows (see README "FSDP2" and :class:`~qgalore_dist.train.engines.fsdp.FSDPEngine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..config import QGaLoreConfig
from ..optim.dense_adamw import DenseState
from ..optim.lowrank_adamw import LowRankAdamW, MatrixState
from ..optim.norms import StepResult, squared_norm
from ..optim.optimizer import QGaLoreBase
from ..optim.projfactor import ProjFactorState
from ..optim.rules import make_rule
from ..projection.projector import lowrank_shape
from ..projection.random_proj import RANDOM_PROJECTIONS
from ..projection.vlorp import covering_rows, held_rows, resolve_granularity
from ..quant.int8 import Int8Weight
from ..quant.state8 import Blockwise8bit
from .collectives import Collectives, CommCounters
from .plan import OwnershipPlan, make_plan, plan_options

__all__ = ["RowGeometry", "RowShard", "RowShardedQGaLoreOptimizer", "chunk_rows",
           "STATE_FORMAT"]

STATE_FORMAT = "qgalore_dist.row_sharded/1"
REFERENCE_FORMAT = "qgalore_dist.optimizer/1"  # QGaLoreOptimizer's (what a merge produces)


def chunk_rows(m: int, world_size: int) -> list[int]:
    """Rows per rank of an ``m``-row tensor split like ``torch.chunk`` (FSDP2's and ZeRO-3 side-car's rule):
    ``ceil(m / N)`` each, the tail shorter, trailing ranks empty (e.g. m=4, N=3 -> [2, 2, 0])."""
    if world_size < 1 or m < 0:
        raise ValueError(f"chunk_rows({m}, {world_size}): need m >= 0 and world_size >= 1")
    size = -(-m // world_size) if m else 0
    out, left = [], m
    for _ in range(world_size):
        k = min(size, left)
        out.append(k)
        left -= k
    return out


@dataclass
class RowShard:
    """One projected matrix as this rank holds it.

    name: the parameter name (``"<module>.weight"``; keys state, plan and the rounding stream).
    shape: the global (m, n).
    rows_per_rank: every rank's row count (:func:`chunk_rows`; identical on all ranks); this rank's rows start at
        ``sum(rows_per_rank[:rank])``.
    weight: this rank's rows — :class:`Int8Weight` over the engine's local codes [k, n] int8 and scales [k, G]
        (updated in place), or a float [k, n] tensor in the float reference mode (``config.quantize=False``);
        or a zero-argument callable returning either, resolved at every step (FSDP2 may re-allocate a short
        rank's padded shard at its lazy initialisation).
    grad: callable returning this rank's averaged gradient rows [k, n] (or None: no gradient this step); an
        engine may instead pass ``grads=`` to :meth:`RowShardedQGaLoreOptimizer.step`.
    param: the tensor registered in ``param_groups`` (e.g. the FSDP2 parameter, so ``zero_grad`` clears it);
        default: the weight's codes.
    """

    name: str
    shape: tuple[int, int]
    rows_per_rank: Sequence[int]
    weight: Int8Weight | torch.Tensor
    grad: Callable[[], torch.Tensor | None] | None = None
    param: torch.Tensor | None = None

    def row_offset(self, rank: int) -> int:
        return int(sum(self.rows_per_rank[:rank]))

    def local_weight(self) -> Int8Weight | torch.Tensor:
        w = self.weight
        return w if isinstance(w, (Int8Weight, torch.Tensor)) else w()

    def local_tensor(self) -> torch.Tensor:
        w = self.local_weight()
        return w.codes if isinstance(w, Int8Weight) else w


@dataclass(frozen=True)
class RowGeometry:
    """Where one matrix's VLoRP-reshaped rows lie for one rank (bookkeeping of the placement, no math).

    r0, rows: the rank's weight rows ``[r0, r0 + rows)``. g_off, g_rows: the reshaped rows covering them
    (:func:`~..projection.vlorp.covering_rows`). h_off, h_rows: the reshaped rows whose state the rank holds
    (:func:`~..projection.vlorp.held_rows`). cut: the reshaped rows that a shard boundary cuts (right projection,
    merged rows only) — the same tuple on every rank.
    """

    r0: int
    rows: int
    g_off: int
    g_rows: int
    h_off: int
    h_rows: int
    cut: tuple[int, ...] = ()

    @classmethod
    def of(cls, st: MatrixState, rows_per_rank: Sequence[int], rank: int) -> "RowGeometry":
        m, mg = st.shape[0], st.proj_shape[0]
        r0, rows = int(sum(rows_per_rank[:rank])), int(rows_per_rank[rank])
        g_off, g_rows, _, _ = covering_rows(r0, rows, m, mg)
        h_off, h_rows = held_rows(r0, rows, m, mg)
        cut: tuple[int, ...] = ()
        if st.side == "right" and mg < m:
            k = m // mg
            bounds = {int(sum(rows_per_rank[:i])) for i in range(1, len(rows_per_rank))} - {0, m}
            cut = tuple(sorted({b // k for b in bounds if b % k}))
        return cls(r0, rows, g_off, g_rows, h_off, h_rows, cut)

    def covers(self, i: int) -> bool:
        return self.g_off <= i < self.g_off + self.g_rows

    def holds(self, i: int) -> bool:
        return self.h_off <= i < self.h_off + self.h_rows

    def held(self, cover: torch.Tensor) -> torch.Tensor:
        """The held rows of a tensor over the covering rows."""
        return cover[self.h_off - self.g_off:self.h_off - self.g_off + self.h_rows]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients), any other tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


class RowShardedQGaLoreOptimizer(QGaLoreBase, torch.optim.Optimizer):
    """The row-sharded placement of Q-GaLore / VLoRP (see the module docstring).

    Args:
        shards: one :class:`RowShard` per projected matrix, in the same (model) order on every rank.
        config: projected-matrix settings (as for ``QGaLoreOptimizer``): any rule, projection, granularity.
        collectives: the :class:`Collectives` of the sharding world (local mode: one process).
        plan: owners; default: :func:`~qgalore_dist.parallel.plan.make_plan` over the shards' shapes.
        dense: ``(name, tensor)`` dense parameters (local shards or DTensors) this optimizer steps with AdamW.
        dense_shapes: global shape of each dense parameter (decides 8-bit vs fp32 state as on one device);
            default: the local shape.
        dense_offsets: global element offset of each dense parameter's local shard (keys the stochastic rounding
            of bf16-stored dense weights by global index, as on one device); default 0.
        dense_state_bits: 32 or 8.
        grad_clip: max global norm (0 = off).
        stagger_refresh: spread later refreshes over the interval (as ``QGaLoreOptimizer``).
        dense_lr, dense_weight_decay: dense group defaults (config's otherwise).
        refresh_bucket_bytes: full-gradient bytes one refresh gather may carry to one owner (default 32 MiB: the
            gathered gradients are the refresh step's largest transient on the owner — 256 MiB put ZeRO-3's
            llama_130m peak ~200 MiB above ZeRO-2's; a bucket always takes at least one whole matrix).
    """

    def __init__(self, shards: Sequence[RowShard], config: QGaLoreConfig, collectives: Collectives,
                 plan: OwnershipPlan | None = None, *, dense: Sequence[tuple[str, torch.Tensor]] = (),
                 dense_shapes: Mapping[str, Sequence[int]] | None = None,
                 dense_offsets: Mapping[str, int] | None = None, dense_state_bits: int = 32,
                 grad_clip: float = 0.0, stagger_refresh: bool = False, dense_lr: float | None = None,
                 dense_weight_decay: float | None = None, refresh_bucket_bytes: int = 1 << 25):
        if dense_state_bits not in (8, 32):
            raise ValueError(f"dense_state_bits={dense_state_bits!r} is invalid: allowed: 8 or 32")
        if grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip!r} is invalid: must be >= 0 (0 = off)")
        if refresh_bucket_bytes < 1:
            raise ValueError(f"refresh_bucket_bytes={refresh_bucket_bytes!r} is invalid: must be >= 1")
        self.config = config
        self.collectives = collectives
        self.rank, self.world_size = collectives.rank, collectives.world_size
        self.shards = list(shards)
        if not self.shards and not dense:
            raise ValueError("nothing to optimise: no projected matrices and no dense parameters")
        self._shard = {s.name: s for s in self.shards}
        for s in self.shards:
            m, n = s.shape
            if len(s.rows_per_rank) != self.world_size or sum(s.rows_per_rank) != m:
                raise ValueError(f"{s.name}: rows_per_rank={list(s.rows_per_rank)} does not split {m} rows over "
                                 f"{self.world_size} ranks")
            lt = s.local_tensor()
            if tuple(lt.shape) != (s.rows_per_rank[self.rank], n):
                raise ValueError(f"{s.name}: local rows have shape {tuple(lt.shape)}, expected "
                                 f"({s.rows_per_rank[self.rank]}, {n})")
            if config.quantize != isinstance(s.local_weight(), Int8Weight):
                raise ValueError(f"{s.name}: weight is {'not ' if config.quantize else ''}INT8 but "
                                 f"quantize={config.quantize}")
        if plan is None:
            opts = plan_options(config)
            if config.projection in RANDOM_PROJECTIONS:  # a draw costs like a sketch, not like an SVD
                opts["projection"] = "rsvd"
            plan = make_plan({s.name: s.shape for s in self.shards}, self.world_size, **opts)
        if plan.world_size != self.world_size or set(plan.owner) != set(self._shard):
            raise ValueError(f"the ownership plan (world size {plan.world_size}) does not cover these matrices at "
                             f"world size {self.world_size}")
        self.plan = plan
        self.owned = set(plan.owned_by(self.rank))
        self.rule: LowRankAdamW = make_rule(config)
        # the same per-matrix granularity as one device (an error, or c = 1 with one warning, where c does not fit)
        self.granularity = resolve_granularity({s.name: s.shape for s in self.shards}, config.granularity,
                                               config.rank, config.proj_type, config.granularity_fallback)
        self.dense_named = list(dense)
        groups = self._param_groups(config, [p for _, p in self.dense_named],
                                    [s.param if s.param is not None else s.local_tensor() for s in self.shards],
                                    dense_lr, dense_weight_decay)
        super().__init__(groups, {"lr": config.lr, "weight_decay": config.weight_decay})

        gap = config.update_proj_gap
        self.mstate: dict[str, MatrixState] = {}
        self.geometry: dict[str, RowGeometry] = {}
        for i, s in enumerate(self.shards):
            offset = (i * gap) // len(self.shards) if stagger_refresh else 0
            self.mstate[s.name] = self._init_state(s, offset)
            self.geometry[s.name] = RowGeometry.of(self.mstate[s.name], s.rows_per_rank, self.rank)
        # every rank's held reshaped rows (where a whole-matrix low-rank gradient is reduce-scattered to)
        self.held_by_rank = {s.name: [held_rows(s.row_offset(k), s.rows_per_rank[k], *self._m_pair(s.name))
                                      for k in range(self.world_size)] for s in self.shards}
        self.dense_state_bits = dense_state_bits
        shapes = dict(dense_shapes or {})
        self.dense_offsets = dict(dense_offsets or {})
        self.dense_state: dict[str, DenseState] = {}
        for n, p in self.dense_named:
            local = _local(p)
            gshape = tuple(shapes.get(n, local.shape))
            self.dense_state[n] = self._dense_state(local, gshape)
        self.grad_clip = float(grad_clip)
        self.refresh_bucket_bytes = int(refresh_bucket_bytes)
        self.last_step = StepResult()
        self.steps_taken = 0
        self.phase_times = {"svd": 0.0, "projection": 0.0, "optimizer": 0.0, "requantize": 0.0}
        self.last_comm = CommCounters().as_dict()

    # --- state layout ---------------------------------------------------------------------------------------
    def _moment(self, shape: tuple[int, int], global_numel: int, signed: bool, device, fdt) -> Blockwise8bit:
        c = self.config
        bits = c.state_bits if c.quantize else 32
        # 8-bit or not is decided on the whole matrix's size, so every shard stores what one device would
        min_numel = 0 if bits == 8 and global_numel >= c.state_min_numel else 1 << 62
        return Blockwise8bit(shape, signed, c.state_block_size, min_numel, device, bits=bits, float_dtype=fdt)

    def _init_state(self, s: RowShard, refresh_offset: int) -> MatrixState:
        """The rule's state with its row-indexed parts re-laid out: right projection — the moments of the reshaped
        rows this rank holds (and ProjFactor's row factor of its weight rows); left — owner only."""
        t = s.local_tensor()
        fdt = torch.float64 if t.dtype == torch.float64 else torch.float32
        st = self.rule.init_state(s.name, s.shape, t.device, refresh_offset, fdt,
                                  granularity=self.granularity[s.name])
        if st.side == "right":
            full = lowrank_shape(*st.proj_shape, st.rank, st.side)
            r0 = s.row_offset(self.rank)
            _, held = held_rows(r0, s.rows_per_rank[self.rank], st.shape[0], st.proj_shape[0])
            st.exp_avg = self._moment((held, st.rank), _numel(full), True, t.device, fdt)
            if st.exp_avg_sq is not None:
                st.exp_avg_sq = self._moment((held, st.rank), _numel(full), False, t.device, fdt)
            if isinstance(st, ProjFactorState):
                st.row_factor = st.row_factor[r0:r0 + s.rows_per_rank[self.rank]].clone()
        elif s.name not in self.owned:
            st.exp_avg = st.exp_avg_sq = None
            if isinstance(st, ProjFactorState):
                st.row_factor = st.col_factor = None
        return st

    def _dense_state(self, local: torch.Tensor, gshape: tuple[int, ...]) -> DenseState:
        c = self.config
        fdt = torch.float64 if local.dtype == torch.float64 else torch.float32
        bits = self.dense_state_bits
        min_numel = 0 if bits == 8 and _numel(gshape) >= c.state_min_numel else 1 << 62
        shape = tuple(local.shape)
        return DenseState(Blockwise8bit(shape, True, c.state_block_size, min_numel, local.device, bits, fdt),
                          Blockwise8bit(shape, False, c.state_block_size, min_numel, local.device, bits, fdt))

    def _m_pair(self, name: str) -> tuple[int, int]:
        st = self.mstate[name]
        return st.shape[0], st.proj_shape[0]

    def needs_full_gradient(self, name: str) -> bool:
        """Whether this step's gradient of ``name`` must reach the optimizer as full rows (a refresh is due: the
        owner needs the full gradient, and the projection must wait for the new basis); otherwise an engine may
        project each micro-batch's whole-matrix gradient itself (:meth:`project_local`) and pass the sum."""
        st = self.mstate[name]
        return st.basis is None or st.gate.due(st.step)

    def project_local(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Project a whole-matrix gradient [m, n] of this rank's data with the replicated basis: R [m', r]
        (right) or [r, n'] (left) — what travels instead of the gradient ("project before communicating")."""
        return self._timed("projection", self.rule.project, self.mstate[name], grad)

    def _off(self, name: str) -> int:
        return self._shard[name].row_offset(self.rank)

    def _rows(self, name: str) -> int:
        return int(self._shard[name].rows_per_rank[self.rank])

    def _owner(self, name: str) -> int:
        return self.plan.owner[name]

    # --- the step ---------------------------------------------------------------------------------------------
    def _present(self, grads: Mapping[str, torch.Tensor | None]) -> list[str]:
        """Matrices with a gradient this step — on every rank or on none (one int32 all-reduce)."""
        mine = [grads.get(s.name) is not None for s in self.shards]
        mine += [p.grad is not None for _, p in self.dense_named]
        labels = [s.name for s in self.shards] + [n for n, _ in self.dense_named]
        present = self.collectives.present_everywhere(
            labels, mine, "row-sharded step: these parameters got a gradient on some ranks only")
        return [s.name for s, c in zip(self.shards, present) if c]

    def _begin(self, grads: Mapping[str, torch.Tensor | None] | None = None,
               local_lowrank: Mapping[str, torch.Tensor] | None = None) -> tuple[list[float], object]:
        """The first half (``begin_step(grads=..., local_lowrank=...)``; ``step(grads=...)``): refreshes,
        projection, the low-rank reductions. The norm² share: this rank's held rows of R, its owned left R, its
        dense gradients; an engine that steps other parameters itself (DeepSpeed) adds theirs in ``shared_norm``.

        ``grads``: averaged gradient rows of this rank's shard. ``local_lowrank`` (instead, for matrices not due
        for a refresh, see :meth:`needs_full_gradient`): :meth:`project_local` of this rank's own whole-matrix
        gradient, summed over its micro-batches and not averaged — right projections are reduce-scattered to the
        ranks holding each reshaped row, left ones reduced to the owner, both then ÷N: ``r/min(m, n)`` of the
        bytes of reduce-scattering gradients."""
        if grads is None:
            grads = {s.name: (s.grad() if s.grad is not None else None) for s in self.shards}
        grads = {n: (None if g is None else _local(g)) for n, g in grads.items()}
        local_lowrank = dict(local_lowrank or {})
        rule, lr = self._rule()
        mats = self._present({**grads, **local_lowrank})
        due = [n for n in mats if self.mstate[n].gate.due(self.mstate[n].step)]
        if any(n in local_lowrank for n in due):
            raise RuntimeError("a matrix due for a refresh needs its full gradient rows, not a local projection")
        if due:
            self._refresh(due, grads)
        # project: right — the reshaped rows covering the shard; left — this shard's partial sum
        lowrank = {n: self._timed("projection", rule.project_rows, self.mstate[n], grads[n], self._off(n))
                   for n in mats if n not in local_lowrank}
        right = [n for n in mats if self.mstate[n].side == "right"]
        left = [n for n in mats if self.mstate[n].side == "left"]
        by_owner: dict[int, list[torch.Tensor]] = {}
        for n in left:
            by_owner.setdefault(self._owner(n), []).append(lowrank.get(n, local_lowrank.get(n)))
        self.collectives.reduce_to_owners(by_owner)
        ws = self.world_size
        for n in left:
            if n in local_lowrank:
                lowrank[n] = local_lowrank[n].div_(ws) if ws > 1 else local_lowrank[n]
        self._reduce_scatter_local(right, local_lowrank, lowrank)
        self._exchange_cut_rows([n for n in right if n not in local_lowrank], lowrank, self.geometry.__getitem__)
        # each reshaped row of R counted once (at the rank holding its moments); model order, as one device sums
        sq = sum(squared_norm(self.geometry[n].held(lowrank[n]) if self.mstate[n].side == "right" else lowrank[n])
                 for n in mats if self.mstate[n].side == "right" or n in self.owned)
        dense = [(n, p) for n, p in self.dense_named if p.grad is not None]
        dense_grads = {n: _local(p.grad) for n, p in dense}
        sq += sum(squared_norm(g) for g in dense_grads.values())
        return [sq], (right, left, lowrank, dense, dense_grads, rule, lr)

    def _apply(self, payload, coef: float) -> None:
        """The second half: clip by ``coef`` (the same on every rank), normalise, communicate updates, apply
        them; dense parameters step."""
        right, left, lowrank, dense, dense_grads, rule, lr = payload
        if coef < 1.0:
            for n in right + [n for n in left if n in self.owned]:
                lowrank[n].mul_(coef)
        self._apply_right(right, lowrank, rule, lr)
        self._apply_left(left, lowrank, rule, lr)
        for n, p in dense:
            g = dense_grads[n] if coef == 1.0 else dense_grads[n] * coef
            self._step_dense(n, _local(p), g, index_offset=self.dense_offsets.get(n, 0))
        self.steps_taken += 1

    def _skip(self, payload) -> None:
        """The gradients are the engine's (FSDP's DTensor grads, the ZeRO-3 side-car's rows): nothing to drop."""

    def _after_step(self) -> None:
        self.last_comm = self.collectives.reset_step()

    def _reduce_scatter_local(self, right: Sequence[str], local_lowrank: Mapping[str, torch.Tensor],
                              lowrank: dict[str, torch.Tensor]) -> None:
        """Right projections given as whole-matrix local R [m', r]: each reshaped row summed at the rank holding
        it (one bucketed reduce per rank, a reduce-scatter's bytes), ÷N; then the covering rows a rank does not hold
        (cut merged rows) come from their holders, so ``lowrank[n]`` is the complete covering block."""
        names = [n for n in right if n in local_lowrank]
        if not names:
            return
        by_rank: dict[int, list[torch.Tensor]] = {}
        for n in names:
            r = local_lowrank[n]
            for k, (h_off, h_rows) in enumerate(self.held_by_rank[n]):
                if h_rows:
                    by_rank.setdefault(k, []).append(r[h_off:h_off + h_rows])
        self.collectives.reduce_to_owners(by_rank)
        ws = self.world_size
        for n in names:
            geo, r = self.geometry[n], local_lowrank[n]
            held = r[geo.h_off:geo.h_off + geo.h_rows]
            if ws > 1:
                held.div_(ws)
            cover = r.new_zeros(geo.g_rows, r.shape[1])
            cover[geo.h_off - geo.g_off:geo.h_off - geo.g_off + geo.h_rows] = held
            lowrank[n] = cover
        self._exchange_cut_rows(names, lowrank, self.geometry.__getitem__, held_only=True)

    def _exchange_cut_rows(self, names: Sequence[str], tensors: Mapping[str, torch.Tensor],
                           geometry: Callable[[str], RowGeometry], held_only: bool = False) -> None:
        """Complete the reshaped rows cut by a shard boundary (right projection, c < 1), in place, with one bucketed
        all-reduce: each rank puts its rows of ``tensors[n]`` (covering rows; ``held_only``: only the rows it holds,
        e.g. normalised updates, the others' contributions zero) into a buffer of every cut row of every matrix."""
        cut = [n for n in names if self.geometry[n].cut]
        if not cut or self.world_size == 1:
            return
        bufs = []
        for n in cut:
            geo, t = geometry(n), tensors[n]
            buf = t.new_zeros(len(geo.cut), t.shape[1])
            for j, i in enumerate(geo.cut):
                if geo.covers(i) and (not held_only or geo.holds(i)):
                    buf[j] = t[i - geo.g_off]
            bufs.append(buf)
        self.collectives.all_reduce(bufs)
        for n, buf in zip(cut, bufs):
            geo, t = geometry(n), tensors[n]
            for j, i in enumerate(geo.cut):
                if geo.covers(i):
                    t[i - geo.g_off] = buf[j]

    def _apply_right(self, names: Sequence[str], lowrank: dict[str, torch.Tensor], rule: LowRankAdamW,
                     lr: float) -> None:
        """Right projection, row-local: the rule's row-additive sums (ProjFactor) summed over ranks; each rank
        normalises the reshaped rows it holds; cut rows' updates go back to the ranks that touch them; every rank
        applies its rows."""
        sums: dict[str, tuple] = {}
        additive: list[torch.Tensor] = []
        for n in names:
            geo = self.geometry[n]
            local, add = self._timed("optimizer", rule.shard_sums, self.mstate[n], lowrank[n], geo.r0, geo.rows,
                                     geo.g_off)
            sums[n] = (local, add)
            additive.extend(add)
        if additive and self.world_size > 1:
            self.collectives.all_reduce(additive)
        updates, sizes = {}, {}
        for n in names:
            geo, st = self.geometry[n], self.mstate[n]
            local, add = sums[n]
            held = geo.held(lowrank[n])
            updates[n], sizes[n] = self._timed("optimizer", rule.normalise, st, held, lr,
                                               None if local is None else (local, add))
        # the cover's rows of the update's low-rank part: held rows from here, cut rows from their holders
        covers = {}
        for n in names:
            geo, low = self.geometry[n], rule.lowrank_part(updates[n])
            cover = low if geo.g_rows == geo.h_rows else low.new_zeros(geo.g_rows, low.shape[1])
            if cover is not low:
                cover[geo.h_off - geo.g_off:geo.h_off - geo.g_off + geo.h_rows] = low
            covers[n] = cover
        self._exchange_cut_rows(names, covers, self.geometry.__getitem__, held_only=True)
        for n in names:
            geo = self.geometry[n]
            if geo.rows == 0:
                continue
            update = rule.with_lowrank_part(updates[n], covers[n])
            self._timed("requantize", rule.apply_rows, self.mstate[n], self._shard[n].local_weight(), update,
                        sizes[n], lr, geo.r0, n_offset=geo.g_off)

    def _apply_left(self, names: Sequence[str], lowrank: dict[str, torch.Tensor], rule: LowRankAdamW,
                    lr: float) -> None:
        """Left projection: owners normalise; the update (the rule's wire tensors) and the step sizes are
        broadcast; every rank applies P_rows N to its rows."""
        if not names:
            return
        wire: dict[str, list[torch.Tensor]] = {}
        sizes: dict[str, float] = {}
        for n in names:
            r = lowrank[n]
            cdt = torch.float64 if r.dtype == torch.float64 else torch.float32
            if n in self.owned:
                update, sizes[n] = self._timed("optimizer", rule.normalise, self.mstate[n], r, lr)
                wire[n] = [t.to(cdt) for t in rule.update_tensors(update)]
            else:  # the spent partial sum is the receive buffer of N (same shape)
                wire[n] = rule.update_buffers(self.mstate[n], r.to(cdt), cdt)
        step_sizes = self.collectives.broadcast_owner_updates(names, self._owner, lambda n: wire[n], sizes)
        for n in names:
            st = self.mstate[n]
            if n not in self.owned:
                st.step += 1  # the owner's normalise advanced its copy: the SR stream is keyed by this count
            if self._rows(n) == 0:
                continue
            cdt = wire[n][0].dtype
            self._timed("requantize", rule.apply_rows, st, self._shard[n].local_weight(),
                        rule.update_from_tensors(st, wire[n], cdt), step_sizes[n], lr, self._off(n))

    # --- refresh ----------------------------------------------------------------------------------------------
    def _refresh(self, due: Sequence[str], grads: Mapping[str, torch.Tensor]) -> None:
        """Gather each due matrix's gradient rows to its owner only (bucketed per owner), owners refresh, then
        projectors and the next refresh step go to every rank. Random projections need no gradient."""
        if self.config.projection in RANDOM_PROJECTIONS:
            for n in due:
                if n in self.owned:
                    self._timed("svd", self.rule.refresh, self.mstate[n], grads[n])
            self._sync_projectors(due)
            return
        for o in range(self.world_size):
            names = [n for n in due if self._owner(n) == o]
            bucket: list[str] = []
            size = 0
            for n in names:
                g = grads[n]
                b = self._shard[n].shape[0] * self._shard[n].shape[1] * g.element_size()
                if bucket and (size + b > self.refresh_bucket_bytes or g.dtype != grads[bucket[0]].dtype):
                    self._gather_and_refresh(o, bucket, grads)
                    bucket, size = [], 0
                bucket.append(n)
                size += b
            if bucket:
                self._gather_and_refresh(o, bucket, grads)
        self._sync_projectors(due)

    def _gather_and_refresh(self, owner: int, names: Sequence[str], grads: Mapping[str, torch.Tensor]) -> None:
        """One gather to ``owner`` of every rank's rows of ``names`` (flattened, rank-major), SVDs there."""
        dtype = grads[names[0]].dtype
        if self.world_size == 1:
            full = {n: grads[n] for n in names}
        else:
            flat = torch.cat([grads[n].reshape(-1) for n in names]) if names else None
            sizes = [sum(int(self._shard[n].rows_per_rank[k]) * self._shard[n].shape[1] for n in names)
                     for k in range(self.world_size)]
            got = self.collectives.gather_to(flat.to(dtype), owner, sizes)
            if got is None:
                return
            parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
            off = 0
            for k in range(self.world_size):
                for n in names:
                    rows, cols = int(self._shard[n].rows_per_rank[k]), self._shard[n].shape[1]
                    parts[n].append(got[off:off + rows * cols].view(rows, cols))
                    off += rows * cols
            full = {n: torch.cat(parts[n]) for n in names}
        for n in names:
            self._timed("svd", self.rule.refresh, self.mstate[n], full[n])

    def _sync_projectors(self, names: Sequence[str], carry: bool = True) -> None:
        """Owners send ``[next_refresh, interval, draw step]`` of every refreshed matrix, then the projector
        (INT4 codes + scales, or fp32; a random draw is regenerated from its step) to every rank. With ``carry``,
        a rank holding moment rows of a matrix it does not own rotates them into the new basis (the rule decides
        whether moments rotate); the owner did so in its refresh."""
        kind = self.rule.basis_kind()
        headers = {}
        for n in names:
            h = torch.zeros(4, dtype=torch.int64)
            if n in self.owned:
                st = self.mstate[n]
                # [3]: 0 no basis, 1 a new basis, 2 the basis kept (a refresh skipped on a non-finite gradient)
                h[0], h[1] = st.gate.next_refresh, st.gate.interval
                h[3] = 0 if st.basis is None else (2 if st.refresh_skipped else 1)
                if kind == "random" and st.basis is not None:
                    h[2] = st.basis.step
            headers[n] = h
        by_owner: dict[int, list[torch.Tensor]] = {}
        for n in names:
            by_owner.setdefault(self._owner(n), []).append(headers[n])
        self.collectives.broadcast_from_owners(by_owner)
        stored = [n for n in names if int(headers[n][3])] if kind != "random" else []
        payload = {n: [t.contiguous() for t in self.rule.basis_tensors(self.mstate[n])] if n in self.owned else
                   self.rule.basis_buffers(self.mstate[n], self._shard[n].local_tensor().device)
                   for n in stored}
        by_owner = {}
        for n in stored:
            by_owner.setdefault(self._owner(n), []).extend(payload[n])
        self.collectives.broadcast_from_owners(by_owner)
        for n in names:
            if n in self.owned:
                continue
            st, h = self.mstate[n], headers[n]
            st.gate.next_refresh, st.gate.interval = int(h[0]), int(h[1])
            if not int(h[3]):
                continue
            old = st.basis_float() if carry and st.basis is not None and int(h[3]) == 1 else None
            self.rule.basis_from_tensors(st, payload.get(n, []), int(h[2]), self._shard[n].local_tensor().device)
            if old is not None:
                self.rule.carry_moments(st, old, st.basis_float())

    # --- accounting -------------------------------------------------------------------------------------------
    @property
    def svd_count(self) -> int:
        """SVDs computed on this rank (sum over ranks = the single-device count: owners only)."""
        return sum(self.mstate[n].gate.count for n in self.owned)

    @property
    def comm_bytes(self) -> int:
        """Bytes through this rank's link (sent + received) for the optimizer in the last step."""
        return int(self.last_comm["comm_bytes"])

    def refresh_log(self) -> list:
        return sorted((r for n in self.owned for r in self.mstate[n].history), key=lambda r: (r.step, r.name))

    def memory_bytes(self) -> dict[str, int]:
        """This rank's resident bytes: its weight rows, projectors (replicated), moment and factor shards, dense
        shards and their state."""
        out = {"projected_weights": 0, "projectors": 0, "lowrank_moments": 0, "dense_weights": 0,
               "dense_moments": 0}
        for s in self.shards:
            w = s.local_weight()
            out["projected_weights"] += w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()
            sb = self.mstate[s.name].state_bytes()
            out["projectors"] += sb["projector"]
            out["lowrank_moments"] += sb["moments"]
        for n, p in self.dense_named:
            lp = _local(p)
            out["dense_weights"] += lp.numel() * lp.element_size()
            out["dense_moments"] += self.dense_state[n].nbytes()
        out["total"] = sum(out.values())
        return out

    # --- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard, keyed by parameter name (local, no communication):

        ``projected[name]`` — owner only: the rule state (gate, step, whole projector; left: the moments and
        factors); ``rows[name]`` — every rank, right projection: its rows of the row-sharded state (moment rows
        of the reshaped rows it holds, ProjFactor's row factor rows) and the replicated column factor;
        ``dense[name]`` — this rank's dense shard state. Checkpoints take :meth:`checkpoint_state` instead (this
        rank's share of the single-device state), which any world size reads."""
        rows = {}
        projected = {}
        for s in self.shards:
            st = self.mstate[s.name]
            geo = self.geometry[s.name]
            entry: dict = {"row_offset": geo.r0, "rows": geo.rows, "held_offset": geo.h_off,
                           "held_rows": geo.h_rows, "step": st.step, "tensors": {}}
            if st.side == "right":
                full = st.state_dict()["tensors"]
                entry["tensors"] = {k: v for k, v in full.items() if _row_sharded_key(k)}
            rows[s.name] = entry
            if s.name in self.owned:
                d = st.state_dict()
                if st.side == "right":  # the row-sharded parts travel in rows[...]
                    d = {"tensors": {k: v for k, v in d["tensors"].items() if not _row_sharded_key(k)},
                         "meta": d["meta"]}
                projected[s.name] = d
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "dense_state_bits": self.dense_state_bits,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "projected": projected,
            "rows": rows,
            "dense": {n: st.state_dict() for n, st in self.dense_state.items()},
            "shard": {"rank": self.rank, "world_size": self.world_size, "owner": dict(self.plan.owner)},
        }

    # --- checkpoints any engine and world size reads: this rank's share of the single-device state ---------
    def checkpoint_state(self) -> tuple[dict, dict]:
        """This rank's share of the single-device optimizer state — ``QGaLoreOptimizer.state_dict()``'s layout,
        keyed by parameter name — and where each of its tensors lies in the whole one: ``(state, starts)``, where
        ``starts`` mirrors ``state``'s dicts with ``(first index, axis)`` at every cut tensor (any other tensor is
        whole). Owners give their matrices' meta and owner-held tensors (projector, left moments, the replicated
        column factor) whole. Right-projected row state is cut: weight rows ``[r0, …)`` where it is laid out
        like ``torch.chunk`` (:meth:`chunk_laid`), else the reshaped rows the rank holds ``[h_off, …)`` — the held
        rows of all ranks partition the reshaped rows, so the pieces of any world size tile the whole tensor.
        Dense state: rows of its ``[rows, cols]`` layout (dim 0 of fp32 moments); a 1-D parameter's 8-bit moments
        are cut along their only row (axis 1)."""
        projected, pstarts = {}, {}
        for sh in self.shards:
            st, geo, owner = self.mstate[sh.name], self.geometry[sh.name], sh.name in self.owned
            if not owner and st.side != "right":
                continue
            d = st.state_dict()
            tensors, where = {}, {}
            for k, v in d["tensors"].items():
                if st.side == "right" and _row_sharded_key(k) and k != "col_factor":
                    tensors[k] = v
                    where[k] = ((geo.r0 if self.chunk_laid(sh.name, k) else geo.h_off), 0)
                elif owner:
                    tensors[k] = v
            projected[sh.name] = {"tensors": tensors, **({"meta": d["meta"]} if owner else {})}
            pstarts[sh.name] = {"tensors": where}
        dense = {n: st.state_dict() for n, st in self.dense_state.items()}
        dstarts = {n: {"tensors": {k: self._dense_piece(n, k) for k in d["tensors"]}} for n, d in dense.items()}
        state = {"format": REFERENCE_FORMAT, "config": self.config.to_dict(),
                 "dense_state_bits": self.dense_state_bits,
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                 "projected": projected, "dense": dense}
        return state, {"projected": pstarts, "dense": dstarts}

    def _dense_piece(self, name: str, key: str) -> tuple[int, int] | None:
        """(first index, axis) of this rank's dense state tensor ``key`` of parameter ``name`` in the whole one."""
        local = _local(dict(self.dense_named)[name])
        off = int(self.dense_offsets.get(name, 0))  # global element offset of the local shard
        if local.dim() == 0:
            return None
        if key.endswith(".data"):  # fp32 moments: the parameter's own shape, cut along dim 0
            return off // (math.prod(local.shape[1:]) or 1), 0
        if local.dim() == 1:  # 8-bit moments of a 1-D parameter: one row [1, n], cut along it
            return off, 1
        cols = int(local.shape[-1])
        return off // max(cols, 1), 0

    def load_pieces(self, reader) -> None:
        """Collective. Load this rank's share of a checkpoint of the single-device state written by any engine at
        any world size (:meth:`checkpoint_state` here, ``QGaLoreOptimizer.state_dict()`` on one device, the
        owners' states under ddp). ``reader``: a :class:`~qgalore_dist.checkpoint.pieces.PieceReader`. This rank
        reads its rows of the row state and of the dense state, the whole state of the matrices it owns now, and
        nothing else — bit for bit, except a 1-D parameter's 8-bit dense moments saved at another partition of
        that parameter (:meth:`~qgalore_dist.checkpoint.pieces.PieceReader.block_row`)."""
        self._load(lambda: self._state_from_pieces(reader))

    def _state_from_pieces(self, reader) -> dict:
        """This rank's :meth:`state_dict`, built from a checkpoint's pieces (see :meth:`load_pieces`)."""
        tree = reader.merged_tree()
        if not isinstance(tree, dict) or tree.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"not a Q-GaLore optimizer state (missing format tag {REFERENCE_FORMAT!r})")
        saved = tree.get("projected") or {}
        if set(saved) != set(self.mstate):
            raise ValueError(f"optimizer state does not match this model's matrices (saved and built differ in "
                             f"{sorted(set(saved) ^ set(self.mstate))[:3]})")
        projected, rows = {}, {}
        for sh in self.shards:
            name, geo, st = sh.name, self.geometry[sh.name], self.mstate[sh.name]
            e = saved[name]
            if "meta" not in e:
                raise ValueError(f"{name}: no rank saved its meta (an incomplete checkpoint)")
            refs = {k: ref["__tensor__"] for k, ref in e["tensors"].items()}
            row_keys = [k for k in refs if st.side == "right" and _row_sharded_key(k)]
            if name in self.owned:
                projected[name] = {"meta": e["meta"], "tensors": {k: reader.full(key) for k, key in refs.items()
                                                                  if k not in row_keys}}
            tensors = {}
            for k in row_keys:
                if k == "col_factor":
                    tensors[k] = reader.full(refs[k])
                elif self.chunk_laid(name, k):
                    tensors[k] = reader.rows(refs[k], geo.r0, geo.rows)
                else:
                    tensors[k] = reader.rows(refs[k], geo.h_off, geo.h_rows)
            rows[name] = {"row_offset": geo.r0, "rows": geo.rows, "held_offset": geo.h_off,
                          "held_rows": geo.h_rows, "step": int(e["meta"]["step"]), "tensors": tensors}
        dense = {}
        block = self.config.state_block_size
        for n, st in self.dense_state.items():
            e = (tree.get("dense") or {}).get(n)
            if e is None:
                raise ValueError(f"optimizer state has no entry for dense parameter {n}")
            refs = {k: ref["__tensor__"] for k, ref in e["tensors"].items()}
            mine = st.state_dict()["tensors"]
            if set(refs) != set(mine):
                raise ValueError(f"{n}: saved dense state {sorted(refs)} does not fit this run's {sorted(mine)} "
                                 "(another --dense-state-bits?)")
            tensors = {}
            for k, key in refs.items():
                pos = self._dense_piece(n, k)
                if pos is None:
                    tensors[k] = reader.full(key)
                elif pos[1] == 0:
                    tensors[k] = reader.rows(key, pos[0], int(mine[k].shape[0]))
                elif k.endswith(".codes"):  # a 1-D parameter's 8-bit moment: codes and scales together
                    moment = k[:-len(".codes")]
                    got = reader.block_row(key, refs[f"{moment}.absmax"], pos[0], int(mine[k].shape[1]),
                                           moment == "exp_avg", block)
                    tensors[k], tensors[f"{moment}.absmax"] = got["codes"], got["absmax"]
            dense[n] = {"meta": e["meta"], "tensors": tensors}
        sd = {k: tree[k] for k in ("config", "dense_state_bits", "param_groups")}
        sd.update(format=STATE_FORMAT, projected=projected, rows=rows, dense=dense,
                  shard={"rank": self.rank, "world_size": self.world_size, "owner": dict(self.plan.owner)})
        return sd

    def chunk_laid(self, name: str, key: str) -> bool:
        """Whether ``state_dict()["rows"][name]["tensors"][key]`` is laid out like ``torch.chunk`` of the weight
        rows (its local row i is weight row ``r0 + i``), so an engine may save it as a row-sharded tensor of global
        dim 0 = m. Moments of VLoRP-reshaped rows (c != 1: held rows are not a ``torch.chunk`` of m') and the
        replicated column factor are not: they must be saved as this rank's own tensors."""
        st = self.mstate[name]
        if st.side != "right":
            return False
        if key == "row_factor":
            return True
        return key.startswith(("exp_avg.", "exp_avg_sq.")) and st.proj_shape[0] == st.shape[0]

    def load_state_dict(self, state_dict: dict) -> None:
        """Collective. Load this rank's own shard (same world size and plan). A problem on any rank raises
        ``ValueError`` on every rank."""
        self._load(lambda: state_dict)

    def _load(self, build: Callable[[], dict]) -> None:
        """Collective: ``_load_local(build())`` agreed over ranks, then the projector replicas from the owners."""
        self.collectives.agreed(lambda: self._load_local(build()), "optimizer state could not be loaded")
        # the gate schedule and the projector replicas come from the owners (no rotation: nothing changed)
        names = [s.name for s in self.shards]
        has = torch.tensor([int(self.mstate[n].basis is not None) if n in self.owned else 0 for n in names],
                           dtype=torch.int32, device=self.collectives.device)
        self.collectives.all_reduce([has])
        live = [n for n, h in zip(names, has.tolist()) if h]
        if live:
            self._sync_projectors(live, carry=False)
        self.collectives.reset_step()

    def _load_local(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a row-sharded optimizer state (missing format tag {STATE_FORMAT!r})")
        shard = sd.get("shard", {})
        if shard.get("world_size") != self.world_size or shard.get("rank") != self.rank:
            raise ValueError(f"this state is rank {shard.get('rank')} of {shard.get('world_size')}, this process "
                             f"is rank {self.rank} of {self.world_size} (load_state_dict takes this rank's own "
                             "state; load_pieces reads a checkpoint of any world size)")
        if dict(shard.get("owner", {})) != dict(self.plan.owner):
            raise ValueError("the saved ownership plan differs from this run's")
        missing = sorted(self.owned - set(sd["projected"]))
        if missing or set(sd["rows"]) != set(self.mstate):
            raise ValueError(f"optimizer state does not match this rank's matrices (missing {missing[:3]})")
        for s in self.shards:
            st, e, geo = self.mstate[s.name], sd["rows"][s.name], self.geometry[s.name]
            if (int(e["row_offset"]), int(e["rows"])) != (geo.r0, geo.rows) or \
                    int(e.get("held_offset", geo.h_off)) != geo.h_off:
                raise ValueError(f"{s.name}: saved rows [{e['row_offset']}, +{e['rows']}) differ from this rank's")
            if s.name in self.owned:
                d = sd["projected"][s.name]
                if st.side == "right":  # the owner's meta and projector with this rank's row-sharded parts
                    d = {"meta": d["meta"], "tensors": {**d["tensors"], **e["tensors"]}}
                st.load_state_dict(d, self.config.proj_group_size)
            elif st.side == "right":
                _load_row_tensors(st, e["tensors"])
            st.step = int(e["step"])
        self._load_dense_and_groups(sd)


def _row_sharded_key(key: str) -> bool:
    """State tensors a right-projected row shard holds its own rows (or replica) of."""
    return key.startswith(("exp_avg.", "exp_avg_sq.")) or key in ("row_factor", "col_factor")


def _load_row_tensors(st: MatrixState, tensors: Mapping[str, torch.Tensor]) -> None:
    """A non-owner's rows of a right-projected matrix's state (moments, ProjFactor's factors)."""
    st.exp_avg.load_state_tensors({k[len("exp_avg."):]: v for k, v in tensors.items() if k.startswith("exp_avg.")})
    if st.exp_avg_sq is not None:
        st.exp_avg_sq.load_state_tensors({k[len("exp_avg_sq."):]: v for k, v in tensors.items()
                                          if k.startswith("exp_avg_sq.")})
    if isinstance(st, ProjFactorState):
        st.row_factor.copy_(tensors["row_factor"])
        st.col_factor.copy_(tensors["col_factor"])
