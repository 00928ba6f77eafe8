"""Seeded random projections (VLoRP / Flora / APOLLO style): regenerated from a key, never stored.

A random basis is a pure function of (seed, refresh step, matrix name, kind, shape): every element (i, j) of the
basis is drawn from the counter-based stream of :mod:`qgalore_dist.quant.rng`, keyed by
``stream_key(seed, refresh_step, name, SALT_RANDOM_PROJ)`` and the element's global index ``i·cols + j``. So

* two processes (ranks, a resumed run) regenerate bit-identical bases with no communication and no RNG state —
  a checkpoint stores three integers instead of the matrix;
* a row shard of a left basis ``P`` can be generated on its own (:meth:`RandomBasis.rows`), exactly equal to the
  same rows of the whole matrix.

Scaling makes back-projection unbiased. Right basis ``Q [r, n']`` (``R = G Qᵀ``, back-projection ``R Q``):
``E[QᵀQ] = Σ_k E[q_k q_kᵀ] = r·σ²·I = I`` with entry variance ``σ² = 1/r``; left basis ``P [m', r]`` (back-projection
``P Pᵀ G``): ``E[P Pᵀ] = I`` likewise. Gaussian entries are ``N(0, 1/r)``, Rademacher entries ``±1/√r``.
(Unlike an SVD basis, ``Q Qᵀ ≈ (n'/r)·I`` is *not* the identity: a single draw's back-projection is a noisy,
unbiased estimate of the gradient, not a projection.)

Gaussians come from Box-Muller in float32: identical across processes on one kind of device; CPU and CUDA may
differ in the last bit of log/cos. Rademacher signs are exact everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.rng import normal_rows, stream_key, uniform_rows

RANDOM_PROJECTIONS = ("gaussian", "rademacher")
SALT_RANDOM_PROJ = 0x0B0A  # separates this stream from SR/init/rSVD draws of the same (seed, step, name)


def random_rows(kind: str, key: tuple[int, int], row_offset: int, rows: int, cols: int, rank: int,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows ``[row_offset, row_offset + rows)`` of a random basis with ``cols`` columns: [rows, cols] in ``dtype``.

    Entries have variance ``1/rank`` (``rank`` = the basis' number of basis vectors, r).
    """
    if kind == "gaussian":
        x = normal_rows(row_offset, rows, cols, key, device)
    elif kind == "rademacher":
        u = uniform_rows(row_offset, rows, cols, key, device)
        x = torch.where(u < 0.5, -1.0, 1.0)  # u has 24 exact bits: P(u < 0.5) is exactly 1/2
    else:
        raise ValueError(f"projection={kind!r} is not a random projection: allowed: {', '.join(RANDOM_PROJECTIONS)}")
    return x.mul_(1.0 / math.sqrt(rank)).to(dtype)


@dataclass(frozen=True)
class RandomBasis:
    """A random projector of ``shape`` (right: Q [r, n']; left: P [m', r]) drawn at refresh step ``step``.

    Holds no tensor: :meth:`dequantize` (named like :class:`~qgalore_dist.quant.int4.Int4Matrix`'s, so code that
    materialises a stored basis treats both alike) regenerates it.
    """

    kind: str
    seed: int
    step: int
    name: str
    shape: tuple[int, int]
    rank: int
    device: str = "cpu"

    @property
    def key(self) -> tuple[int, int]:
        return stream_key(self.seed, self.step, self.name, SALT_RANDOM_PROJ)

    def rows(self, row_offset: int = 0, rows: int | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Rows ``[row_offset, row_offset + rows)`` of the basis (a left projector's shard): [rows, shape[1]]."""
        rows = self.shape[0] - row_offset if rows is None else rows
        return random_rows(self.kind, self.key, row_offset, rows, self.shape[1], self.rank, dtype,
                           self.device if device is None else device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole basis, [shape] in ``dtype`` (drawn in fp32, then cast)."""
        return self.rows(0, self.shape[0], dtype)

    def nbytes(self) -> int:
        """Resident bytes: none — the basis is regenerated from (seed, step, name)."""
        return 0

    def meta(self) -> dict:
        """What a checkpoint stores (the name, shape and rank come from the matrix state)."""
        return {"kind": self.kind, "seed": int(self.seed), "step": int(self.step)}

    @classmethod
    def from_meta(cls, meta: dict, name: str, shape: tuple[int, int], rank: int,
                  device: torch.device | str = "cpu") -> "RandomBasis":
        return cls(str(meta["kind"]), int(meta["seed"]), int(meta["step"]), name, tuple(shape), rank, str(device))


__all__ = ["RANDOM_PROJECTIONS", "SALT_RANDOM_PROJ", "RandomBasis", "random_rows"]
