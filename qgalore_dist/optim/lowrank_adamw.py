"""Per-matrix Q-GaLore AdamW: one matrix's weight, gradient and state in, one step out — no collectives.

The step is written as phases so a distributed engine can communicate between them (DESIGN.md §2):

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
from ..projection.projector import (Side, apply_rotation, basis_shape, compute_basis, lowrank_shape,
                                    project, project_back, projection_side, rotation, subspace_similarity)
from ..quant.int4 import Int4Matrix
from ..quant.int8 import Int8Weight
from ..quant.rng import SALT_RSVD, SALT_UPDATE, stream_key
from ..quant.state8 import Blockwise8bit


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    """The rank a matrix can take: ``min(rank, m, n)``."""
    return min(rank, shape[0], shape[1])


@dataclass
class MatrixState:
    """Everything one projected matrix carries besides its weight.

    basis: fp32 Q [r, n] / P [m, r] in reference mode, :class:`Int4Matrix` when quantised, None before the first
    refresh. exp_avg / exp_avg_sq: low-rank shaped (:func:`lowrank_shape`), 8-bit or fp32.
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

    def basis_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.basis is None:
            raise RuntimeError(f"{self.name}: no projection basis yet (refresh first)")
        if isinstance(self.basis, Int4Matrix):
            return self.basis.dequantize(dtype)
        return self.basis.to(dtype)

    def state_bytes(self) -> dict[str, int]:
        basis = 0
        if isinstance(self.basis, Int4Matrix):
            basis = self.basis.nbytes()
        elif self.basis is not None:
            basis = self.basis.numel() * self.basis.element_size()
        return {"projector": basis, "moments": self.exp_avg.nbytes() + self.exp_avg_sq.nbytes()}

    # --- checkpointing: tensors and plain values, keyed by field -------------------------------------------
    def state_dict(self) -> dict:
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.exp_avg.state_tensors().items():
            tensors[f"exp_avg.{k}"] = v
        for k, v in self.exp_avg_sq.state_tensors().items():
            tensors[f"exp_avg_sq.{k}"] = v
        if isinstance(self.basis, Int4Matrix):
            tensors["basis.packed"] = self.basis.packed
            tensors["basis.scales"] = self.basis.scales
        elif self.basis is not None:
            tensors["basis"] = self.basis
        meta = {"step": self.step, "gate": self.gate.state_dict(), "shape": list(self.shape), "rank": self.rank,
                "side": self.side, "refresh_offset": self.refresh_offset}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, d: dict, proj_group_size: int) -> None:
        meta, tensors = d["meta"], d["tensors"]
        if tuple(meta["shape"]) != self.shape or meta["rank"] != self.rank or meta["side"] != self.side:
            raise ValueError(f"{self.name}: checkpoint holds shape {tuple(meta['shape'])} rank {meta['rank']} "
                             f"side {meta['side']}, this run has {self.shape} rank {self.rank} side {self.side}")
        self.step = int(meta["step"])
        self.refresh_offset = int(meta.get("refresh_offset", 0))
        self.gate.load_state_dict(meta["gate"])
        self.exp_avg.load_state_tensors({k[len("exp_avg."):]: v for k, v in tensors.items()
                                         if k.startswith("exp_avg.")})
        self.exp_avg_sq.load_state_tensors({k[len("exp_avg_sq."):]: v for k, v in tensors.items()
                                            if k.startswith("exp_avg_sq.")})
        if "basis.packed" in tensors:
            shape = basis_shape(*self.shape, self.rank, self.side)
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
                   refresh_offset: int = 0, dtype: torch.dtype = torch.float32) -> MatrixState:
        """Fresh state for a [m, n] matrix. ``refresh_offset`` staggers this matrix's refreshes after step 0;
        ``dtype`` is the float type of unquantised moments (fp64 only for fp64 parity runs)."""
        if len(shape) != 2:
            raise ValueError(f"{name}: low-rank projection needs a 2-D weight, got shape {tuple(shape)}")
        c = self.config
        m, n = int(shape[0]), int(shape[1])
        side = projection_side(m, n, c.proj_type)
        rank = effective_rank((m, n), c.rank)
        lr_shape = lowrank_shape(m, n, rank, side)
        state_bits = c.state_bits if c.quantize else 32
        fdt = torch.float64 if dtype == torch.float64 else torch.float32
        mk = lambda signed: Blockwise8bit(lr_shape, signed, c.state_block_size, c.state_min_numel, device,
                                          bits=state_bits, float_dtype=fdt)
        gate = RefreshGate(interval=c.update_proj_gap, threshold=c.similarity_threshold, queue_size=c.queue_size,
                           gamma=c.gamma_proj, max_interval=c.max_proj_gap, adaptive=c.gate)
        return MatrixState(name, (m, n), side, rank, gate, mk(True), mk(False), refresh_offset=refresh_offset)

    # --- phase 0: refresh (owner only) ---------------------------------------------------------------------
    def needs_refresh(self, st: MatrixState) -> bool:
        return st.basis is None or st.gate.due(st.step)

    def refresh(self, st: MatrixState, grad: torch.Tensor) -> float | None:
        """Recompute the basis from the full gradient [m, n]; update the gate; optionally rotate moments.

        Returns the similarity to the previous basis (None on the first refresh).
        """
        c = self.config
        gen = None
        if c.projection == "rsvd":
            gen = torch.Generator(device="cpu")
            k1, k2 = stream_key(c.seed, st.step, st.name, SALT_RSVD)
            gen.manual_seed((k1 << 32) | k2)
        new = compute_basis(grad, st.rank, st.side, c.projection, generator=gen, oversample=c.rsvd_oversample,
                            niter=c.rsvd_niter)
        similarity = None
        if st.basis is not None:
            old = st.basis_float(new.dtype)
            similarity = subspace_similarity(old, new, st.side, c.similarity)
            if c.moments_on_refresh == "rotate":
                self._rotate_moments(st, old, new)
        if c.quantize and c.proj_bits == 4:
            st.basis = Int4Matrix.quantize(new, c.proj_group_size)
        else:
            st.basis = new
        first = st.gate.count == 0
        st.gate.record(st.step, similarity, offset=st.refresh_offset if first else 0)
        st.history.append(RefreshRecord(st.step, st.name, similarity, st.gate.interval))
        return similarity

    def _rotate_moments(self, st: MatrixState, old: torch.Tensor, new: torch.Tensor) -> None:
        """Carry the first moment into the new basis (Flora); the second moment must stay non-negative, so it is
        kept, reset, or rotated with the element-wise square of T."""
        t = rotation(old, new, st.side)
        st.exp_avg.from_float(apply_rotation(st.exp_avg.to_float(), t, st.side))
        mode = self.config.second_moment_on_rotate
        if mode == "reset":
            st.exp_avg_sq.from_float(torch.zeros(st.exp_avg_sq.shape))
        elif mode == "square":
            st.exp_avg_sq.from_float(apply_rotation(st.exp_avg_sq.to_float(), t * t, st.side))

    # --- phase 1: project (any rank holding the basis) -----------------------------------------------------
    def project(self, st: MatrixState, grad: torch.Tensor) -> torch.Tensor:
        """[m, n] gradient -> low-rank gradient R of shape :func:`lowrank_shape` (same dtype as grad)."""
        return project(grad, st.basis_float(grad.dtype if grad.dtype == torch.float64 else torch.float32),
                       st.side)

    # --- phase 2: moments (owner) ---------------------------------------------------------------------------
    def normalise(self, st: MatrixState, lowrank_grad: torch.Tensor, lr: float) -> tuple[torch.Tensor, float]:
        """Adam moments in the low-rank space. Returns (N = m / (√v + ε), step_size) and advances ``st.step``."""
        c = self.config
        b1, b2 = c.betas
        dtype = lowrank_grad.dtype if lowrank_grad.dtype == torch.float64 else torch.float32
        r = lowrank_grad.to(dtype)
        m = st.exp_avg.to_float(dtype).mul_(b1).add_(r, alpha=1.0 - b1)
        v = st.exp_avg_sq.to_float(dtype).mul_(b2).addcmul_(r, r, value=1.0 - b2)
        st.step += 1
        n = m / (v.sqrt() + c.eps)
        st.exp_avg.from_float(m)
        st.exp_avg_sq.from_float(v)
        step_size = lr * math.sqrt(1.0 - b2 ** st.step) / (1.0 - b1 ** st.step)
        return n, step_size

    # --- phase 3: apply to rows (any rank holding rows of the weight) ---------------------------------------
    def update_rows(self, st: MatrixState, w_rows: torch.Tensor, n: torch.Tensor, step_size: float, lr: float,
                    row_offset: int = 0, basis_rows: torch.Tensor | None = None) -> torch.Tensor:
        """New float value of weight rows ``[row_offset, row_offset + rows)``.

        w_rows: [rows, n_cols] float. n: the whole low-rank N (right: [m, r]; left: [r, n]). basis_rows: for left
        projection, the shard's rows of P (defaults to the whole P sliced at ``row_offset``).
        """
        rows = w_rows.shape[0]
        if st.side == "left" and basis_rows is not None:
            update = project_back(n, basis_rows.to(w_rows.dtype), st.side, self.config.scale, 0, rows)
        else:
            update = project_back(n, st.basis_float(w_rows.dtype), st.side, self.config.scale, row_offset, rows)
        w = w_rows.add(update.to(w_rows.dtype), alpha=-step_size)
        if self.config.weight_decay > 0:
            w.add_(w, alpha=-lr * self.config.weight_decay)
        return w

    def apply_rows(self, st: MatrixState, weight: Int8Weight | torch.Tensor, n: torch.Tensor, step_size: float,
                   lr: float, row_offset: int = 0, basis_rows: torch.Tensor | None = None,
                   compute_dtype: torch.dtype = torch.float32) -> None:
        """Update weight rows in place: a float tensor (reference mode) or an :class:`Int8Weight` (re-quantised
        with stochastic rounding keyed by (seed, step, name, global index), so shards and replicas agree)."""
        if isinstance(weight, Int8Weight):
            w = self.update_rows(st, weight.dequantize(compute_dtype), n, step_size, lr, row_offset, basis_rows)
            key = stream_key(self.config.seed, st.step, st.name, SALT_UPDATE) if self.config.stochastic_round \
                else None
            weight.requantize_(w, key, row_offset)
        else:
            w = self.update_rows(st, weight.data, n, step_size, lr, row_offset, basis_rows)
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
