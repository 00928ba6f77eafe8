"""ProjFactor (VLoRP's optimizer), per matrix: first moment in the projected space, second moment factored.

For one [m, n] matrix with (VLoRP-reshaped) projection and ``t`` the step count after increment:

    R = project(G)                           low-rank gradient (right [m·c, r], left [r, n·c])
    Ĝ = project_back(R)                      back-projected gradient [m, n] (no ``scale``)
    M = β1 M + (1-β1) R                      first moment, projected space: max(m, n)·c·r numbers
    a = β2 a + (1-β2) mean_j Ĝ²[:, j]        row factor [m]      } Adafactor factors of Ĝ²: m + n numbers
    b = β2 b + (1-β2) mean_i Ĝ²[i, :]        column factor [n]   }
    V̂ = a bᵀ / mean(a)                       rank-1 estimate of the EMA of Ĝ² (never stored)
    W ← W − lr·√(1-β2ᵗ)/(1-β1ᵗ) · scale · project_back(M) / (√V̂ + ε);  W ← W − lr·wd·W;  W ← SR-quantise(W)

β2 is fixed (not Adafactor's step-dependent decay); both factors are EMAs with the same β2, so ``a bᵀ/mean(a)``
carries one factor ``1-β2ᵗ``, corrected with the same step size as low-rank AdamW (ε added outside the
correction, as galore-torch does). Because the second moment lives in the *full* space, a new basis leaves it
valid as is; only the first moment is carried into the new basis (``projfactor_momentum_transfer``, default on —
see :meth:`LowRankAdamW._resample` for the rotation with non-orthonormal random bases). Gradient accumulation
accumulates R (the projection is linear, so ``project_back(ΣR) = Σ project_back(R)`` and the factors see the
accumulated gradient exactly as a large batch would).

Phases (for placements; no collectives here), same names as :class:`LowRankAdamW`:

* whole matrix at one rank (single device; the owner of a replicated or left-projected matrix): refresh ->
  project -> [reduce R to the owner] -> normalise (computes the factor sums from R) -> [broadcast
  ProjFactorUpdate: M + a + b] -> apply_rows (rows with their global offset);
* right-projected row shard (FSDP2, ZeRO-3): project_rows -> [complete the cut reshaped rows] ->
  :meth:`ProjFactor.shard_sums` (this shard's rows' Σ_j Ĝ², complete, kept locally; a *partial* Σ_i Ĝ² over its
  rows and Σ of its rows' new row factor, both row-additive) -> [all-reduce the additive sums] ->
  normalise(sums=...) on the shard's rows (row factor rows, first-moment rows; the column factor replicated) ->
  apply_rows with the global mean of the row factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..projection.projector import apply_rotation, project_back, rotation
from ..projection.random_proj import RandomBasis
from ..projection.vlorp import covering_rows, from_granular
from .lowrank_adamw import LowRankAdamW, MatrixState, cut_rows


def projfactor_numel(m: int, n: int, rank: int, granularity: float = 1.0) -> int:
    """ProjFactor state numbers of an [m, n] matrix: ``max(m, n)·M + m + n`` with budget ``M = c·r``
    (an accumulator for gradient accumulation adds another ``max(m, n)·M``)."""
    return int(max(m, n) * granularity * rank) + m + n


@dataclass
class ProjFactorState(MatrixState):
    """:class:`MatrixState` with the second moment factored: ``exp_avg_sq`` is None; ``row_factor`` [m] and
    ``col_factor`` [n] (fp32, fp64 in fp64 parity runs) hold the EMAs of the row / column means of Ĝ²."""

    row_factor: torch.Tensor | None = None
    col_factor: torch.Tensor | None = None
    rule_name: str = "projfactor"

    def state_numel(self) -> dict[str, int]:
        """Numbers held per matrix: first moment (projected shape), factors (m + n), and the accumulator the
        driver keeps under gradient accumulation (a projected gradient, same size as the first moment)."""
        lowrank = math.prod(self.exp_avg.shape)
        return {"first_moment": lowrank, "factors": self.row_factor.numel() + self.col_factor.numel(),
                "accumulator": lowrank}

    def state_bytes(self) -> dict[str, int]:
        out = super().state_bytes()  # projector + exp_avg (exp_avg_sq is None)
        factors = sum(t.numel() * t.element_size() for t in (self.row_factor, self.col_factor) if t is not None)
        out["first_moment"] = 0 if self.exp_avg is None else self.exp_avg.nbytes()
        out["factors"] = factors
        out["moments"] += factors
        return out

    def state_dict(self) -> dict:
        d = super().state_dict()
        d["tensors"]["row_factor"] = self.row_factor
        d["tensors"]["col_factor"] = self.col_factor
        return d

    def load_state_dict(self, d: dict, proj_group_size: int) -> None:
        super().load_state_dict(d, proj_group_size)  # checks the rule first
        self.row_factor.copy_(d["tensors"]["row_factor"])
        self.col_factor.copy_(d["tensors"]["col_factor"])


@dataclass
class ProjFactorUpdate:
    """What ``normalise`` hands to ``apply_rows`` (and an engine broadcasts): max(m, n)·M + m + n numbers.

    exp_avg: the low-rank first moment M (projected shape); row_factor [m]; col_factor [n] — after this step's
    update, not bias-corrected (the step size carries the correction). A row shard's update holds only its rows of
    the row factor (from weight row ``row_offset``) and the global ``row_mean`` of it; a whole one has
    ``row_offset = 0`` and ``row_mean = None`` (the mean is taken over ``row_factor``).
    """

    exp_avg: torch.Tensor
    row_factor: torch.Tensor
    col_factor: torch.Tensor
    row_offset: int = 0
    row_mean: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.exp_avg.dtype


class ProjFactor(LowRankAdamW):
    """The per-matrix ProjFactor rule. Shares refresh / project / apply_rows (and so SVD, randomized SVD and
    random projections, VLoRP granularity, INT8 weights with stochastic rounding, the fused re-quantisation) with
    :class:`LowRankAdamW`; replaces the moments (``normalise``) and the per-row update (``update_of_rows``)."""

    # --- state ---------------------------------------------------------------------------------------------
    def init_state(self, name: str, shape: tuple[int, int], device: torch.device | str = "cpu",
                   refresh_offset: int = 0, dtype: torch.dtype = torch.float32,
                   granularity: float | None = None) -> ProjFactorState:
        m, n, side, rank, gran, lr_shape = self._layout(name, shape, granularity)
        fdt = torch.float64 if dtype == torch.float64 else torch.float32
        return ProjFactorState(name, (m, n), side, rank, self._new_gate(), self._moment(lr_shape, True, device, fdt),
                               None, refresh_offset=refresh_offset, granularity=gran,
                               row_factor=torch.zeros(m, dtype=fdt, device=device),
                               col_factor=torch.zeros(n, dtype=fdt, device=device))

    # --- phase 0: refresh — only the first moment lives in the basis' coordinates --------------------------
    def _rotates_moments(self) -> bool:
        return self.config.projfactor_momentum_transfer

    def _rotate_moments(self, st: ProjFactorState, old: torch.Tensor, new: torch.Tensor) -> None:
        """Carry M into the new basis with ``T`` (:func:`..projection.projector.rotation`); the factors describe
        the back-projected gradient in the full space and need no change."""
        dtype = st.col_factor.dtype
        t = rotation(old.to(dtype), new.to(dtype), st.side)
        st.exp_avg.from_float(apply_rotation(st.exp_avg.to_float(dtype), t, st.side))

    # --- back-projection of whole rows, unscaled --------------------------------------------------------------
    def back_rows(self, st: MatrixState, lowrank: torch.Tensor, dtype: torch.dtype, row_offset: int = 0,
                  rows: int | None = None, basis_rows: torch.Tensor | None = None,
                  n_offset: int | None = None) -> torch.Tensor:
        """Rows ``[row_offset, row_offset + rows)`` of ``project_back(lowrank)`` in the weight's shape: [rows, n]
        in ``dtype``, without ``scale``. ``basis_rows`` and ``n_offset`` as for
        :meth:`LowRankAdamW.update_of_rows` (a row shard's covering rows of P, or of the low-rank tensor)."""
        rows = st.shape[0] - row_offset if rows is None else rows
        g_off, g_rows, w_off, w_rows = covering_rows(row_offset, rows, st.shape[0], st.proj_shape[0])
        if st.side == "left" and basis_rows is None and isinstance(st.basis, RandomBasis):
            basis_rows = st.basis.rows(g_off, g_rows, dtype)
        if st.side == "left" and basis_rows is not None:
            out = project_back(lowrank.to(dtype), basis_rows.to(dtype), st.side, 1.0, 0, g_rows)
        else:
            off = g_off - (n_offset or 0) if st.side == "right" else g_off
            out = project_back(lowrank.to(dtype), st.basis_float(dtype), st.side, 1.0, off, g_rows)
        return cut_rows(from_granular(out, w_rows, st.shape[1]), row_offset - w_off, rows)

    # --- phase 2a: factor sums (any rank holding rows) ---------------------------------------------------------
    def factor_sums(self, st: MatrixState, lowrank_grad: torch.Tensor, row_offset: int = 0,
                    rows: int | None = None, basis_rows: torch.Tensor | None = None,
                    n_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_j Ĝ²[i, j] for the rows [rows], Σ_{i in rows} Ĝ²[i, j] [n]) of the back-projected gradient.

        The row sums are complete for these rows; the column sums are these rows' *partial* sums.
        """
        dtype = torch.float64 if lowrank_grad.dtype == torch.float64 else torch.float32
        g2 = self.back_rows(st, lowrank_grad, dtype, row_offset, rows, basis_rows, n_offset).square_()
        return g2.sum(dim=1), g2.sum(dim=0)

    def shard_sums(self, st: ProjFactorState, cover: torch.Tensor, row_offset: int, rows: int,
                   cover_offset: int) -> tuple[object, list[torch.Tensor]]:
        """A right-projected row shard's part of the factor statistics (see :meth:`LowRankAdamW.shard_sums`):
        local — (its rows' Σ_j Ĝ² [rows], ``row_offset``); additive — [its partial column sums Σ_i Ĝ² [n], Σ of
        its rows' updated row factor [1]] (the global mean of the row factor is that sum over ranks ÷ m)."""
        row_sq, col_sq = self.factor_sums(st, cover, row_offset, rows, n_offset=cover_offset)
        b2 = self.config.betas[1]
        a = st.row_factor.to(row_sq.dtype).mul(b2).add_(row_sq, alpha=(1.0 - b2) / st.shape[1])
        return (row_sq, row_offset), [col_sq, a.sum().reshape(1)]

    # --- phase 2b: moments (owner) ----------------------------------------------------------------------------
    def normalise(self, st: ProjFactorState, lowrank_grad: torch.Tensor, lr: float,
                  sums: tuple | None = None) -> tuple[ProjFactorUpdate, float]:
        """Update M and the factors; returns (:class:`ProjFactorUpdate`, step_size) and advances ``st.step``.

        Whole matrix (``sums`` None): the factor sums are computed here from ``lowrank_grad``. Row shard: ``sums =
        (local, summed)`` — :meth:`shard_sums`' local part and its additive part summed over the shards;
        ``lowrank_grad`` is then the rows of R whose first moment this shard holds, and ``st.row_factor`` its rows.
        """
        c = self.config
        b1, b2 = c.betas
        dtype = torch.float64 if lowrank_grad.dtype == torch.float64 else torch.float32
        r = lowrank_grad.to(dtype)
        row_offset, row_mean = 0, None
        if sums is None:
            row_sq, col_sq = self.factor_sums(st, r)
        else:
            (row_sq, row_offset), (col_sq, a_sum) = sums
            row_mean = (a_sum.to(dtype) / st.shape[0]).reshape(())
        m_rows, n_cols = st.shape
        mom = st.exp_avg.to_float(dtype).mul_(b1).add_(r, alpha=1.0 - b1)
        a = st.row_factor.to(dtype).mul_(b2).add_(row_sq.to(dtype), alpha=(1.0 - b2) / n_cols)
        b = st.col_factor.to(dtype).mul_(b2).add_(col_sq.to(dtype), alpha=(1.0 - b2) / m_rows)
        st.step += 1
        st.exp_avg.from_float(mom)
        st.row_factor.copy_(a)
        st.col_factor.copy_(b)
        step_size = lr * math.sqrt(1.0 - b2 ** st.step) / (1.0 - b1 ** st.step)
        return ProjFactorUpdate(mom, a, b, row_offset, row_mean), step_size

    # --- phase 3: the update of weight rows -------------------------------------------------------------------
    def update_of_rows(self, st: ProjFactorState, n: ProjFactorUpdate, dtype: torch.dtype, row_offset: int,
                       rows: int, basis_rows: torch.Tensor | None = None,
                       n_offset: int | None = None) -> torch.Tensor:
        """``scale · project_back(M) / (√V̂ + ε)`` for rows ``[row_offset, row_offset + rows)``: [rows, n].
        ``n_offset``: the reshaped row of ``n.exp_avg``'s row 0 (right projection, a row shard's covering rows)."""
        back = self.back_rows(st, n.exp_avg, dtype, row_offset, rows, basis_rows, n_offset)
        a = n.row_factor.to(dtype)
        # mean(a) over *all* m rows (a whole update carries the whole row factor, a shard's the global mean);
        # guard an all-zero first gradient
        denom = (a.mean() if n.row_mean is None else n.row_mean.to(dtype)).clamp_min(torch.finfo(dtype).tiny)
        i0 = row_offset - n.row_offset
        v = (a[i0:i0 + rows, None] / denom) * n.col_factor.to(dtype)[None, :]
        return back.div_(v.sqrt_().add_(self.config.eps)).mul_(self.config.scale)

    # --- the update as it crosses ranks: M, the row factor, the column factor ---------------------------------
    def update_tensors(self, update: ProjFactorUpdate) -> list[torch.Tensor]:
        return [update.exp_avg, update.row_factor, update.col_factor]

    def update_buffers(self, st: ProjFactorState, lowrank: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        dev = lowrank.device
        return [lowrank, torch.empty(st.shape[0], dtype=dtype, device=dev),
                torch.empty(st.shape[1], dtype=dtype, device=dev)]

    def update_from_tensors(self, st: ProjFactorState, tensors: list[torch.Tensor],
                            dtype: torch.dtype) -> ProjFactorUpdate:
        return ProjFactorUpdate(tensors[0].to(dtype), tensors[1], tensors[2])

    def lowrank_part(self, update: ProjFactorUpdate) -> torch.Tensor:
        return update.exp_avg

    def with_lowrank_part(self, update: ProjFactorUpdate, lowrank: torch.Tensor) -> ProjFactorUpdate:
        return replace(update, exp_avg=lowrank)


__all__ = ["ProjFactor", "ProjFactorState", "ProjFactorUpdate", "projfactor_numel"]
