"""``RowShardedQGaLoreOptimizer``: Q-GaLore over row-sharded weights (FSDP2, DeepSpeed ZeRO-3; DESIGN.md §3).

Every rank holds a *row shard* of every projected ``m×n`` matrix — rows ``[r0, r1)`` of its INT8 codes + scales
(split like ``torch.chunk``: ``ceil(m/N)`` rows per rank, the last ranks shorter or empty) — and receives the
gradient of exactly those rows, already averaged over ranks by the engine (FSDP2's reduce-scatter, or the ZeRO-3
side-car's own). Each matrix has one **owner** (:class:`~qgalore_dist.dist.plan.OwnershipPlan`), the only rank that
computes its SVD and decides its refresh gate. What lives where (``N`` ranks, ``k`` = this rank's rows):

======================  =====================================  =========================================
                        right projection (m >= n)              left projection (m < n)
======================  =====================================  =========================================
projector               Q (r×n) INT4, replicated               P (m×r) INT4: each rank its k rows;
                                                               the owner also keeps the whole P (gate)
low-rank gradient       R_rows = G_rows Qᵀ (k×r), row-local    R = Σ_ranks P_rowsᵀ G_rows (r×n), reduced
                                                               to the owner
moments (8-bit)         rows-sharded with the weight (k×r)     owner only (r×n)
update                  ΔW_rows = N_rows Q, row-local          owner normalises and broadcasts N (r×n);
                                                               every rank applies ΔW_rows = P_rows N
bytes per step          0                                      r·n·b reduced + r·n·b broadcast
======================  =====================================  =========================================

**Refresh** (a matrix's gate says it is due; every rank knows when, the owner broadcasts the next refresh step
after each one): every rank sends its gradient rows to the owner only (bucketed: all due matrices of one owner
share one gather, up to ``refresh_bucket_bytes``), the owner rebuilds the full (already averaged) gradient, runs
the SVD + gate, then broadcasts Q (INT4 codes + scales) or scatters P's rows (INT4, row-aligned groups). The
full gradient never exists on a non-owner. Then the step proceeds as above with the new projector.

**Stochastic rounding** is keyed by (seed, step, name, *global* element index): the row shard passes its global
row offset, so a sharded run rounds exactly like the single-device one. With fp64 gradients (parity runs) the
whole step reproduces :class:`~qgalore_dist.optim.optimizer.QGaLoreOptimizer` (``layerwise=False``) up to the
summation order of the matmuls (≈1e-16), which practically never flips a rounding decision.

**Clipping**: ``√(‖dense‖² + Σ‖R‖²)`` — the reference's definition — from one all-reduce of each rank's partial
sums (right: its rows of R; left: the owner's reduced R; dense: its shards' gradients; plus ``extra_sq``, e.g. the
dense gradients an outer engine steps itself). The clip factor is in :attr:`last_clip_coef` after ``step()``.

**Dense parameters** (optional): ``(name, tensor)`` pairs whose local data and ``.grad`` are this rank's shards
(a DTensor is read through ``to_local()``), already averaged; they are stepped by the element-wise
:func:`~qgalore_dist.optim.dense_adamw.dense_adamw_step`, fp32 or 8-bit state (8-bit blocks lie inside rows of
the local shard; whether a tensor is 8-bit is decided on the *global* element count, as on one device).

Not supported here (``ValueError`` at construction): ProjFactor, VLoRP granularity ≠ 1, random projections and
moment rotation on refresh — each needs traffic this class does not implement yet.

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
from ..optim.dense_adamw import DenseState, dense_adamw_step
from ..optim.lowrank_adamw import LowRankAdamW, MatrixState
from ..optim.norms import clip_coef, squared_norm
from ..optim.optimizer import PhasedGroups
from ..optim.projfactor import make_rule
from ..projection.projector import basis_shape, lowrank_shape, project
from ..quant.groups import num_groups
from ..quant.int4 import Int4Matrix, pack_int4, unpack_int4
from ..quant.int8 import Int8Weight
from ..quant.state8 import Blockwise8bit
from .collectives import Collectives, CommCounters
from .plan import OwnershipPlan, make_plan, plan_options

__all__ = ["RowShard", "RowShardedQGaLoreOptimizer", "chunk_rows", "merge_row_sharded_state_dicts",
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients), any other tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)


class RowShardedQGaLoreOptimizer(PhasedGroups, torch.optim.Optimizer):
    """Q-GaLore AdamW over row shards (see the module docstring).

    Args:
        shards: one :class:`RowShard` per projected matrix, in the same (model) order on every rank.
        config: projected-matrix settings (as for ``QGaLoreOptimizer``).
        collectives: the :class:`Collectives` of the sharding world (local mode: one process).
        plan: owners; default: :func:`~qgalore_dist.dist.plan.make_plan` over the shards' shapes.
        dense: ``(name, tensor)`` dense parameters (local shards or DTensors) this optimizer steps with AdamW.
        dense_shapes: global shape of each dense parameter (decides 8-bit vs fp32 state as on one device);
            default: the local shape.
        dense_state_bits: 32 or 8.
        grad_clip: max global norm (0 = off).
        stagger_refresh: spread later refreshes over the interval (as ``QGaLoreOptimizer``).
        dense_lr, dense_weight_decay: dense group defaults (config's otherwise).
        refresh_bucket_bytes: full-gradient bytes one refresh gather may carry to one owner.
    """

    def __init__(self, shards: Sequence[RowShard], config: QGaLoreConfig, collectives: Collectives,
                 plan: OwnershipPlan | None = None, *, dense: Sequence[tuple[str, torch.Tensor]] = (),
                 dense_shapes: Mapping[str, Sequence[int]] | None = None, dense_state_bits: int = 32,
                 grad_clip: float = 0.0, stagger_refresh: bool = False, dense_lr: float | None = None,
                 dense_weight_decay: float | None = None, refresh_bucket_bytes: int = 1 << 28):
        if dense_state_bits not in (8, 32):
            raise ValueError(f"dense_state_bits={dense_state_bits!r} is invalid: allowed: 8 or 32")
        if grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip!r} is invalid: must be >= 0 (0 = off)")
        if refresh_bucket_bytes < 1:
            raise ValueError(f"refresh_bucket_bytes={refresh_bucket_bytes!r} is invalid: must be >= 1")
        unsupported = []
        if config.optimizer != "adamw":
            unsupported.append(f"optimizer={config.optimizer!r}")
        if config.granularity != 1.0:
            unsupported.append(f"granularity={config.granularity}")
        if config.projection not in ("svd", "rsvd"):
            unsupported.append(f"projection={config.projection!r}")
        if config.moments_on_refresh != "keep":
            unsupported.append(f"moments_on_refresh={config.moments_on_refresh!r}")
        if unsupported:
            raise ValueError("the row-sharded optimizer (fsdp / ZeRO-3) supports low-rank AdamW with SVD / rSVD "
                             "projections at granularity 1 and moments kept on refresh; not: " + ", ".join(unsupported))
        self.config = config
        self.collectives = collectives
        self.rank, self.world_size = collectives.rank, collectives.world_size
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("no projected matrices to optimise")
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
            plan = make_plan({s.name: s.shape for s in self.shards}, self.world_size, **plan_options(config))
        if plan.world_size != self.world_size or set(plan.owner) != set(self._shard):
            raise ValueError(f"the ownership plan (world size {plan.world_size}) does not cover these matrices at "
                             f"world size {self.world_size}")
        self.plan = plan
        self.owned = set(plan.owned_by(self.rank))
        self.rule: LowRankAdamW = make_rule(config)
        self.dense_named = list(dense)
        groups = []
        if self.dense_named:
            groups.append({"params": [p for _, p in self.dense_named], "kind": "dense",
                           "lr": config.lr if dense_lr is None else dense_lr,
                           "weight_decay": config.weight_decay if dense_weight_decay is None else dense_weight_decay})
        groups.append({"params": [s.param if s.param is not None else s.local_tensor() for s in self.shards],
                       "kind": "projected", "lr": config.lr, "weight_decay": config.weight_decay})
        super().__init__(groups, {"lr": config.lr, "weight_decay": config.weight_decay})

        gap = config.update_proj_gap
        self.mstate: dict[str, MatrixState] = {}
        self.basis_rows: dict[str, Int4Matrix | torch.Tensor | None] = {}  # left: this rank's rows of P
        for i, s in enumerate(self.shards):
            offset = (i * gap) // len(self.shards) if stagger_refresh else 0
            self.mstate[s.name] = self._init_state(s, offset)
            self.basis_rows[s.name] = None
        self.dense_state_bits = dense_state_bits
        shapes = dict(dense_shapes or {})
        self.dense_state: dict[str, DenseState] = {}
        for n, p in self.dense_named:
            local = _local(p)
            gshape = tuple(shapes.get(n, local.shape))
            self.dense_state[n] = self._dense_state(local, gshape)
        self.grad_clip = float(grad_clip)
        self.refresh_bucket_bytes = int(refresh_bucket_bytes)
        self.last_clip_coef = 1.0
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
        """Full rule state with the moments re-laid out: right — this rank's rows; left — owner only."""
        t = s.local_tensor()
        fdt = torch.float64 if t.dtype == torch.float64 else torch.float32
        st = self.rule.init_state(s.name, s.shape, t.device, refresh_offset, fdt, granularity=1.0)
        full = lowrank_shape(*s.shape, st.rank, st.side)
        if st.side == "right":
            k = s.rows_per_rank[self.rank]
            st.exp_avg = self._moment((k, st.rank), _numel(full), True, t.device, fdt)
            st.exp_avg_sq = self._moment((k, st.rank), _numel(full), False, t.device, fdt)
        elif s.name not in self.owned:
            st.exp_avg = st.exp_avg_sq = None
        return st

    def _dense_state(self, local: torch.Tensor, gshape: tuple[int, ...]) -> DenseState:
        c = self.config
        fdt = torch.float64 if local.dtype == torch.float64 else torch.float32
        bits = self.dense_state_bits
        min_numel = 0 if bits == 8 and _numel(gshape) >= c.state_min_numel else 1 << 62
        shape = tuple(local.shape)
        return DenseState(Blockwise8bit(shape, True, c.state_block_size, min_numel, local.device, bits, fdt),
                          Blockwise8bit(shape, False, c.state_block_size, min_numel, local.device, bits, fdt))

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
        counts = torch.tensor(mine, dtype=torch.int32, device=self.collectives.device)
        self.collectives.all_reduce([counts])
        counts = counts.tolist()
        labels = [s.name for s in self.shards] + [n for n, _ in self.dense_named]
        partial = [f"{lab} ({c} of {self.world_size})" for lab, c in zip(labels, counts) if 0 < c < self.world_size]
        if partial:
            raise RuntimeError("row-sharded step: these parameters got a gradient on some ranks only: "
                               + ", ".join(partial[:5]))
        return [s.name for s, c in zip(self.shards, counts) if c]

    @torch.no_grad()
    def step(self, closure=None, *, grads: Mapping[str, torch.Tensor | None] | None = None,
             extra_sq: float = 0.0) -> float:
        """One optimizer step (collective). ``grads``: ``{name: this rank's averaged gradient rows [k, n]}``
        (default: each shard's ``grad()``). ``extra_sq``: this rank's share of squared gradient norm stepped
        elsewhere (added to the clipping norm). Returns the global pre-clip norm (equal on every rank)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if grads is None:
            grads = {s.name: (s.grad() if s.grad is not None else None) for s in self.shards}
        grads = {n: (None if g is None else _local(g)) for n, g in grads.items()}
        rule, lr = self._rule()
        mats = self._present(grads)
        due = [n for n in mats if self.mstate[n].gate.due(self.mstate[n].step)]
        if due:
            self._refresh(due, grads)
        # project: right rows locally, left partial sums reduced to the owner
        lowrank: dict[str, torch.Tensor] = {}
        for n in mats:
            st, g = self.mstate[n], grads[n]
            if st.side == "right":
                lowrank[n] = self._timed("projection", project, g, st.basis_float(self._cdt(g)), "right")
            else:
                basis = self._basis_rows_float(n, self._cdt(g))
                lowrank[n] = self._timed("projection", project, g, basis, "left")
        left = [n for n in mats if self.mstate[n].side == "left"]
        by_owner: dict[int, list[torch.Tensor]] = {}
        for n in left:
            by_owner.setdefault(self._owner(n), []).append(lowrank[n])
        self.collectives.reduce_to_owners(by_owner)
        # global norm
        sq = sum(squared_norm(lowrank[n]) for n in mats
                 if self.mstate[n].side == "right" or n in self.owned)
        dense = [(n, p) for n, p in self.dense_named if p.grad is not None]
        dense_grads = {n: _local(p.grad) for n, p in dense}
        sq += sum(squared_norm(g) for g in dense_grads.values())
        v = torch.tensor([sq + float(extra_sq)], dtype=torch.float64, device=self.collectives.device)
        self.collectives.all_reduce([v])
        norm = float(v[0]) ** 0.5
        coef = clip_coef(norm, self.grad_clip)
        self.last_clip_coef = coef
        self._apply(mats, lowrank, rule, lr, coef)
        if dense:
            dg = self._group("dense")
            for n, p in dense:
                g = dense_grads[n] if coef == 1.0 else dense_grads[n] * coef
                # same kernel choice as the single-device optimizer (the fused 8-bit kernel works on row shards)
                self._timed("optimizer", dense_adamw_step, _local(p), g, self.dense_state[n], dg["lr"],
                            self.config.betas, self.config.eps, dg["weight_decay"], fused=self.config.fused)
        self.steps_taken += 1
        self.last_comm = self.collectives.reset_step()
        return norm

    @staticmethod
    def _cdt(g: torch.Tensor) -> torch.dtype:
        return torch.float64 if g.dtype == torch.float64 else torch.float32

    def _basis_rows_float(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.basis_rows[name]
        if b is None:
            raise RuntimeError(f"{name}: no projector rows yet (refresh first)")
        return b.dequantize(dtype) if isinstance(b, Int4Matrix) else b.to(dtype)

    def _apply(self, mats: Sequence[str], lowrank: dict[str, torch.Tensor], rule: LowRankAdamW, lr: float,
               coef: float) -> None:
        """Right: every rank normalises and applies its rows. Left: owners normalise; N and the step sizes are
        broadcast; every rank applies P_rows N to its rows."""
        left = [n for n in mats if self.mstate[n].side == "left"]
        for n in mats:
            st = self.mstate[n]
            if st.side != "right":
                continue
            r = lowrank[n]
            if self._rows(n) == 0:
                st.step += 1  # nothing held here; the step count (the SR stream key) still advances
                continue
            nrm, step_size = self._timed("optimizer", rule.normalise, st, r.mul_(coef) if coef < 1.0 else r, lr)
            self._timed("requantize", rule.apply_rows, st, self._shard[n].local_weight(), nrm, step_size, lr,
                        self._off(n), n_row_offset=self._off(n))
        if not left:
            return
        wire: dict[str, torch.Tensor] = {}
        sizes: dict[str, float] = {}
        for n in left:
            r = lowrank[n]
            if n in self.owned:
                nrm, sizes[n] = self._timed("optimizer", rule.normalise, self.mstate[n],
                                            r.mul_(coef) if coef < 1.0 else r, lr)
                wire[n] = nrm.to(r.dtype)
            else:
                wire[n] = r  # spent partial sum: the receive buffer (same shape and dtype as N)
        step_sizes = self.collectives.broadcast_owner_updates(left, self._owner, lambda n: [wire[n]], sizes)
        for n in left:
            step_size = step_sizes[n]
            st = self.mstate[n]
            if n not in self.owned:
                st.step += 1
            if self._rows(n) == 0:
                continue
            basis = self._basis_rows_float(n, wire[n].dtype)
            self._timed("requantize", rule.apply_rows, st, self._shard[n].local_weight(), wire[n], step_size, lr,
                        self._off(n), basis)

    # --- refresh ----------------------------------------------------------------------------------------------
    def _refresh(self, due: Sequence[str], grads: Mapping[str, torch.Tensor]) -> None:
        """Gather each due matrix's gradient rows to its owner only (bucketed per owner), owners refresh, then
        projectors and the next refresh step go to the ranks that need them."""
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
            full = {}
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

    def _sync_projectors(self, names: Sequence[str]) -> None:
        """Owners send ``[next_refresh, interval]`` of every refreshed matrix; right: Q (INT4 codes + scales, or
        fp32) to every rank; left: each rank its rows of P (the owner slices its own)."""
        kind = "int4" if self.config.quantize and self.config.proj_bits == 4 else "float"
        headers = {}
        for n in names:
            h = torch.zeros(2, dtype=torch.int64)
            if n in self.owned:
                st = self.mstate[n]
                h[0], h[1] = st.gate.next_refresh, st.gate.interval
            headers[n] = h
        by_owner: dict[int, list[torch.Tensor]] = {}
        for n in names:
            by_owner.setdefault(self._owner(n), []).append(headers[n])
        self.collectives.broadcast_from_owners(by_owner)
        for n in names:
            if n not in self.owned:
                self.mstate[n].gate.next_refresh = int(headers[n][0])
                self.mstate[n].gate.interval = int(headers[n][1])
        right = [n for n in names if self.mstate[n].side == "right"]
        left = [n for n in names if self.mstate[n].side == "left"]
        payload: dict[str, list[torch.Tensor]] = {}
        for n in right:
            st = self.mstate[n]
            if n in self.owned:
                payload[n] = [st.basis.packed, st.basis.scales] if kind == "int4" else [st.basis.contiguous()]
                continue
            rows, cols = basis_shape(*st.shape, st.rank, st.side)
            dev = self._shard[n].local_tensor().device
            if kind == "int4":
                payload[n] = [torch.empty((rows * cols + 1) // 2, dtype=torch.uint8, device=dev),
                              torch.empty(rows, num_groups(cols, min(self.config.proj_group_size, cols)),
                                          dtype=torch.float32, device=dev)]
            else:
                payload[n] = [torch.empty(rows, cols, dtype=torch.float32, device=dev)]
        by_owner = {}
        for n in right:
            by_owner.setdefault(self._owner(n), []).extend(payload[n])
        self.collectives.broadcast_from_owners(by_owner)
        for n in right:
            if n in self.owned:
                continue
            st = self.mstate[n]
            shape = basis_shape(*st.shape, st.rank, st.side)
            st.basis = Int4Matrix(*payload[n], shape, self.config.proj_group_size) if kind == "int4" \
                else payload[n][0]
        for n in left:
            self._scatter_left(n, kind)

    def _scatter_left(self, name: str, kind: str) -> None:
        """P's rows to the ranks that hold those weight rows: INT4 codes (one per int8, re-packed per shard) +
        row scales, or fp32 rows. The rows of an INT4 P with row-aligned groups quantise independently."""
        st, s = self.mstate[name], self._shard[name]
        owner, r = self._owner(name), st.rank
        rows = list(s.rows_per_rank)
        k = rows[self.rank]
        dev = s.local_tensor().device  # the rows' device (the transfer itself goes through Collectives' device)
        like_codes = torch.empty(0, r, dtype=torch.int8, device=dev)
        if kind == "int4":
            groups = num_groups(r, min(self.config.proj_group_size, r))
            codes = scales = None
            if self.rank == owner:
                m = st.shape[0]
                codes = unpack_int4(st.basis.packed, m * r).reshape(m, r)
                scales = st.basis.scales
            my_codes = self.collectives.scatter_rows(codes, owner, rows, like=like_codes)
            my_scales = self.collectives.scatter_rows(scales, owner, rows,
                                                      like=torch.empty(0, groups, dtype=torch.float32, device=dev))
            self.basis_rows[name] = Int4Matrix(pack_int4(my_codes), my_scales.contiguous(), (k, r),
                                               self.config.proj_group_size)
        else:
            full = st.basis.contiguous() if self.rank == owner else None
            self.basis_rows[name] = self.collectives.scatter_rows(full, owner, rows,
                                                                  like=torch.empty(0, r, dtype=torch.float32,
                                                                                   device=dev))

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
        """This rank's resident bytes: its weight rows, projectors (Q replicas, P rows, owners' whole P), moment
        shards, dense shards and their state."""
        out = {"projected_weights": 0, "projectors": 0, "lowrank_moments": 0, "dense_weights": 0,
               "dense_moments": 0}
        for s in self.shards:
            w = s.local_weight()
            out["projected_weights"] += w.nbytes() if isinstance(w, Int8Weight) else w.numel() * w.element_size()
            st = self.mstate[s.name]
            sb = st.state_bytes() if st.exp_avg is not None else {"projector": 0, "moments": 0}
            if st.exp_avg is None and st.basis is not None:
                sb["projector"] = st.basis.nbytes() if isinstance(st.basis, Int4Matrix) else \
                    st.basis.numel() * st.basis.element_size()
            b = self.basis_rows[s.name]
            if b is not None:
                sb["projector"] += b.nbytes() if isinstance(b, Int4Matrix) else b.numel() * b.element_size()
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

        ``projected[name]`` — owner only: the rule state (gate, step, whole projector; left: the moments);
        ``rows[name]`` — every rank, right projection: its moment rows with ``row_offset``; left: its P rows;
        ``dense[name]`` — this rank's dense shard state with its ``row_offset`` (``dense_offsets`` from the engine).
        :func:`merge_row_sharded_state_dicts` joins all ranks' into a single-device ``QGaLoreOptimizer`` state."""
        rows = {}
        for s in self.shards:
            st = self.mstate[s.name]
            entry: dict = {"row_offset": self._off(s.name), "rows": self._rows(s.name), "step": st.step}
            if st.side == "right":
                entry["tensors"] = {**{f"exp_avg.{k}": v for k, v in st.exp_avg.state_tensors().items()},
                                    **{f"exp_avg_sq.{k}": v for k, v in st.exp_avg_sq.state_tensors().items()}}
            else:
                b = self.basis_rows[s.name]
                entry["tensors"] = {} if b is None else (
                    {"basis.codes": unpack_int4(b.packed, b.shape[0] * b.shape[1]).reshape(b.shape),
                     "basis.scales": b.scales} if isinstance(b, Int4Matrix) else {"basis": b})
            rows[s.name] = entry
        projected = {}
        for n in self.owned:
            d = self.mstate[n].state_dict()
            if self.mstate[n].side == "right":  # moment rows travel in rows[...]
                d = {"tensors": {k: v for k, v in d["tensors"].items() if not k.startswith("exp_avg")},
                     "meta": d["meta"]}
            projected[n] = d
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

    def load_state_dict(self, state_dict: dict) -> None:
        """Collective. Load this rank's own shard (same world size and plan). A problem on any rank raises
        ``ValueError`` on every rank."""
        error = None
        try:
            self._load_local(state_dict)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self.collectives.device)
        self.collectives.all_reduce([flag])
        if int(flag) or error is not None:
            raise ValueError(f"optimizer state could not be loaded on rank {self.rank}: {error}" if error else
                             "optimizer state could not be loaded on another rank (see its error)")
        # the gate schedule and Q replicas come from the owners (P rows are re-sent too: equal to the saved ones)
        names = [s.name for s in self.shards]
        has = torch.tensor([int(self.mstate[n].basis is not None) if n in self.owned else 0 for n in names],
                           dtype=torch.int32, device=self.collectives.device)
        self.collectives.all_reduce([has])
        live = [n for n, h in zip(names, has.tolist()) if h]
        if live:
            self._sync_projectors(live)
        self.collectives.reset_step()

    def _load_local(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a row-sharded optimizer state (missing format tag {STATE_FORMAT!r})")
        shard = sd.get("shard", {})
        if shard.get("world_size") != self.world_size or shard.get("rank") != self.rank:
            raise ValueError(f"this state is rank {shard.get('rank')} of {shard.get('world_size')}, this process "
                             f"is rank {self.rank} of {self.world_size} (merge with merge_row_sharded_state_dicts "
                             "to change the world size)")
        if dict(shard.get("owner", {})) != dict(self.plan.owner):
            raise ValueError("the saved ownership plan differs from this run's")
        missing = sorted(self.owned - set(sd["projected"]))
        if missing or set(sd["rows"]) != set(self.mstate):
            raise ValueError(f"optimizer state does not match this rank's matrices (missing {missing[:3]})")
        for n in sorted(self.owned):
            st = self.mstate[n]
            d = sd["projected"][n]
            if st.side == "right":  # the moments live in rows[...]: load the rest only
                self._load_meta(st, d)
            else:
                st.load_state_dict(d, self.config.proj_group_size)
        for s in self.shards:
            st, e = self.mstate[s.name], sd["rows"][s.name]
            if int(e["row_offset"]) != self._off(s.name) or int(e["rows"]) != self._rows(s.name):
                raise ValueError(f"{s.name}: saved rows [{e['row_offset']}, +{e['rows']}) differ from this rank's")
            st.step = int(e["step"])
            t = e["tensors"]
            if st.side == "right":
                st.exp_avg.load_state_tensors({k[8:]: v for k, v in t.items() if k.startswith("exp_avg.")})
                st.exp_avg_sq.load_state_tensors({k[11:]: v for k, v in t.items() if k.startswith("exp_avg_sq.")})
            elif "basis.codes" in t:
                c = t["basis.codes"]
                self.basis_rows[s.name] = Int4Matrix(pack_int4(c), t["basis.scales"].clone(), tuple(c.shape),
                                                     self.config.proj_group_size)
            elif "basis" in t:
                self.basis_rows[s.name] = t["basis"].clone()
        for n, st in self.dense_state.items():
            if n not in sd["dense"]:
                raise ValueError(f"optimizer state has no entry for dense parameter {n}")
            st.load_state_dict(sd["dense"][n])
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "kind")})

    def _load_meta(self, st: MatrixState, d: dict) -> None:
        """The owner's gate, step and projector of a right-projected matrix (moments are loaded per rank)."""
        meta, tensors = d["meta"], d["tensors"]
        st.step = int(meta["step"])
        st.refresh_offset = int(meta.get("refresh_offset", 0))
        st.gate.load_state_dict(meta["gate"])
        shape = basis_shape(*st.shape, st.rank, st.side)
        if "basis.packed" in tensors:
            st.basis = Int4Matrix(tensors["basis.packed"].clone(), tensors["basis.scales"].clone(), shape,
                                  self.config.proj_group_size)
        elif "basis" in tensors:
            st.basis = tensors["basis"].clone()


def merge_row_sharded_state_dicts(shards: Iterable[Mapping]) -> dict:
    """All ranks' :meth:`RowShardedQGaLoreOptimizer.state_dict` -> one single-device ``QGaLoreOptimizer`` state
    (keyed by parameter name): owners' rule state, right-projected moment rows concatenated by row offset (8-bit
    blocks lie inside rows, so codes and scales concatenate exactly). Dense state is taken from the first shard
    when ranks hold it whole; sharded dense state needs the engine's offsets and is concatenated along dim 0."""
    shards = sorted(shards, key=lambda sd: sd["shard"]["rank"])
    if not shards:
        raise ValueError("merge_row_sharded_state_dicts needs at least one shard")
    for sd in shards:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a row-sharded optimizer state (missing format tag {STATE_FORMAT!r})")
    projected: dict[str, dict] = {}
    for sd in shards:
        for name, st in sd["projected"].items():
            if name in projected:
                raise ValueError(f"{name} appears in two shards: pass each rank's state_dict() once")
            projected[name] = {"tensors": dict(st["tensors"]), "meta": dict(st["meta"])}
    for name, st in projected.items():
        pieces = [sd["rows"][name] for sd in shards]
        if "exp_avg.codes" in pieces[0]["tensors"] or "exp_avg.data" in pieces[0]["tensors"]:
            for key in pieces[0]["tensors"]:
                st["tensors"][key] = torch.cat([p["tensors"][key] for p in pieces if p["rows"]])
    dense: dict[str, dict] = {}
    for name in shards[0]["dense"]:
        parts = [sd["dense"][name] for sd in shards]
        if len(parts) == 1:
            dense[name] = parts[0]
            continue
        dense[name] = {"meta": parts[0]["meta"],
                       "tensors": {k: torch.cat([p["tensors"][k] for p in parts]) for k in parts[0]["tensors"]}}
    out = {k: v for k, v in shards[0].items() if k not in ("projected", "rows", "dense", "shard", "format")}
    out.update({"format": REFERENCE_FORMAT, "projected": projected, "dense": dense})
    return out
