"""Low-rank projectors: which side, how the basis is computed, project / project_back.

GaLore's ``std`` rule: a right projection ``Q = Vh[:r]`` (r×n) when m >= n, so the low-rank gradient is
``R = G Qᵀ`` (m×r); a left projection ``P = U[:, :r]`` (m×r) when m < n, ``R = Pᵀ G`` (r×n). The low-rank side
is always the smaller one.
"""

from __future__ import annotations

from typing import Literal

import torch

Side = Literal["left", "right"]


def projection_side(m: int, n: int, proj_type: str = "std") -> Side:
    """``right`` when m >= n else ``left`` (GaLore ``std``)."""
    if proj_type != "std":
        raise ValueError(f"proj_type={proj_type!r} is invalid: allowed: std")
    return "right" if m >= n else "left"


def lowrank_shape(m: int, n: int, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the low-rank gradient R: (m, r) for right projection, (r, n) for left."""
    return (m, rank) if side == "right" else (rank, n)


def basis_shape(m: int, n: int, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the stored basis: Q (r, n) for right projection, P (m, r) for left."""
    return (rank, n) if side == "right" else (m, rank)


def randomized_svd(a: torch.Tensor, k: int, oversample: int, niter: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp randomized SVD of a [m, n] fp32 matrix: U [m, k], S [k], Vh [k, n].

    Draws only from ``generator`` — ``torch.svd_lowrank`` draws from the global RNG, and calling it on owner ranks
    only would make the ranks' global random streams drift apart.
    """
    m, n = a.shape
    ell = min(k + oversample, m, n)
    omega = torch.randn(n, ell, generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    y = a @ omega
    q, _ = torch.linalg.qr(y)
    for _ in range(niter):  # power iterations, re-orthonormalised each half step for stability
        z, _ = torch.linalg.qr(a.mT @ q)
        q, _ = torch.linalg.qr(a @ z)
    b = q.mT @ a  # [ell, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def compute_basis(grad: torch.Tensor, rank: int, side: Side, method: str = "svd", *,
                  generator: torch.Generator | None = None, oversample: int = 8, niter: int = 2) -> torch.Tensor:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad`` ([m, n], any float dtype).

    Returns fp32 Q [rank, n] for ``side='right'``, P [m, rank] for ``side='left'``. The SVD always runs in fp32
    (as galore-torch's does, even for fp64 gradients): the basis is stored in 4 bits anyway.
    """
    if grad.dim() != 2:
        raise ValueError(f"compute_basis expects a 2-D gradient, got shape {tuple(grad.shape)}")
    a = grad.float()
    if method == "svd":
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
    elif method == "rsvd":
        if generator is None:
            raise ValueError("projection='rsvd' needs an explicit torch.Generator")
        u, _, vh = randomized_svd(a, rank, oversample, niter, generator)
    else:
        raise ValueError(f"projection={method!r} is invalid: allowed: svd, rsvd")
    # no .contiguous(): LAPACK returns column-major factors and galore-torch keeps that layout, which fixes the
    # matmul kernel and so its rounding (fp32 reference parity is bit-exact only with the same layout)
    return vh[:rank] if side == "right" else u[:, :rank]


def project(grad: torch.Tensor, basis: torch.Tensor, side: Side) -> torch.Tensor:
    """[m, n] gradient -> low-rank R: ``G Qᵀ`` [m, r] (right) or ``Pᵀ G`` [r, n] (left)."""
    basis = basis.to(grad.dtype)
    return grad @ basis.mT if side == "right" else basis.mT @ grad


def project_back(lowrank: torch.Tensor, basis_rows: torch.Tensor, side: Side, scale: float,
                 row_offset: int = 0, rows: int | None = None) -> torch.Tensor:
    """Low-rank update -> rows ``[row_offset, row_offset + rows)`` of the full-size update, times ``scale``.

    Right: ``N[rows] @ Q`` (N [m, r], Q [r, n]). Left: ``P[rows] @ N`` (P [m, r], N [r, n]); ``basis_rows`` may be
    the whole P or just the shard's rows (then pass ``row_offset`` relative to it as 0). Result [rows, n].
    """
    if side == "right":
        stop = lowrank.shape[0] if rows is None else row_offset + rows
        out = lowrank[row_offset:stop] @ basis_rows.to(lowrank.dtype)
    else:
        stop = basis_rows.shape[0] if rows is None else row_offset + rows
        out = basis_rows[row_offset:stop].to(lowrank.dtype) @ lowrank
    return out * scale


def subspace_similarity(old: torch.Tensor, new: torch.Tensor, side: Side, measure: str) -> float:
    """Sign-invariant similarity of two bases of the same shape.

    ``cos``: |cos| between the top singular vectors (Q-GaLore's measure without its sign sensitivity: an SVD may
    flip any singular vector's sign). ``overlap``: ‖old·newᵀ‖²_F / r ∈ [0, 1] (1 = same subspace; random
    subspaces give ≈ r / min(m, n)).
    """
    old = old.double()
    new = new.double()
    if side == "left":
        old, new = old.mT, new.mT  # rows are now the basis vectors: [r, m]
    if measure == "cos":
        a, b = old[0], new[0]
        denom = a.norm() * b.norm()
        return 0.0 if denom == 0 else float((a @ b).abs() / denom)
    if measure == "overlap":
        r = old.shape[0]
        return float((old @ new.mT).pow(2).sum() / r)
    raise ValueError(f"similarity={measure!r} is invalid: allowed: cos, overlap")


def rotation(old: torch.Tensor, new: torch.Tensor, side: Side) -> torch.Tensor:
    """r×r matrix T carrying low-rank coordinates from the old basis into the new one.

    Right (R = G Qᵀ): ``R_new ≈ R_old · T`` with ``T = Q_old Q_newᵀ``. Left (R = Pᵀ G): ``R_new ≈ T · R_old`` with
    ``T = P_newᵀ P_old``.
    """
    if side == "right":
        return old.to(new.dtype) @ new.mT
    return new.mT @ old.to(new.dtype)


def apply_rotation(x: torch.Tensor, t: torch.Tensor, side: Side) -> torch.Tensor:
    """Rotate a low-rank tensor with T from :func:`rotation`."""
    t = t.to(x.dtype)
    return x @ t if side == "right" else t @ x
