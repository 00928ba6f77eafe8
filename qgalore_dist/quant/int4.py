"""INT4 tensors packed two codes per byte (projection matrices).

Q-GaLore keeps its 4-bit projector codes one per int8 byte; packing halves that. Codes are symmetric in
[-7, 7] with one fp32 scale per row-aligned group (so a left projector row-sharded with its weight never splits a
group), stored biased by +8 in a nibble: low nibble = even flat index, high nibble = odd flat index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int8 import dequantize_rows, quantize_rows


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], any shape with N elements -> uint8 [ceil(N / 2)]."""
    flat = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), 8)])  # pad with code 0
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(N / 2)] -> int8 [N] codes in [-8, 7] (inverse of :func:`pack_int4`)."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel]


@dataclass
class Int4Matrix:
    """A 2-D float matrix stored as packed INT4 codes + fp32 group scales.

    packed: uint8 [ceil(rows * cols / 2)]; scales: float32 [rows, G].
    """

    packed: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int

    @classmethod
    def quantize(cls, x: torch.Tensor, group_size: int = 256) -> "Int4Matrix":
        codes, scales = quantize_rows(x, group_size, bits=4)
        return cls(pack_int4(codes), scales, (int(x.shape[0]), int(x.shape[1])), group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = self.shape
        codes = unpack_int4(self.packed, rows * cols).reshape(rows, cols)
        return dequantize_rows(codes, self.scales, self.group_size, dtype)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()
