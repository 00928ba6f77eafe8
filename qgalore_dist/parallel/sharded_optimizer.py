"""``ShardedQGaLoreOptimizer``: the optimizer of the data-parallel (``ddp``) engine (docs/design.md §3).

Every rank holds the replicated model — INT8 codes + scales of every projected matrix, the dense parameters —
and runs forward/backward on its own micro-batches. Each projected matrix has one **owner** (from the
:class:`~qgalore_dist.parallel.plan.OwnershipPlan`): only the owner computes its SVD, decides its refresh gate and holds
its low-rank moments. Dense parameters are averaged with one bucketed all-reduce and stepped identically on every
rank, so no ``torch.nn.parallel.DistributedDataParallel`` wrapper is used and the INT8 buffers are never in a DDP
bucket nor in ``broadcast_buffers``. All traffic goes through :class:`~qgalore_dist.parallel.collectives.Collectives`;
all per-matrix math stays in the rule (:class:`~qgalore_dist.optim.lowrank_adamw.LowRankAdamW` /
:class:`~qgalore_dist.optim.projfactor.ProjFactor`): this module only orders the rule's phases and the collectives.

Communication modes (``N`` ranks; per projected ``m×n`` matrix with ``L = max(m, n)·c·r`` low-rank elements,
``b`` bytes per gradient element, ``g`` the weight group; bytes per rank per optimizer step):

``comm_mode="full"``
    Each projected matrix's full gradient is **reduced** (sum, then ÷N) to its owner, which refreshes if due (from
    this mean of the window's accumulated gradients — the non-layer-wise reference's rule), projects, normalises
    and applies at ``step()``; then the owners **broadcast** the new INT8 codes + scales (``m·n·(1 + 4/g)`` bytes
    received per non-owned matrix). Projectors and moments: owner only. Under gradient accumulation
    (``A = grad_accum`` micro-batches per step) ``full_reduce`` chooses between memory and bytes:

    * ``full_reduce="boundary"`` (default) — backward accumulates the full local gradient of every projected
      matrix (``QGaLoreLinear.weight_grad``) and it is reduced once, at ``step()``. Gradient bytes: ``m·n·b`` sent
      per non-owned matrix, received per owned one, per step, whatever ``A``. Memory: the full local gradient of
      *every* projected matrix lives from the first backward to the step — the whole-model gradient (26 GB fp32
      at 7B).
    * ``full_reduce="micro_batch"`` — each micro-batch's gradients are reduced to their owners inside backward,
      in buckets of ``refresh_bucket_bytes`` (as soon as one fills, the rest at the end of backward); non-owners
      free theirs at once and owners add them into one accumulated gradient per *owned* matrix. Gradient bytes:
      ``A × m·n·b`` per matrix per step. Memory: the owned matrices' gradients (≈ 1/N of the model's) plus at
      most one bucket of full gradients in flight. With ``A = 1`` both move the same bytes; only the memory
      differs.

``comm_mode="lowrank"``
    Projectors are replicated. Each rank projects its local gradient inside backward (the layer-wise sink of
    :class:`~qgalore_dist.nn.QGaLoreLinear`) into a low-rank accumulator and frees it, so under gradient
    accumulation it communicates once per optimizer step. At ``step()`` the accumulators are **reduced** to their
    owners (sum, ÷N); each owner normalises (moments) and **broadcasts** N — the normalised low-rank update (for
    ProjFactor: its first moment and row/column factors) — and the step size; every rank applies N to its replica
    with the shared stochastic-rounding stream (keyed by (seed, step, name, global index), so replicas round
    alike). Bytes: ``L·b`` reduced + ``L·b`` broadcast (``L·2`` with ``update_dtype=torch.bfloat16``) per matrix —
    a factor ``r / min(m, n)`` of ``full``'s gradient bytes. Memory: every rank holds the replicated INT4
    projectors and one low-rank accumulator per matrix (``L`` elements), never a full gradient except on refresh.

    **Refresh** (lowrank): a matrix due for a refresh keeps the gradient of the *first micro-batch* of the window
    (the single-device layer-wise reference's rule) instead of projecting it; these gradients are **reduced to
    their owners only** (never to all) in buckets of ``refresh_bucket_bytes`` — as soon as a bucket fills inside
    backward, and at the end of backward for the rest — so the owners' SVDs of one bucket run in parallel and at
    most a bucket of full gradients is alive. The owner computes the SVD of the mean gradient, updates the gate,
    broadcasts the new INT4 projector (and next refresh step), and projects the reduced sum itself (it equals the
    sum of the ranks' projections, by linearity), so non-owners contribute nothing for that micro-batch. Later
    micro-batches of the window are projected with the new projector on every rank. Random projections
    (``gaussian`` / ``rademacher``) need no gradient: the owner draws, broadcasts the draw's step, and every rank
    projects its own gradient.

With ``N = 1`` (no process group, :class:`Collectives` in local mode) ``full`` reproduces
``QGaLoreOptimizer(layerwise=False)`` and ``lowrank`` reproduces ``QGaLoreOptimizer(layerwise=True)`` bit for bit,
gradient accumulation and clipping included.

**Clipping** uses the reference's definition, ``√(‖dense‖² + Σ‖R‖²)`` over the *averaged* dense gradients and
the *averaged* low-rank gradients (the norm of what the optimizer consumes): each owner sums its matrices' ‖R‖²,
rank 0 adds ‖dense‖², one all-reduce of two fp64 numbers, so every rank gets the same bits and the same factor.

**Replicas**: at construction and every ``replica_check_every`` steps, every rank checksums each projected
matrix's codes + scales (and each dense parameter + its moments, reference rank 0); a replica that differs from
its owner's is re-broadcast from the owner with a ``RuntimeWarning`` naming it, or raises
:class:`~qgalore_dist.parallel.replicas.ReplicaMismatch` with ``strict_replicas=True``. At construction, all ranks
compare a hash of config, engine options, plan and parameter names/shapes first; a mismatch raises ``ValueError``
on every rank.

Training loop (every rank; ``dist`` initialised, e.g. by :func:`qgalore_dist.parallel.launch_env.init_distributed`)::

    quantize_model(model, group_size=..., seed=seed)          # keyed init: identical codes on every rank
    coll = Collectives()                                      # collective: same point on every rank
    opt = ShardedQGaLoreOptimizer(model, config, coll, comm_mode="lowrank", grad_clip=1.0)
    for step in range(steps):
        for micro in range(grad_accum):                       # this rank's micro-batches
            (loss_fn(model, batch) / grad_accum).backward()   # no DDP wrapper, no no_sync()
        opt.step()                                            # collective: every rank
        norm = opt.last_step.grad_norm                        # global pre-clip norm, equal on every rank
        opt.zero_grad()
        metrics["comm_bytes"] = opt.comm_bytes                # this step's bytes through this rank's link
    torch.save(opt.state_dict(), f"optim_rank{rank}.pt")     # this rank's shard; merge_state_dicts(...) merges

``step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` must be called by every rank at the same
point (``step`` and ``load_state_dict`` are collective; ``state_dict`` is local).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES
from ..optim.lowrank_adamw import MatrixState
from ..optim.norms import squared_norm
from ..optim.optimizer import ProjectedMatrix, QGaLoreOptimizer
from ..optim.projfactor import ProjFactorState
from ..projection.projector import lowrank_shape
from ..projection.random_proj import RANDOM_PROJECTIONS, RandomBasis
from ..quant.int4 import Int4Matrix
from .collectives import Collectives, CommCounters
from .plan import OwnershipPlan, plan_for_model, plan_options
from .replicas import ReplicaGroup, check_replicas, check_same_setup, flat_view

__all__ = ["COMM_MODES", "FULL_REDUCE", "ShardedQGaLoreOptimizer", "default_plan", "merge_state_dicts"]

COMM_MODES = ("full", "lowrank")
FULL_REDUCE = ("boundary", "micro_batch")  # full mode under gradient accumulation: memory vs bytes
STATE_FORMAT = "qgalore_dist.optimizer/1"  # QGaLoreOptimizer's: a merged sharded state loads into either
_WIRE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def default_plan(model: nn.Module, config: QGaLoreConfig, world_size: int,
                 target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> OwnershipPlan:
    """The ownership plan of ``model``'s projected matrices under ``config`` (a pure function: every rank computes
    the same). Random projections are planned with the randomized-SVD cost model: drawing and projecting cost
    ``∝ m·n·r``, like a sketch, rather than an SVD's ``m·n·min(m, n)``."""
    opts = plan_options(config)
    if config.projection in RANDOM_PROJECTIONS:
        opts["projection"] = "rsvd"
    return plan_for_model(model, world_size, tuple(target_modules), **opts)


def merge_state_dicts(shards: Iterable[Mapping]) -> dict:
    """One optimizer state from every rank's :meth:`ShardedQGaLoreOptimizer.state_dict`: each matrix's state from
    its owner, the (replicated) dense state from the first shard. The result is keyed by parameter name only, so
    it loads into ``QGaLoreOptimizer`` or into a ``ShardedQGaLoreOptimizer`` at any world size."""
    shards = list(shards)
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    projected: dict[str, dict] = {}
    for sd in shards:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a qgalore_dist optimizer state (missing format tag {STATE_FORMAT!r})")
        for name, st in sd["projected"].items():
            if name in projected:
                raise ValueError(f"{name} appears in two shards: pass each rank's state_dict() once")
            projected[name] = st
    out = {k: v for k, v in shards[0].items() if k not in ("projected", "shard")}
    out["projected"] = projected
    return out


class ShardedQGaLoreOptimizer(QGaLoreOptimizer):
    """Data-parallel Q-GaLore: replicated INT8 weights, one owner per projected matrix (see the module docstring).

    Args:
        model: the prepared (INT8-converted, or float in reference mode) model, identical on every rank.
        config: projected-matrix settings (as for :class:`QGaLoreOptimizer`).
        collectives: the :class:`Collectives` this optimizer communicates through (its world is the data-parallel
            world; a local-mode instance gives the single-process case). The optimizer owns its per-step byte
            counters: :meth:`step` ends the window with ``collectives.reset_step()``.
        plan: owner per projected matrix; default :func:`default_plan` (computed, identically, on every rank).
        comm_mode: ``"lowrank"`` (default) or ``"full"``.
        update_dtype: lowrank mode — dtype N is broadcast in (default: N's own, fp32 / fp64 in fp64 runs, for
            parity); ``torch.bfloat16`` halves those bytes. The owner applies the same rounded N as every other rank.
        replica_check_every: hash the replicas every this many optimizer steps (0: only at construction).
        strict_replicas: raise :class:`~qgalore_dist.parallel.replicas.ReplicaMismatch` instead of repairing.
        refresh_bucket_bytes: full gradients held in backward before they are reduced to their owners
            mid-backward — lowrank mode: refresh gradients (more: more owners' SVDs in parallel; less: less memory
            on refresh steps); ``full_reduce="micro_batch"``: every micro-batch's gradients.
        full_reduce: full mode — ``"boundary"`` (default: keep the full local gradient, reduce once per step) or
            ``"micro_batch"`` (reduce every micro-batch's gradient to its owner in backward: ``grad_accum`` times
            the gradient bytes, ≈1/N of the gradient memory); see the module docstring.
        reduce_dense: average the dense gradients over the ranks at ``step()`` (default). ``False``: they arrive
            averaged already — a ``DistributedDataParallel`` wrapper that leaves the INT8 buffers alone reduces them
            (``transformers.Trainer`` under torchrun, :func:`~qgalore_dist.train.hf_trainer.optimizer_for_trainer`);
            the projected matrices' traffic stays this optimizer's.
        dense_state_bits, target_modules, stagger_refresh, dense_lr, dense_weight_decay, grad_clip: as for
            :class:`QGaLoreOptimizer` (``grad_accum`` needs no declaration here: the step always runs in ``step()``).

    ``step(closure)`` returns the closure's loss; :attr:`last_step` holds the global pre-clip norm (equal on every
    rank; measured whether clipping or not) and the clipping factor.
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, collectives: Collectives,
                 plan: OwnershipPlan | None = None, *, comm_mode: str = "lowrank",
                 update_dtype: torch.dtype | None = None, replica_check_every: int = 50,
                 strict_replicas: bool = False, refresh_bucket_bytes: int = 1 << 30,
                 full_reduce: str = "boundary", dense_state_bits: int = 32,
                 target_modules=DEFAULT_TARGET_MODULES, stagger_refresh: bool = False,
                 dense_lr: float | None = None, dense_weight_decay: float | None = None, grad_clip: float = 0.0,
                 reduce_dense: bool = True):
        if comm_mode not in COMM_MODES:
            raise ValueError(f"comm_mode={comm_mode!r} is invalid: allowed: {', '.join(COMM_MODES)}")
        if update_dtype is not None and (comm_mode != "lowrank" or update_dtype not in _WIRE_DTYPES):
            raise ValueError(f"update_dtype={update_dtype!r} is invalid: a float dtype, and only with "
                             "comm_mode='lowrank' (full mode broadcasts INT8 codes)")
        if isinstance(replica_check_every, bool) or not isinstance(replica_check_every, int) \
                or replica_check_every < 0:
            raise ValueError(f"replica_check_every={replica_check_every!r} is invalid: an integer >= 0 "
                             "(0: check only at start-up)")
        if refresh_bucket_bytes < 1:
            raise ValueError(f"refresh_bucket_bytes={refresh_bucket_bytes!r} is invalid: must be >= 1")
        if full_reduce not in FULL_REDUCE:
            raise ValueError(f"full_reduce={full_reduce!r} is invalid: allowed: {', '.join(FULL_REDUCE)}")
        if full_reduce != "boundary" and comm_mode != "full":
            raise ValueError(f"full_reduce={full_reduce!r} needs comm_mode='full' (lowrank mode always "
                             "communicates once per step)")
        self.collectives = collectives
        self.comm_mode = comm_mode
        self.rank, self.world_size = collectives.rank, collectives.world_size
        if plan is None:
            plan = default_plan(model, config, self.world_size, target_modules)
        if plan.world_size != self.world_size:
            raise ValueError(f"the ownership plan is for world size {plan.world_size}, the collectives' world has "
                             f"{self.world_size} ranks")
        self.plan = plan
        self.owned = set(plan.owned_by(self.rank))  # read by _init_matrix_state during super().__init__
        super().__init__(model, config, dense_state_bits=dense_state_bits, target_modules=target_modules,
                         stagger_refresh=stagger_refresh, dense_lr=dense_lr, dense_weight_decay=dense_weight_decay,
                         layerwise=False, grad_accum=1, grad_clip=grad_clip)
        self.update_dtype = update_dtype
        self.replica_check_every = replica_check_every
        self.strict_replicas = strict_replicas
        self.refresh_bucket_bytes = int(refresh_bucket_bytes)
        self.full_reduce = full_reduce
        self.reduce_dense = bool(reduce_dense)
        # gradients consumed inside backward: lowrank (projected locally) and full/micro_batch (reduced at once)
        self.layerwise = comm_mode == "lowrank" or full_reduce == "micro_batch"
        self._owner_grad: dict[str, torch.Tensor] = {}  # full/micro_batch: Σ over ranks and micro-batches, owners
        self._pm = {pm.name: pm for pm in self.matrices}
        self.steps_taken = 0
        self.replica_repairs: list[tuple[int, str, list[int]]] = []  # (step, group, ranks that differed)
        # the accumulation window (lowrank mode): names delivered, refresh gradients waiting to be reduced, matrices
        # whose only contribution so far is the owner's projected sum (nothing for non-owners to reduce)
        self._window: dict[str, None] = {}  # insertion-ordered: first delivery order, the reference's accum order
        self._grad_dtype: dict[str, torch.dtype] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._flush_queued = False
        self._owner_only: set[str] = set()

        # first collective: every rank must agree on everything that shapes a collective
        check_same_setup(collectives, {
            "config": config.to_dict(),
            "engine options": {"comm_mode": comm_mode, "full_reduce": full_reduce,
                               "update_dtype": str(update_dtype),
                               "replica_check_every": replica_check_every, "strict_replicas": strict_replicas,
                               "refresh_bucket_bytes": self.refresh_bucket_bytes,
                               "dense_state_bits": dense_state_bits, "stagger_refresh": stagger_refresh,
                               "grad_clip": self.grad_clip, "dense_lr": dense_lr,
                               "dense_weight_decay": dense_weight_decay, "world_size": self.world_size,
                               "reduce_dense": self.reduce_dense},
            "ownership plan": sorted(plan.owner.items()),
            "parameters": [[pm.name, list(pm.shape), str(pm.tensor().dtype)] for pm in self.matrices]
                          + [[n, list(p.shape), str(p.dtype)] for n, p in self.dense_named],
        })
        names = {pm.name for pm in self.matrices}
        if names != set(plan.owner):  # after the agreement check: every rank raises this alike
            raise ValueError(f"the ownership plan does not cover the projected matrices: missing "
                             f"{sorted(names - set(plan.owner))[:3]}, unexpected {sorted(set(plan.owner) - names)[:3]}")
        if self.layerwise:
            for pm in self.matrices:
                self._install_sink(pm)
        self.check_replicas()  # identical starting point (keyed init makes this a pure check)
        self.startup_comm = collectives.reset_step()
        self.last_comm = CommCounters().as_dict()

    # --- state layout ---------------------------------------------------------------------------------------
    def _init_matrix_state(self, pm: ProjectedMatrix, refresh_offset: int) -> MatrixState:
        """Owned: the rule's full state. Not owned: a replica — shape, side, rank, step, next refresh and (lowrank
        mode) the broadcast projector, but no moments (allocated per matrix and dropped at once)."""
        st = super()._init_matrix_state(pm, refresh_offset)
        if pm.name not in self.owned:
            st.exp_avg = st.exp_avg_sq = None
            if isinstance(st, ProjFactorState):
                st.row_factor = st.col_factor = None
        return st

    def _owner(self, name: str) -> int:
        return self.plan.owner[name]

    def _by_owner(self, names: Iterable[str], tensors: Callable[[str], list[torch.Tensor]]
                  ) -> dict[int, list[torch.Tensor]]:
        """``{owner: tensors of its matrices}`` in ``names`` order — the same mapping on every rank (as flat views,
        see :func:`~qgalore_dist.parallel.replicas.flat_view`)."""
        out: dict[int, list[torch.Tensor]] = {}
        for n in names:
            out.setdefault(self._owner(n), []).extend(flat_view(t) for t in tensors(n))
        return out

    def _weight_tensors(self, name: str) -> list[torch.Tensor]:
        """The replicated storage of a projected weight: INT8 codes + scales (float mode: the weight itself)."""
        pm = self._pm[name]
        if pm.quantized:
            return [pm.module.weight_codes, pm.module.weight_scales]
        return [pm.module.weight.data]

    def _compute_dtype(self, name: str) -> torch.dtype:
        """dtype of N (the rules compute moments in fp64 for fp64 gradients, else fp32)."""
        return torch.float64 if self._grad_dtype[name] == torch.float64 else torch.float32

    # --- lowrank mode: gradients consumed inside backward -----------------------------------------------------
    @torch.no_grad()
    def _consume(self, pm: ProjectedMatrix, grad: torch.Tensor) -> None:
        if self.comm_mode == "full":
            self._consume_full(pm, grad)
            return
        name = pm.name
        self._grad_dtype[name] = grad.dtype
        first = name not in self._window
        self._window[name] = None
        if name in self._pending:  # the same weight used twice in one forward: its first micro-batch gradient
            self._pending[name].add_(grad)
            return
        if first and self.rule.needs_refresh(self.mstate[name]):
            self._pending[name] = grad
            self._pending_bytes += grad.numel() * grad.element_size()
            if not self._flush_queued:  # reduce whatever is left once this backward pass ends
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._flush_queued = True
            if self._pending_bytes >= self.refresh_bucket_bytes:
                self._flush_refresh()
            return
        r = self._timed("projection", self.rule.project, self.mstate[name], grad)
        acc = self.accum.get(name)
        if acc is None:
            self.accum[name] = r
        else:
            acc.add_(r)
        self._owner_only.discard(name)

    def _end_of_backward(self) -> None:
        self._flush_queued = False
        if self.comm_mode == "full":
            self._flush_micro_batch()
        else:
            self._flush_refresh()

    def _queue_flush(self) -> None:
        if not self._flush_queued:  # reduce whatever is left once this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._flush_queued = True

    # --- full mode, full_reduce="micro_batch": each micro-batch's gradient reduced to its owner in backward ------
    @torch.no_grad()
    def _consume_full(self, pm: ProjectedMatrix, grad: torch.Tensor) -> None:
        name = pm.name
        self._window[name] = None
        if name in self._pending:  # the same weight used twice in one forward
            self._pending[name].add_(grad)
            return
        self._pending[name] = grad
        self._pending_bytes += grad.numel() * grad.element_size()
        self._queue_flush()
        if self._pending_bytes >= self.refresh_bucket_bytes:
            self._flush_micro_batch()

    @torch.no_grad()
    def _flush_micro_batch(self) -> None:
        """Reduce the pending gradients to their owners (hook order: the same on every rank); owners add the sum
        into their accumulated gradient, non-owners drop theirs."""
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        if not pending:
            return
        names = list(pending)
        self.collectives.reduce_to_owners(self._by_owner(names, lambda n: [pending[n]]))
        for n in names:
            if n not in self.owned:
                continue
            acc = self._owner_grad.get(n)
            if acc is None:
                self._owner_grad[n] = pending[n]
            else:
                acc.add_(pending[n])

    @torch.no_grad()
    def _flush_refresh(self) -> None:
        """Refresh the pending matrices: reduce their first-micro-batch gradients to the owners, owners refresh
        and project the sum, projectors are broadcast. Every rank reaches this at the same point of backward
        (same hook order, same sizes), so the collectives match."""
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        if not pending:
            return
        names = list(pending)  # hook order: identical on every rank
        random = self.config.projection in RANDOM_PROJECTIONS
        ws = self.world_size
        if not random:
            self.collectives.reduce_to_owners(self._by_owner(names, lambda n: [pending[n]]))
        for n in names:
            if n not in self.owned:
                continue
            st, g = self.mstate[n], pending[n]
            if random:  # the draw needs no gradient: no reduction
                self._timed("svd", self.rule.refresh, st, g)
                continue
            if ws > 1:
                g.div_(ws)  # the mean over ranks = the gradient of the ranks' concatenated batch
            self._timed("svd", self.rule.refresh, st, g)
            r = self._timed("projection", self.rule.project, st, g)
            self.accum[n] = r.mul_(ws) if ws > 1 else r  # Σ_ranks of the projected gradients, like everyone else's
        self._sync_projectors(names)
        for n in names:
            if random:
                self.accum[n] = self._timed("projection", self.rule.project, self.mstate[n], pending[n])
            else:
                self._owner_only.add(n)

    def _sync_projectors(self, names: Sequence[str]) -> None:
        """Owners broadcast the projector, step and next refresh of ``names`` to the replicas (collective).

        Round 1: one int64 header per matrix ``[step, next_refresh, has basis, draw step, stride0, stride1]``.
        Round 2: the stored projectors — INT4 codes + scales, or fp32 received with the owner's strides (LAPACK
        returns column-major factors, and the matmul kernel, so the rounding, depends on the layout). Random
        projections send nothing more: a replica regenerates the draw from (seed, draw step, name).
        """
        if self.world_size == 1 or not names:
            return
        kind = self.rule.basis_kind()
        headers: dict[str, torch.Tensor] = {}
        for n in names:
            h = torch.zeros(6, dtype=torch.int64)
            st = self.mstate[n]
            if n in self.owned:
                h[0], h[1], h[2] = st.step, st.gate.next_refresh, st.basis is not None
                if kind == "random" and st.basis is not None:
                    h[3] = st.basis.step
                elif kind == "float" and st.basis is not None:
                    h[4], h[5] = st.basis.stride()
            headers[n] = h
        self.collectives.broadcast_from_owners(self._by_owner(names, lambda n: [headers[n]]))
        stored = [n for n in names if int(headers[n][2])] if kind != "random" else []
        payload = {n: self.rule.basis_tensors(self.mstate[n]) if n in self.owned else
                   self.rule.basis_buffers(self.mstate[n], self._pm[n].tensor().device,
                                           tuple(int(x) for x in headers[n][4:6]))
                   for n in stored}
        self.collectives.broadcast_from_owners(self._by_owner(stored, lambda n: payload[n]))
        for n in names:
            if n in self.owned:
                continue
            st, h = self.mstate[n], headers[n]
            st.step, st.gate.next_refresh = int(h[0]), int(h[1])
            if not int(h[2]):
                st.basis = None
            else:
                self.rule.basis_from_tensors(st, payload.get(n, []), int(h[3]), self._pm[n].tensor().device)

    # --- the step ---------------------------------------------------------------------------------------------
    def _present(self) -> tuple[list[str], list[tuple[str, torch.Tensor]]]:
        """Projected matrices and dense parameters with a gradient this window — on every rank or on none (one
        int32 all-reduce; a gradient on some ranks only would leave collectives of different shapes, so it is an
        error, raised on every rank, rather than a hang)."""
        if self.layerwise:
            mine = [pm.name in self._window for pm in self.matrices]
        else:
            mine = [pm.grad() is not None for pm in self.matrices]
        mine += [p.grad is not None for _, p in self.dense_named]
        labels = [pm.name for pm in self.matrices] + [n for n, _ in self.dense_named]
        counts = self.collectives.present_everywhere(
            labels, mine, "data-parallel step: these parameters got a gradient on some ranks only (every rank must "
            "run the same model)")
        k = len(self.matrices)
        mats = [pm.name for pm, c in zip(self.matrices, counts[:k]) if c]
        dense = [(n, p) for (n, p), c in zip(self.dense_named, counts[k:]) if c]
        return mats, dense

    def _begin(self) -> tuple[list[float], object]:
        """Close the window: the refresh / micro-batch reductions still pending, dense gradients averaged, the
        projected ones reduced to their owners. Shares of the norm²: [Σ‖R‖² of this rank's owned matrices, ‖dense‖²
        on rank 0 (averaged, replicated)] — matrices summed in the single-device reference's order (model order;
        lowrank: first-delivery order), so one rank matches it bit for bit."""
        rule, lr = self._rule()
        if self.comm_mode == "lowrank":
            self._flush_refresh()  # normally done at the end of backward already
        elif self.full_reduce == "micro_batch":
            self._flush_micro_batch()
        mats, dense = self._present()
        dense_grads = [p.grad for _, p in dense]
        if self.reduce_dense and dense_grads:  # else averaged already, by a DDP wrapper (see reduce_dense)
            self.collectives.all_reduce(dense_grads, op="avg")
        if self.comm_mode == "full":
            self._reduce_full(mats)
        else:
            self._reduce_lowrank(mats)
        order = list(self._window) if self.comm_mode == "lowrank" else mats
        live = set(mats)
        sq = sum(squared_norm(self.accum[n]) for n in order if n in live and n in self.owned)
        dsq = sum(squared_norm(g) for g in dense_grads) if self.rank == 0 else 0.0
        return [sq, dsq], (mats, dense, rule, lr)

    def _apply(self, payload, coef: float) -> None:
        mats, dense, rule, lr = payload
        if self.comm_mode == "full":
            self._apply_full(mats, rule, lr, coef)
        else:
            self._apply_lowrank(mats, rule, lr, coef)
        for n, p in dense:
            self._step_dense(n, p, p.grad if coef == 1.0 else p.grad * coef)
        self._end_window()
        self.steps_taken += 1
        if self.replica_check_every and self.steps_taken % self.replica_check_every == 0:
            self.check_replicas()

    def _after_step(self) -> None:
        self.last_comm = self.collectives.reset_step()

    def _reduce_full(self, mats: Sequence[str]) -> None:
        """Full gradients summed at their owners (micro_batch: already, in backward); owners take the mean, refresh
        if due and project."""
        if self.full_reduce == "micro_batch":
            grads = self._owner_grad
        else:
            grads = {n: self._pm[n].grad() for n in mats}
            self.collectives.reduce_to_owners(self._by_owner(mats, lambda n: [grads[n]]))
        for n in mats:
            pm = self._pm[n]
            if n in self.owned:
                g = grads[n].div_(self.world_size) if self.world_size > 1 else grads[n]
                self.accum[n] = self._project_into_window(pm, g)
            pm.clear_grad()

    def _apply_full(self, mats: Sequence[str], rule, lr: float, coef: float) -> None:
        """Owners step their matrices; then every owner's new codes + scales reach every replica."""
        for n in mats:
            if n in self.owned:
                r = self.accum[n]
                self._apply_matrix(self._pm[n], r.mul_(coef) if coef < 1.0 else r, rule, lr)
        self.collectives.broadcast_from_owners(self._by_owner(mats, self._weight_tensors))

    def _reduce_lowrank(self, mats: Sequence[str]) -> None:
        """Low-rank accumulators summed at their owners (÷N there); matrices refreshed this window without a
        later micro-batch are already complete at the owner."""
        send = [n for n in mats if n not in self._owner_only]
        self.collectives.reduce_to_owners(self._by_owner(send, lambda n: [self.accum[n]]))
        if self.world_size > 1:
            for n in mats:
                if n in self.owned:
                    self.accum[n].div_(self.world_size)

    def _wire(self, name: str, update=None) -> list[torch.Tensor]:
        """What travels for one matrix's update — the rule's :meth:`~..optim.lowrank_adamw.LowRankAdamW.update_tensors`
        with its low-rank part in the wire dtype. ``update`` is the owner's; None allocates receive buffers
        (re-using the spent accumulator)."""
        st = self.mstate[name]
        cdt = self._compute_dtype(name)
        wdt = self.update_dtype or cdt
        if update is not None:
            tensors = self.rule.update_tensors(update)
            return [tensors[0].to(wdt), *tensors[1:]]
        acc = self.accum.get(name)
        shape = lowrank_shape(*st.proj_shape, st.rank, st.side)
        low = acc if acc is not None and acc.dtype == wdt else \
            torch.empty(shape, dtype=wdt, device=self._pm[name].tensor().device)
        return self.rule.update_buffers(st, low, cdt)

    def _unwire(self, name: str, tensors: list[torch.Tensor]):
        return self.rule.update_from_tensors(self.mstate[name], tensors, self._compute_dtype(name))

    def _apply_lowrank(self, mats: Sequence[str], rule, lr: float, coef: float) -> None:
        """Owners normalise; N and the step sizes are broadcast; every rank applies them to its replica."""
        wire: dict[str, list[torch.Tensor]] = {}
        sizes: dict[str, float] = {}
        for n in mats:
            if n in self.owned:
                r = self.accum[n]
                update, sizes[n] = self._timed("optimizer", rule.normalise, self.mstate[n],
                                               r.mul_(coef) if coef < 1.0 else r, lr)
                wire[n] = self._wire(n, update)
            else:
                wire[n] = self._wire(n, None)
        step_sizes = self.collectives.broadcast_owner_updates(mats, self._owner,
                                                              lambda n: [flat_view(t) for t in wire[n]], sizes)
        for n in mats:
            step_size = step_sizes[n]
            st = self.mstate[n]
            if n not in self.owned:
                st.step += 1  # the owner's normalise advanced its copy: the SR stream is keyed by this count
            # the owner too applies what went over the wire, so a bf16 wire cannot split the replicas
            self._apply_rows_blocked(self._pm[n], self._unwire(n, wire[n]), step_size, rule, lr)

    def _end_window(self) -> None:
        self.accum.clear()
        self._owner_grad.clear()
        self._window.clear()
        self._owner_only.clear()
        self._grad_dtype.clear()
        # only an interrupted backward leaves these set (its end-of-backward callback never ran)
        self._pending, self._pending_bytes, self._flush_queued = {}, 0, False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._end_window()
        super().zero_grad(set_to_none)

    # --- replicas ---------------------------------------------------------------------------------------------
    def replica_groups(self) -> list[ReplicaGroup]:
        """What must be identical on every rank: each projected weight (truth: its owner) and each dense parameter
        with its moments (truth: rank 0)."""
        groups = [ReplicaGroup(pm.name, self._owner(pm.name), self._weight_tensors(pm.name)) for pm in self.matrices]
        for n, p in self.dense_named:
            st = self.dense_state[n]
            groups.append(ReplicaGroup(n, 0, [p.data, *st.exp_avg.state_tensors().values(),
                                               *st.exp_avg_sq.state_tensors().values()]))
        return groups

    def check_replicas(self) -> dict[str, list[int]]:
        """Collective: checksum every replica against its owner's, re-broadcast (warning) or raise (strict).
        Returns ``{name: ranks that differed}``; repairs are also logged in ``replica_repairs``."""
        bad = check_replicas(self.collectives, self.replica_groups(), self.strict_replicas,
                             where=f" at step {self.steps_taken}")
        self.replica_repairs.extend((self.steps_taken, n, r) for n, r in bad.items())
        return bad

    # --- metrics ----------------------------------------------------------------------------------------------
    @property
    def comm_bytes(self) -> int:
        """Bytes through this rank's link (sent + received) in the last optimizer step, backward-time refresh
        traffic included (the window runs from the previous ``step()`` to this one)."""
        return int(self.last_comm["comm_bytes"])

    def _matrix_state_bytes(self, pm) -> dict[str, int]:
        """Owned matrices: projector + moments; others: only the projector replica held here (lowrank mode)."""
        st = self.mstate[pm.name]
        if pm.name in self.owned:
            return st.state_bytes()
        if isinstance(st.basis, (Int4Matrix, RandomBasis)):
            return {"projector": st.basis.nbytes(), "moments": 0}
        if st.basis is not None:
            return {"projector": st.basis.numel() * st.basis.element_size(), "moments": 0}
        return {"projector": 0, "moments": 0}

    # --- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard (local, no communication): the owned matrices' state, the replicated dense state and
        param groups, plus ``"shard"`` (rank, world size, owners). :func:`merge_state_dicts` joins all ranks'."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "dense_state_bits": self.dense_state_bits,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "projected": {n: st.state_dict() for n, st in self.mstate.items() if n in self.owned},
            "dense": {n: st.state_dict() for n, st in self.dense_state.items()},
            "shard": {"rank": self.rank, "world_size": self.world_size, "comm_mode": self.comm_mode,
                      "owner": dict(self.plan.owner)},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Collective. Load this rank's owned matrices from ``state_dict`` — its own shard, or a merged state
        (:func:`merge_state_dicts`, or a single-device ``QGaLoreOptimizer`` state) at any world size — and the
        dense state; then (lowrank mode) the owners broadcast projectors and step counts to the replicas.
        A problem on any rank raises ``ValueError`` on every rank."""
        self.collectives.agreed(lambda: self._load_local(state_dict), "optimizer state could not be loaded")
        if self.comm_mode == "lowrank":
            self._sync_projectors([pm.name for pm in self.matrices])
        self.collectives.reset_step()

    def _load_local(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"not a qgalore_dist optimizer state (missing format tag {STATE_FORMAT!r})")
        unexpected = sorted(set(sd["projected"]) - set(self.mstate))
        missing = sorted(self.owned - set(sd["projected"]))
        if unexpected or missing:
            raise ValueError(f"optimizer state does not match this rank's matrices: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]} (to change the world size, load merge_state_dicts(...))")
        for n in sorted(self.owned):
            self.mstate[n].load_state_dict(sd["projected"][n], self.config.proj_group_size)
        self._load_dense_and_groups(sd)
        if "shard" in sd and sd["shard"].get("world_size") == self.world_size and \
                sd["shard"].get("comm_mode") != self.comm_mode:
            warnings.warn(f"optimizer state was saved in comm_mode={sd['shard'].get('comm_mode')!r}, resuming in "
                          f"{self.comm_mode!r}: the math is the same, only the traffic changes", RuntimeWarning,
                          stacklevel=3)
