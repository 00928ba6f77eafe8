"""Per-matrix Q-GaLore AdamW: one matrix's weight, gradient and state in, one step out — no collectives.

The step is written as phases so a distributed engine can communicate between them (docs/design.md §2):

    refresh (owner, needs the full gradient) -> project -> [reduce R] -> normalise (owner: moments)
    -> [broadcast N] -> apply_rows (any rank holding rows of the weight, with their global row offset)

Update rule, exactly galore-torch's GaLoreAdamW (the test oracle), with ``t`` the step count after increment:

    R = project(G);  m = β1 m + (1-β1) R;  v = β2 v + (1-β2) R²;  N = m / (√v + ε)
    W ← W − lr·√(1-β2ᵗ)/(1-β1ᵗ) · scale · project_back(N);   W ← W − lr·wd·W;   W ← SR-quantise(W)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import QGaLoreConfig
from ..projection.gate import RefreshGate, RefreshRecord
from ..projection.projector import (
    Side,
    apply_rotation,
    basis_shape,
    compute_basis,
    lowrank_shape,
    project,
    project_back,
    projection_side,
    rotation,
    subspace_similarity,
)
from ..projection.random_proj import RANDOM_PROJECTIONS, RandomBasis
from ..projection.vlorp import check_rank_fits, covering_rows, from_granular, granular_shape, to_granular
from ..quant.fused import fused_adam_moments_, fused_update_requantize_
from ..quant.groups import num_groups
from ..quant.int4 import Int4Matrix
from ..quant.int8 import Int8Weight
from ..quant.rng import SALT_RSVD, SALT_UPDATE, stream_key
from ..quant.state8 import Blockwise8bit


def cut_rows(x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows ``[start, start + rows)`` of ``x`` (``x`` itself when that is all of it)."""
    return x if start == 0 and x.shape[0] == rows else x[start:start + rows]


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    """The rank a matrix can take: ``min(rank, m, n)``."""
    return min(rank, shape[0], shape[1])


@dataclass
class MatrixState:
    """Everything one projected matrix carries besides its weight.

    basis: fp32 Q [r, n'] / P [m', r] in reference mode, :class:`Int4Matrix` when quantised, a
    :class:`RandomBasis` (regenerated, never stored) for random projections, None before the first refresh —
    ``(m', n') = proj_shape``, the VLoRP-reshaped gradient shape (= (m, n) at granularity 1).
    exp_avg / exp_avg_sq: low-rank shaped (``lowrank_shape(*proj_shape, rank, side)``), 8-bit or fp32.
    """

    name: str
    shape: tuple[int, int]
    side: Side
    rank: int
    gate: RefreshGate
    exp_avg: Blockwise8bit
    exp_avg_sq: Blockwise8bit
    basis: torch.Tensor | Int4Matrix | None = None
    step: int = 0
    refresh_offset: int = 0
    history: list[RefreshRecord] = field(default_factory=list)
    granularity: float = 1.0
    rule_name: str = "adamw"  # which rule's state this is (optim/rules.py): checkpoints of another are refused
    refresh_skipped: bool = False  # the last due refresh met a non-finite gradient: basis kept, moments not moved

    @property
    def proj_shape(self) -> tuple[int, int]:
        """Shape of the gradient as projected: (m·c, n/c) right, (m/c, n·c) left (:mod:`..projection.vlorp`)."""
        return granular_shape(*self.shape, self.side, self.granularity, self.name)

    @property
    def device(self) -> torch.device:
        return (self.exp_avg.codes if self.exp_avg.quantized else self.exp_avg.data).device

    def basis_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError(f"{self.name}: no projection basis yet (refresh first)")
        if isinstance(self.basis, (Int4Matrix, RandomBasis)):
            return self.basis.dequantize(dtype)
        return self.basis.to(dtype)

    def state_bytes(self) -> dict[str, int]:
        basis = 0
        if isinstance(self.basis, (Int4Matrix, RandomBasis)):
            basis = self.basis.nbytes()
        elif self.basis is not None:
            basis = self.basis.numel() * self.basis.element_size()
        # None: not held here (a replica or a shard without this state), or ProjFactor's factored second moment
        moments = sum(t.nbytes() for t in (self.exp_avg, self.exp_avg_sq) if t is not None)
        return {"projector": basis, "moments": moments}

    # --- checkpointing: tensors and plain values, keyed by field -------------------------------------------
    def state_dict(self) -> dict:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.exp_avg.state_tensors().items():
            tensors[f"exp_avg.{k}"] = v
        for k, v in ({} if self.exp_avg_sq is None else self.exp_avg_sq.state_tensors()).items():
            tensors[f"exp_avg_sq.{k}"] = v
        if isinstance(self.basis, Int4Matrix):
            tensors["basis.packed"] = self.basis.packed
            tensors["basis.scales"] = self.basis.scales
        elif self.basis is not None and not isinstance(self.basis, RandomBasis):
            tensors["basis"] = self.basis
        meta = {"step": self.step, "gate": self.gate.state_dict(), "shape": list(self.shape), "rank": self.rank,
                "side": self.side, "refresh_offset": self.refresh_offset, "granularity": self.granularity,
                "optimizer": self.rule_name}
        if isinstance(self.basis, RandomBasis):
            meta["random_basis"] = self.basis.meta()  # three integers instead of the matrix
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, d: dict, proj_group_size: int) -> None:
        meta, tensors = d["meta"], d["tensors"]
        saved = meta.get("optimizer", "adamw")  # checkpoints written before the tag: low-rank AdamW's
        if saved != self.rule_name:
            raise ValueError(f"{self.name}: checkpoint holds {saved} state, this run uses {self.rule_name}")
        if tuple(meta["shape"]) != self.shape or meta["rank"] != self.rank or meta["side"] != self.side:
            raise ValueError(f"{self.name}: checkpoint holds shape {tuple(meta['shape'])} rank {meta['rank']} "
                             f"side {meta['side']}, this run has {self.shape} rank {self.rank} side {self.side}")
        if float(meta.get("granularity", 1.0)) != self.granularity:
            raise ValueError(f"{self.name}: checkpoint was written at granularity {meta.get('granularity', 1.0)}, "
                             f"this run uses {self.granularity}")
        self.step = int(meta["step"])
        self.refresh_offset = int(meta.get("refresh_offset", 0))
        self.gate.load_state_dict(meta["gate"])
        self.exp_avg.load_state_tensors({k[len("exp_avg."):]: v for k, v in tensors.items()
                                         if k.startswith("exp_avg.")})
        if self.exp_avg_sq is not None:
            self.exp_avg_sq.load_state_tensors({k[len("exp_avg_sq."):]: v for k, v in tensors.items()
                                                if k.startswith("exp_avg_sq.")})
        if "random_basis" in meta:
            self.basis = RandomBasis.from_meta(meta["random_basis"], self.name,
                                               basis_shape(*self.proj_shape, self.rank, self.side), self.rank,
                                               self.device)
        elif "basis.packed" in tensors:
            shape = basis_shape(*self.proj_shape, self.rank, self.side)
            self.basis = Int4Matrix(tensors["basis.packed"].clone(), tensors["basis.scales"].clone(), shape,
                                    proj_group_size)
        elif "basis" in tensors:
            self.basis = tensors["basis"].clone()


class LowRankAdamW:
    """The per-matrix rule. Holds only the config; all per-matrix data lives in :class:`MatrixState`."""

    def __init__(self, config: QGaLoreConfig):
        self.config = config

    # --- state ---------------------------------------------------------------------------------------------
    def init_state(self, name: str, shape: tuple[int, int], device: torch.device | str = "cpu",
                   refresh_offset: int = 0, dtype: torch.dtype = torch.float32,
                   granularity: float | None = None) -> MatrixState:
        """Fresh state for a [m, n] matrix. ``refresh_offset`` staggers this matrix's refreshes after step 0;
        ``dtype`` is the float type of unquantised moments (fp64 only for fp64 parity runs); ``granularity``
        overrides ``config.granularity`` for this matrix (the driver passes 1 for fallback matrices)."""
        m, n, side, rank, gran, lr_shape = self._layout(name, shape, granularity)
        fdt = torch.float64 if dtype == torch.float64 else torch.float32
        return MatrixState(name, (m, n), side, rank, self._new_gate(), self._moment(lr_shape, True, device, fdt),
                           self._moment(lr_shape, False, device, fdt), refresh_offset=refresh_offset,
                           granularity=gran)

    def _layout(self, name: str, shape: tuple[int, ...], granularity: float | None
                ) -> tuple[int, int, Side, int, float, tuple[int, int]]:
        """(m, n, side, rank, granularity, low-rank shape) of a matrix; a clear error when it cannot take ``c``."""
        if len(shape) != 2:
            raise ValueError(f"{name}: low-rank projection needs a 2-D weight, got shape {tuple(shape)}")
        c = self.config
        m, n = int(shape[0]), int(shape[1])
        side = projection_side(m, n, c.proj_type)
        gran = float(c.granularity if granularity is None else granularity)
        if gran == 1.0:
            rank = effective_rank((m, n), c.rank)  # GaLore: clamp to min(m, n) (the driver warns)
            pshape = (m, n)
        else:
            rank = c.rank
            pshape = check_rank_fits(m, n, side, gran, rank, name)
        return m, n, side, rank, gran, lowrank_shape(*pshape, rank, side)

    def _moment(self, shape: tuple[int, ...], signed: bool, device: torch.device | str,
                fdt: torch.dtype) -> Blockwise8bit:
        c = self.config
        return Blockwise8bit(shape, signed, c.state_block_size, c.state_min_numel, device,
                             bits=c.state_bits if c.quantize else 32, float_dtype=fdt)

    def _new_gate(self) -> RefreshGate:
        c = self.config
        # random projections: a fixed gap — two independent draws are dissimilar whatever the gradient does
        return RefreshGate(interval=c.update_proj_gap, threshold=c.similarity_threshold, queue_size=c.queue_size,
                           gamma=c.gamma_proj, max_interval=c.max_proj_gap,
                           adaptive=c.gate and c.projection not in RANDOM_PROJECTIONS)

    # --- phase 0: refresh (owner only) ---------------------------------------------------------------------
    def needs_refresh(self, st: MatrixState) -> bool:
        return st.basis is None or st.gate.due(st.step)

    def refresh(self, st: MatrixState, grad: torch.Tensor | None) -> float | None:
        """Recompute the basis from the full gradient [m, n]; update the gate; optionally rotate moments.

        Returns the similarity to the previous basis (None on the first refresh, and always for random
        projections, which need no gradient: see :meth:`_resample`).
        """
        c = self.config
        if c.projection in RANDOM_PROJECTIONS:
            return self._resample(st, grad)
        grad = to_granular(grad, st.proj_shape)
        st.refresh_skipped = not bool(torch.isfinite(grad).all())
        if st.refresh_skipped:
            # a non-finite gradient (an overflow in backward): its projection, hence the step's global norm, is
            # non-finite, so the step is skipped; the basis, moments and gate stay as they are and the refresh stays
            # due (``refresh_skipped`` tells a placement's replicas not to rotate their moment rows either). A first
            # refresh still needs a basis to project with: a zero one, stored as every basis is (0 · NaN is NaN)
            if st.basis is None:
                st.basis = self._stored_basis(torch.zeros(basis_shape(*st.proj_shape, st.rank, st.side),
                                                          dtype=torch.float32, device=grad.device))
            return None
        gen = None
        if c.projection == "rsvd":
            gen = torch.Generator(device="cpu")
            k1, k2 = stream_key(c.seed, st.step, st.name, SALT_RSVD)
            gen.manual_seed((k1 << 32) | k2)
        new = compute_basis(grad, st.rank, st.side, c.projection, generator=gen, oversample=c.rsvd_oversample,
                            niter=c.rsvd_niter)
        similarity = old = None
        if st.basis is not None:
            old = st.basis_float(new.dtype)
            similarity = subspace_similarity(old, new, st.side, c.similarity)
        st.basis = self._stored_basis(new)
        if old is not None:
            # into the basis as stored (INT4-rounded): what every projection uses from now on, and what a rank
            # that only receives the stored basis can rotate its own moment rows with, identically
            self.carry_moments(st, old, st.basis_float(new.dtype))
        first = st.gate.count == 0
        st.gate.record(st.step, similarity, offset=st.refresh_offset if first else 0)
        st.history.append(RefreshRecord(st.step, st.name, similarity, st.gate.interval))
        return similarity

    def _stored_basis(self, new: torch.Tensor) -> torch.Tensor | Int4Matrix:
        """A computed basis as the state keeps it: INT4 (Q-GaLore) or as computed (the float reference mode)."""
        c = self.config
        return Int4Matrix.quantize(new, c.proj_group_size) if c.quantize and c.proj_bits == 4 else new

    def _resample(self, st: MatrixState, grad: torch.Tensor | None) -> None:
        """Random projection: draw the basis keyed by (seed, this step, name) — a pure function of the step, so
        every micro-batch of a window, every rank and a resumed run see the same draw. The gate stays at a fixed
        gap and no similarity is computed (independent draws overlap by about r/n' whatever the gradient does).

        Moment rotation uses the same ``T`` as for SVD bases (``Q_old Q_newᵀ`` right, ``P_newᵀ P_old`` left): it
        re-projects the back-projected old moment ``M_old Q_old`` exactly as a gradient is projected, so carried
        moments and new gradients share coordinates and scale; with ``E[Q_newᵀ Q_new] = I`` the back-projection
        of the carried moment is unbiased for ``M_old Q_old``. (The least-squares ``M_old Q_old pinv(Q_new)`` is
        ≈ r/n' times smaller, because ``Q_new Q_newᵀ ≈ (n'/r)·I`` for a random basis: it would mix two scales.)
        """
        c = self.config
        device = grad.device if grad is not None else st.device
        new = RandomBasis(c.projection, c.seed, st.step, st.name, basis_shape(*st.proj_shape, st.rank, st.side),
                          st.rank, str(device))
        old = st.basis_float() if st.basis is not None else None
        st.basis = new
        if old is not None:
            self.carry_moments(st, old, new.dequantize())
        first = st.gate.count == 0
        st.gate.record(st.step, None, offset=st.refresh_offset if first else 0)
        st.history.append(RefreshRecord(st.step, st.name, None, st.gate.interval))
        return None

    def _rotates_moments(self) -> bool:
        return self.config.moments_on_refresh == "rotate"

    def carry_moments(self, st: MatrixState, old: torch.Tensor, new: torch.Tensor) -> None:
        """After a refresh from basis ``old`` to ``new`` (float): rotate the moments this state holds into the new
        basis, if the config says so. Works on any rows of a right-projected matrix's moments (the rotation acts
        on each row alone), so a row shard rotates its own; a state without moments here does nothing."""
        if st.exp_avg is not None and self._rotates_moments():
            self._rotate_moments(st, old, new)

    def _rotate_moments(self, st: MatrixState, old: torch.Tensor, new: torch.Tensor) -> None:
        """Carry the first moment into the new basis (Flora); the second moment must stay non-negative, so it is
        kept, reset, or rotated with the element-wise square of T."""
        # in the moments' own precision (fp64 in parity runs): an fp32 rotation would round differently for a
        # shard's rows than for the whole matrix's
        dt = torch.float32 if st.exp_avg.quantized else st.exp_avg.data.dtype
        t = rotation(old.to(dt), new.to(dt), st.side)
        st.exp_avg.from_float(apply_rotation(st.exp_avg.to_float(dt), t, st.side))
        mode = self.config.second_moment_on_rotate
        if mode == "reset":
            st.exp_avg_sq.from_float(torch.zeros(st.exp_avg_sq.shape, dtype=dt))
        elif mode == "square":
            st.exp_avg_sq.from_float(apply_rotation(st.exp_avg_sq.to_float(dt), t * t, st.side))

    # --- phase 1: project (any rank holding the basis) -----------------------------------------------------
    def project(self, st: MatrixState, grad: torch.Tensor) -> torch.Tensor:
        """[m, n] gradient -> low-rank gradient R (same dtype as grad) of the VLoRP-reshaped gradient: right
        [m·c, r], left [r, n·c] (= :func:`lowrank_shape` at c = 1)."""
        return project(to_granular(grad, st.proj_shape),
                       st.basis_float(grad.dtype if grad.dtype == torch.float64 else torch.float32), st.side)

    def project_rows(self, st: MatrixState, grad_rows: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        """Low-rank gradient of a row shard: weight rows ``[row_offset, row_offset + k)`` of the gradient
        (``grad_rows`` [k, n]; the other rows taken as zero).

        Right projection: the reshaped rows covering the shard (:func:`~..projection.vlorp.covering_rows`),
        [g_rows, r] — complete where the shard holds the whole reshaped row, a *partial* sum where a shard boundary
        cuts a merged one (granularity c < 1). Left projection: the shard's partial ``P[rows]ᵀ G'[rows]`` [r, n·c].
        Partial results of a partition of the rows add up to :meth:`project` of the whole matrix, which this
        equals (same kernel, same operands) for the whole matrix.
        """
        m, n_cols = st.shape
        rows = grad_rows.shape[0]
        g_off, g_rows, w_off, w_rows = covering_rows(row_offset, rows, m, st.proj_shape[0])
        if w_rows != rows:  # a cut merged row: the neighbours' part of it is zero here
            padded = grad_rows.new_zeros(w_rows, n_cols)
            padded[row_offset - w_off:row_offset - w_off + rows] = grad_rows
            grad_rows = padded
        # always to the reshaped width: an empty shard is [0, n] and must become [0, n'] (a c != 1 no-op otherwise)
        block = grad_rows.reshape(g_rows, st.proj_shape[1])
        dtype = grad_rows.dtype if grad_rows.dtype == torch.float64 else torch.float32
        if st.side == "right":
            return project(block, st.basis_float(dtype), "right")
        if isinstance(st.basis, RandomBasis):
            basis = st.basis.rows(g_off, g_rows, dtype)
        else:
            basis = st.basis_float(dtype)
            basis = basis if g_rows == basis.shape[0] else basis[g_off:g_off + g_rows]
        return project(block, basis, "left")

    # --- the basis as it crosses ranks (an owner refreshes it, the other ranks receive it) -------------------
    def basis_kind(self) -> str:
        """``random`` (regenerated from its draw step: nothing travels), ``int4`` (codes + scales) or ``float``."""
        c = self.config
        if c.projection in RANDOM_PROJECTIONS:
            return "random"
        return "int4" if c.quantize and c.proj_bits == 4 else "float"

    def basis_tensors(self, st: MatrixState) -> list[torch.Tensor]:
        """The owner's stored basis as it is sent (a float basis keeps its strides: LAPACK returns column-major
        factors, and the matmul kernel — so the rounding — depends on the layout)."""
        return [st.basis.packed, st.basis.scales] if self.basis_kind() == "int4" else [st.basis]

    def basis_buffers(self, st: MatrixState, device, strides: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Receive buffers for :meth:`basis_tensors` (``strides``: the owner's, for a float basis)."""
        rows, cols = basis_shape(*st.proj_shape, st.rank, st.side)
        if self.basis_kind() == "int4":
            return [torch.empty((rows * cols + 1) // 2, dtype=torch.uint8, device=device),
                    torch.empty(rows, num_groups(cols, min(self.config.proj_group_size, cols)),
                                dtype=torch.float32, device=device)]
        return [torch.empty_strided((rows, cols), strides or (cols, 1), dtype=torch.float32, device=device)]

    def basis_from_tensors(self, st: MatrixState, tensors: list[torch.Tensor], draw_step: int, device) -> None:
        """Install a received basis (a random one is drawn again from ``draw_step``)."""
        shape = basis_shape(*st.proj_shape, st.rank, st.side)
        kind = self.basis_kind()
        if kind == "int4":
            st.basis = Int4Matrix(*tensors, shape, self.config.proj_group_size)
        elif kind == "float":
            st.basis = tensors[0]
        else:
            st.basis = RandomBasis(self.config.projection, self.config.seed, draw_step, st.name, shape, st.rank,
                                   str(device))

    # --- the update as it crosses ranks (an owner broadcasts it, replicas and shards apply it) ---------------
    def update_tensors(self, update: torch.Tensor) -> list[torch.Tensor]:
        """What :meth:`normalise` returned, as the tensors a placement sends: ``[N]``."""
        return [update]

    def update_buffers(self, st: MatrixState, lowrank: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """Receive buffers for :meth:`update_tensors` of this matrix; ``lowrank`` is a spent tensor of N's shape
        and dtype (re-used) or a shape template."""
        return [lowrank]

    def update_from_tensors(self, st: MatrixState, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The inverse of :meth:`update_tensors` (the low-rank part cast to the compute ``dtype``)."""
        return tensors[0].to(dtype)

    def lowrank_part(self, update: torch.Tensor) -> torch.Tensor:
        """The low-rank-shaped tensor of an update (right projection: one row per reshaped row)."""
        return update

    def with_lowrank_part(self, update: torch.Tensor, lowrank: torch.Tensor) -> torch.Tensor:
        return lowrank

    # --- what a row shard must add up across ranks before normalise (none for low-rank AdamW) ----------------
    def shard_sums(self, st: MatrixState, cover: torch.Tensor, row_offset: int, rows: int,
                   cover_offset: int) -> tuple[object, list[torch.Tensor]]:
        """For a row-sharded right-projected matrix: ``(local, additive)``, where ``additive`` are tensors each
        rank computes over its rows and a placement sums over ranks (all-reduce) before ``normalise(...,
        sums=(local, summed))``. ``cover`` is the complete low-rank gradient of the reshaped rows covering the
        shard, starting at reshaped row ``cover_offset``. Low-rank AdamW is row-local: nothing."""
        return None, []

    # --- phase 2: moments (owner) ---------------------------------------------------------------------------
    def normalise(self, st: MatrixState, lowrank_grad: torch.Tensor, lr: float,
                  sums: tuple | None = None) -> tuple[torch.Tensor, float]:
        """Adam moments in the low-rank space. Returns (N = m / (√v + ε), step_size) and advances ``st.step``.
        ``lowrank_grad`` may be any rows of a right-projected matrix's R (those whose moments ``st`` holds);
        ``sums`` (from :meth:`shard_sums`) is unused: Adam is element-wise."""
        c = self.config
        b1, b2 = c.betas
        dtype = lowrank_grad.dtype if lowrank_grad.dtype == torch.float64 else torch.float32
        r = lowrank_grad.to(dtype)
        if (c.fused and dtype == torch.float32 and st.exp_avg.quantized and st.exp_avg_sq.quantized
                and len(st.exp_avg.shape) == 2 and r.numel() > 0):  # a row shard may hold no rows
            # one compiled pass: decode, update, N, re-encode (quant/fused.py; eager below up to fp32 rounding)
            n = fused_adam_moments_(st.exp_avg, st.exp_avg_sq, r, b1, b2, c.eps)
            st.step += 1
            return n, lr * math.sqrt(1.0 - b2 ** st.step) / (1.0 - b1 ** st.step)
        m = st.exp_avg.to_float(dtype).mul_(b1).add_(r, alpha=1.0 - b1)
        v = st.exp_avg_sq.to_float(dtype).mul_(b2).addcmul_(r, r, value=1.0 - b2)
        st.step += 1
        n = m / (v.sqrt() + c.eps)
        st.exp_avg.from_float(m)
        st.exp_avg_sq.from_float(v)
        step_size = lr * math.sqrt(1.0 - b2 ** st.step) / (1.0 - b1 ** st.step)
        return n, step_size

    # --- phase 3: apply to rows (any rank holding rows of the weight) ---------------------------------------
    def update_of_rows(self, st: MatrixState, n: torch.Tensor, dtype: torch.dtype, row_offset: int, rows: int,
                       basis_rows: torch.Tensor | None = None, n_offset: int | None = None) -> torch.Tensor:
        """``scale · project_back(N)`` for rows ``[row_offset, row_offset + rows)``: [rows, n_cols] in ``dtype``.

        With granularity c the reshaped rows covering these weight rows (:func:`covering_rows`) are back-projected
        and reshaped to weight rows; a shard whose boundary cuts a merged reshaped row takes its part of it.
        ``basis_rows``: left projection, those reshaped rows of P (default: sliced from the whole P); right
        projection, the whole float Q (a caller updating one matrix block by block passes it so Q is dequantised
        once, not once per block). ``n_offset`` (right projection): the reshaped row of N's row 0 when N holds
        only some rows (a row shard passes the rows covering it; default: N is whole).
        """
        g_off, g_rows, w_off, w_rows = covering_rows(row_offset, rows, st.shape[0], st.proj_shape[0])
        if st.side == "left" and basis_rows is None and isinstance(st.basis, RandomBasis):
            basis_rows = st.basis.rows(g_off, g_rows, dtype)  # draw only these rows of P
        if st.side == "left" and basis_rows is not None:
            out = project_back(n.to(dtype), basis_rows.to(dtype), st.side, self.config.scale, 0, g_rows)
        else:
            basis = st.basis_float(dtype) if basis_rows is None else basis_rows.to(dtype)
            off = g_off - (n_offset or 0) if st.side == "right" else g_off
            out = project_back(n.to(dtype), basis, st.side, self.config.scale, off, g_rows)
        return cut_rows(from_granular(out, w_rows, st.shape[1]), row_offset - w_off, rows)

    def update_rows(self, st: MatrixState, w_rows: torch.Tensor, n: torch.Tensor, step_size: float, lr: float,
                    row_offset: int = 0, basis_rows: torch.Tensor | None = None,
                    n_offset: int | None = None) -> torch.Tensor:
        """New float value of weight rows ``[row_offset, row_offset + rows)``.

        w_rows: [rows, n_cols] float. n: the whole low-rank N (right: [m, r]; left: [r, n]). basis_rows: for left
        projection, the shard's rows of P (defaults to the whole P sliced at ``row_offset``).
        """
        update = self.update_of_rows(st, n, w_rows.dtype, row_offset, w_rows.shape[0], basis_rows, n_offset)
        w = w_rows.add(update, alpha=-step_size)
        if self.config.weight_decay > 0:
            w.add_(w, alpha=-lr * self.config.weight_decay)
        return w

    def apply_rows(self, st: MatrixState, weight: Int8Weight | torch.Tensor, n: torch.Tensor, step_size: float,
                   lr: float, row_offset: int = 0, basis_rows: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None, n_offset: int | None = None) -> None:
        """Update weight rows in place: a float tensor (reference mode) or an :class:`Int8Weight` (re-quantised
        with stochastic rounding keyed by (seed, step, name, global index), so shards and replicas agree).
        ``compute_dtype`` defaults to fp64 for an fp64 N (parity runs), else fp32."""
        if compute_dtype is None:
            compute_dtype = torch.float64 if n.dtype == torch.float64 else torch.float32
        if isinstance(weight, Int8Weight):
            c = self.config
            key = stream_key(c.seed, st.step, st.name, SALT_UPDATE) if c.stochastic_round else None
            if c.fused and key is not None and compute_dtype == torch.float32:
                update = self.update_of_rows(st, n, torch.float32, row_offset, weight.codes.shape[0], basis_rows,
                                             n_offset)
                fused_update_requantize_(weight.codes, weight.scales, update, step_size, -lr * c.weight_decay, key,
                                         row_offset, weight.group_size)
                return
            w = self.update_rows(st, weight.dequantize(compute_dtype), n, step_size, lr, row_offset, basis_rows,
                                 n_offset)
            weight.requantize_(w, key, row_offset)
        else:
            w = self.update_rows(st, weight.data, n, step_size, lr, row_offset, basis_rows, n_offset)
            weight.data.copy_(w)

    # --- all phases on one device ---------------------------------------------------------------------------
    def step(self, st: MatrixState, weight: Int8Weight | torch.Tensor, grad: torch.Tensor, lr: float,
             refresh_grad: torch.Tensor | None = None) -> None:
        """Single-device step. ``refresh_grad`` (default ``grad``) is the full gradient a due refresh uses."""
        if self.needs_refresh(st):
            self.refresh(st, grad if refresh_grad is None else refresh_grad)
        n, step_size = self.normalise(st, self.project(st, grad), lr)
        self.apply_rows(st, weight, n, step_size, lr)

    def step_lowrank(self, st: MatrixState, weight: Int8Weight | torch.Tensor, lowrank_grad: torch.Tensor,
                     lr: float) -> None:
        """Step from an already projected (e.g. accumulated) low-rank gradient."""
        n, step_size = self.normalise(st, lowrank_grad, lr)
        self.apply_rows(st, weight, n, step_size, lr)
