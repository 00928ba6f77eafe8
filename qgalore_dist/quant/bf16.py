"""Stochastic rounding of fp32 values to bfloat16, keyed like every other random stream here.

Dense parameters (embeddings, norms, lm_head) may be *stored* in bf16 while the step is computed in fp32. Rounding
the updated weight to nearest would lose every update smaller than half a bf16 ulp — a norm weight near 1.0 has
an ulp of 2⁻⁷ ≈ 0.0078, so AdamW steps of lr ≈ 1e-3 would never move it. Rounding stochastically (up with
probability equal to the discarded fraction) keeps the expected weight equal to the fp32 result.

The 16 discarded mantissa bits are compared with 16 random bits from the keyed hash of the element's global index
(:func:`..quant.rng._mix32`), so the result is a pure function of (value, key, index): a resumed run, a row
chunk and a whole tensor all round alike.
"""

from __future__ import annotations

import torch

from .rng import _MAX_INDEX, _mix32

SALT_DENSE_SR = 0xB16F  # stochastic rounding of a bf16-stored dense parameter after its step


def stochastic_round_bf16(x: torch.Tensor, key: tuple[int, int], index_offset: int = 0) -> torch.Tensor:
    """fp32 ``x`` [...] → bf16 [...] rounded stochastically; element i (flattened) draws hash(index_offset + i).

    Adding a uniform 16-bit integer to the fp32 bit pattern and truncating the low 16 bits rounds the *magnitude*
    up with probability (discarded bits) / 2¹⁶ — unbiased for either sign because fp32 is sign-magnitude; a carry
    into the exponent is the correct round-up to the next binade. Non-finite values are left to the plain cast.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bf16 expects float32 input, got {x.dtype}")
    n = x.numel()
    if index_offset + n > _MAX_INDEX:
        raise ValueError(f"stochastic rounding stream covers < 2**31 elements; offset {index_offset} + {n} is larger")
    idx = torch.arange(index_offset, index_offset + n, dtype=torch.int32, device=x.device)
    noise = _mix32(idx, key[0], key[1]) & 0xFFFF  # 16 random bits per element
    bits = x.contiguous().view(torch.int32).reshape(-1)
    rounded = (bits + noise) & ~0xFFFF  # the low 16 bits are exactly zero: the bf16 cast below is exact
    out = rounded.view(torch.float32).reshape(x.shape).to(torch.bfloat16)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        out = torch.where(finite, out, x.to(torch.bfloat16))
    return out
