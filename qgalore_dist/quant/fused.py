"""Fused ``update + re-quantise`` of INT8 weight rows, compiled with ``torch.compile``.

The eager path (:func:`..quant.int8.quantize_rows` after a dequantise and an update) makes ~25 passes over
every weight element per step — dequantise, update, decay, group absmax, divide, the 8 passes of the keyed hash,
floor, clamp, cast. Inductor fuses them into one reduction and one pointwise loop: 5× faster on CPU in our
measurements. It equals the eager path up to fp32 rounding — Inductor may contract ``w − s·u`` into an FMA, so a
scale can differ in its last bit and a rare code by one step (tests/test_fused.py); every rank runs the same path
(it is part of the config), so replicas still agree bit for bit. Scalars travel as 0-d tensors so a new step size, key or row offset
never triggers a recompile; shapes are dynamic, so one compilation serves every matrix.
"""

from __future__ import annotations

import functools

import torch

from .rng import _C1, _C2, _signed32


def _requant_kernel(codes: torch.Tensor, scales: torch.Tensor, update: torch.Tensor, step_size: torch.Tensor,
                    decay_alpha: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, row_offset: torch.Tensor,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = codes.shape
    g = min(group_size, n)
    groups = scales.shape[1]
    col = torch.arange(n, device=codes.device)
    w = codes.float() * scales[:, col // g]
    w = w - step_size * update.float()
    w = w + decay_alpha * w  # written as eager's w.add_(w, alpha=-lr·wd): same rounding, same codes
    padded = torch.nn.functional.pad(w.abs(), (0, groups * g - n)).view(m, groups, g)
    new_scales = padded.amax(-1) * (1.0 / 127)
    safe = torch.where(new_scales > 0, new_scales, torch.ones_like(new_scales))
    rows = torch.arange(m, device=codes.device, dtype=torch.int32) + row_offset
    x = (rows[:, None] * n + col.to(torch.int32)[None, :]) ^ k1  # the hash of rng._mix32, inlined
    x = x * _C1
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x ^ k2
    x = x * _C2
    x = x ^ ((x >> 15) & 0x1FFFF)
    u = ((x >> 8).float() + float(1 << 23)) * (1.0 / (1 << 24))
    q = torch.floor(w / safe[:, col // g] + u).clamp(-127, 127).to(torch.int8)
    return q, new_scales


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(_requant_kernel, dynamic=True)


def fused_update_requantize_(codes: torch.Tensor, scales: torch.Tensor, update: torch.Tensor, step_size: float,
                             decay_alpha: float, key: tuple[int, int], row_offset: int, group_size: int) -> None:
    """In place: ``W ← W − step_size·update; W ← W + decay_alpha·W; W ← SR-quantise(W)`` for INT8 rows.

    codes int8 [rows, n]; scales float32 [rows, G]; update float [rows, n] (already scaled back-projection);
    ``decay_alpha = −lr·wd``; ``key`` the stochastic-rounding key; ``row_offset`` the rows' global offset.
    Computes in fp32 like the eager path.
    """
    dev = codes.device
    q, s = _compiled()(codes, scales, update, torch.tensor(step_size, dtype=torch.float32, device=dev),
                       torch.tensor(decay_alpha, dtype=torch.float32, device=dev),
                       torch.tensor(_signed32(key[0]), dtype=torch.int32, device=dev),
                       torch.tensor(_signed32(key[1]), dtype=torch.int32, device=dev),
                       torch.tensor(row_offset, dtype=torch.int32, device=dev), group_size)
    codes.copy_(q)
    scales.copy_(s)
