"""INT8 weights: int8 codes + one fp32 scale per row-aligned group, stochastic-rounding re-quantisation.

No fp32 master copy exists: after each update the new weight is re-quantised with stochastic rounding
``q = clamp(floor(w / s + u), -127, 127)`` (fp32 arithmetic), whose expectation is ``w / s`` — small updates that
plain rounding would erase survive in expectation (Q-GaLore §3.3). ``u`` comes from :mod:`.rng`, keyed by
(seed, step, name, global element index), so shards and replicas round identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .groups import apply_group_scales, group_absmax
from .rng import uniform_rows


def qmax_for_bits(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_rows(w: torch.Tensor, group_size: int, bits: int = 8, key: tuple[int, int] | None = None,
                  row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantisation of a [m, n] float tensor in row-aligned groups.

    Args:
        w: [m, n] any float dtype (computed in fp32).
        group_size: elements per group inside a row.
        bits: 8 (codes in [-127, 127]) or 4 (codes in [-7, 7]).
        key: stochastic-rounding key from :func:`rng.stream_key`; ``None`` rounds to nearest.
        row_offset: global index of row 0 of ``w`` (a shard's first row), so shards draw the whole matrix's numbers.
    Returns:
        codes int8 [m, n], scales float32 [m, ceil(n / group_size)].
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_rows expects a 2-D tensor, got shape {tuple(w.shape)}")
    qmax = qmax_for_bits(bits)
    m, n = w.shape
    w32 = w.float()
    scales = group_absmax(w32, group_size) * (1.0 / qmax)  # a multiply, as the compiled kernel does: same bits
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    x = apply_group_scales(w32, safe, group_size, divide=True)
    if key is None:
        q = x.round_()
    else:
        q = x.add_(uniform_rows(row_offset, m, n, key, device=w.device)).floor_()
    codes = q.clamp_(-qmax, qmax).to(torch.int8)
    return codes, scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes int8 [m, n] × scales [m, G] -> [m, n] in ``dtype`` (multiplied in fp32 unless dtype is wider)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return apply_group_scales(codes.to(compute), scales, group_size).to(dtype)


@dataclass
class Int8Weight:
    """A quantised matrix (or a row shard of one).

    codes: int8 [rows, n]; scales: float32 [rows, G]; ``group_size`` elements per group inside a row.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 256, key: tuple[int, int] | None = None,
                 row_offset: int = 0) -> "Int8Weight":
        codes, scales = quantize_rows(w, group_size, 8, key, row_offset)
        return cls(codes, scales, group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scales, self.group_size, dtype)

    def requantize_(self, w: torch.Tensor, key: tuple[int, int] | None, row_offset: int = 0) -> None:
        """Store ``w`` ([rows, n] float) in place of the current codes, stochastic rounding with ``key``."""
        codes, scales = quantize_rows(w, self.group_size, 8, key, row_offset)
        self.codes.copy_(codes)
        self.scales.copy_(scales)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
