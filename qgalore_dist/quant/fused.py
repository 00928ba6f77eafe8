"""Fused ``update + re-quantise`` of INT8 weight rows, and fused 8-bit Adam moments, compiled with ``torch.compile``.

The eager path (:func:`..quant.int8.quantize_rows` after a dequantise and an update) makes ~25 passes over every
weight element per step — dequantise, update, decay, group absmax, divide, the 8 passes of the keyed hash, floor,
clamp, cast. Inductor fuses them into one reduction and one pointwise loop: 5× faster on CPU in our measurements. It
equals the eager path up to fp32 rounding — Inductor may contract ``w − s·u`` into an FMA, so a scale can differ in
its last bit and a rare code by one step (tests/unit/test_fused.py); every rank runs the same path (it is part of the
config), so replicas still agree bit for bit. Scalars travel as 0-d tensors so a new step size, key or row offset
never triggers a recompile. Row counts are dynamic, column counts static: one compilation per column count serves
every matrix and row shard of that width. Fully dynamic shapes (``dynamic=True``) cost 5× here — the symbolic column
count and group size turn the per-group scale lookup into a gather and block vectorisation of the inner loop (27 ms
against 5 ms for a 1376×512 matrix on one core) — so columns stay specialised (``dynamic=False`` with ``mark_dynamic``
on the row dimension, which ``dynamic=False`` honours and automatic dynamic shapes would undo).

:func:`fused_adam_moments_` does the same for the low-rank Adam moments kept in 8-bit blockwise form
(:mod:`.state8`): decode both moments, update them with the low-rank gradient, compute ``N = m / (√v + ε)``,
re-encode (block absmax + the table-lookup encoder) — two reductions and three element-wise loops instead of ~40
eager passes. The codec is the eager one (the lookup equals ``bucketize``); the moment arithmetic may round
differently (FMA contraction), so a moment code can differ by one step from the eager path (tests/unit/test_fused.py).
:func:`fused_dense_adamw8_` adds the weight update to it for dense parameters with 8-bit moments (a 32000×512
embedding: ~10× faster than the eager :func:`..optim.dense_adamw.dense_adamw_step`, which stays the default there:
engines that must match another engine bit for bit pass the same ``fused`` flag on both sides).
"""

from __future__ import annotations

import functools

import torch

from .rng import _C1, _C2, _signed32
from .state8 import Blockwise8bit, dynamic_map, encode_tables, encode_unit


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
    return torch.compile(_requant_kernel, dynamic=False)


def _rows_dynamic(*tensors: torch.Tensor) -> None:
    """Compile for any row count (dim 0) of these inputs; a size-0/1 dimension would be specialised anyway."""
    for t in tensors:
        if t.shape[0] > 1:
            torch._dynamo.mark_dynamic(t, 0)


def fused_update_requantize_(codes: torch.Tensor, scales: torch.Tensor, update: torch.Tensor, step_size: float,
                             decay_alpha: float, key: tuple[int, int], row_offset: int, group_size: int) -> None:
    """In place: ``W ← W − step_size·update; W ← W + decay_alpha·W; W ← SR-quantise(W)`` for INT8 rows.

    codes int8 [rows, n]; scales float32 [rows, G]; update float [rows, n] (already scaled back-projection);
    ``decay_alpha = −lr·wd``; ``key`` the stochastic-rounding key; ``row_offset`` the rows' global offset.
    Computes in fp32 like the eager path.
    """
    dev = codes.device
    _rows_dynamic(codes, scales, update)
    q, s = _compiled()(codes, scales, update, torch.tensor(step_size, dtype=torch.float32, device=dev),
                       torch.tensor(decay_alpha, dtype=torch.float32, device=dev),
                       torch.tensor(_signed32(key[0]), dtype=torch.int32, device=dev),
                       torch.tensor(_signed32(key[1]), dtype=torch.int32, device=dev),
                       torch.tensor(row_offset, dtype=torch.int32, device=dev), group_size)
    codes.copy_(q)
    scales.copy_(s)


def _blockwise_encode(x: torch.Tensor, block: int, below: torch.Tensor, ext: torch.Tensor, first: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [rows, cols] -> (codes uint8 [rows, cols], absmax float32 [rows, G]) exactly as
    :meth:`Blockwise8bit.from_float` encodes."""
    rows, cols = x.shape
    g = min(block, cols)
    groups = (cols + g - 1) // g
    absmax = torch.nn.functional.pad(x.abs(), (0, groups * g - cols)).view(rows, groups, g).amax(-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    col = torch.arange(cols, device=x.device)
    codes = encode_unit(x / safe[:, col // g], below, ext, first)
    return codes.to(torch.uint8), absmax


def _moments_kernel(m_codes: torch.Tensor, m_absmax: torch.Tensor, v_codes: torch.Tensor, v_absmax: torch.Tensor,
                    r: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, eps: torch.Tensor, cmap_s: torch.Tensor,
                    cmap_u: torch.Tensor, below_s: torch.Tensor, ext_s: torch.Tensor, below_u: torch.Tensor,
                    ext_u: torch.Tensor, first_s: int, first_u: int, block: int):
    rows, cols = r.shape
    g = min(block, cols)
    grp = torch.arange(cols, device=r.device) // g
    m = cmap_s[m_codes.long()] * m_absmax[:, grp]
    v = cmap_u[v_codes.long()] * v_absmax[:, grp]
    m = m * b1 + (1.0 - b1) * r
    v = v * b2 + (1.0 - b2) * (r * r)
    n = m / (v.sqrt() + eps)
    mc, ma = _blockwise_encode(m, block, below_s, ext_s, first_s)
    vc, va = _blockwise_encode(v, block, below_u, ext_u, first_u)
    return n, mc, ma, vc, va


def _dense_kernel(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                  v_codes: torch.Tensor, v_absmax: torch.Tensor, step_size: torch.Tensor, decay_alpha: torch.Tensor,
                  b1: torch.Tensor, b2: torch.Tensor, eps: torch.Tensor, cmap_s: torch.Tensor, cmap_u: torch.Tensor,
                  below_s: torch.Tensor, ext_s: torch.Tensor, below_u: torch.Tensor, ext_u: torch.Tensor,
                  first_s: int, first_u: int, block: int):
    n, mc, ma, vc, va = _moments_kernel(m_codes, m_absmax, v_codes, v_absmax, grad, b1, b2, eps, cmap_s, cmap_u,
                                        below_s, ext_s, below_u, ext_u, first_s, first_u, block)
    w = p.float() - step_size * n
    w = w + decay_alpha * w
    return w, mc, ma, vc, va  # fp32: the caller rounds to the storage dtype (nearest or stochastic)


@functools.lru_cache(maxsize=None)
def _compiled_moments():
    return torch.compile(_moments_kernel, dynamic=False)


@functools.lru_cache(maxsize=None)
def _compiled_dense():
    return torch.compile(_dense_kernel, dynamic=False)


def _codec_args(dev: torch.device) -> tuple:
    below_s, ext_s, first_s = encode_tables(True, dev)
    below_u, ext_u, first_u = encode_tables(False, dev)
    return dynamic_map(True, dev), dynamic_map(False, dev), below_s, ext_s, below_u, ext_u, first_s, first_u


def fused_adam_moments_(exp_avg: Blockwise8bit, exp_avg_sq: Blockwise8bit, r: torch.Tensor, beta1: float,
                        beta2: float, eps: float) -> torch.Tensor:
    """In place on two 8-bit moments of shape [rows, cols]: ``m ← β1·m + (1−β1)·R``, ``v ← β2·v + (1−β2)·R²``,
    re-encoded; returns ``N = m / (√v + ε)`` float32 [rows, cols] (from the fp32 moments, before re-encoding —
    as the eager path). ``r``: the low-rank gradient [rows, cols]; both moments must be quantised 2-D, with the
    signed (m) and unsigned (v) maps and the same block."""
    dev = r.device
    scalar = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
    r = r.float().reshape(exp_avg.codes.shape)
    _rows_dynamic(exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax, r)
    n, mc, ma, vc, va = _compiled_moments()(
        exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax, r, scalar(beta1), scalar(beta2),
        scalar(eps), *_codec_args(dev), exp_avg.block)
    exp_avg.codes.copy_(mc)
    exp_avg.absmax.copy_(ma)
    exp_avg_sq.codes.copy_(vc)
    exp_avg_sq.absmax.copy_(va)
    return n


def fused_dense_adamw8_(p: torch.Tensor, grad: torch.Tensor, exp_avg: Blockwise8bit, exp_avg_sq: Blockwise8bit,
                        step_size: float, decay_alpha: float, beta1: float, beta2: float, eps: float,
                        store=None) -> None:
    """In place: one AdamW step of a dense parameter with 8-bit blockwise moments, as
    :func:`..optim.dense_adamw.dense_adamw_step` computes it (fp32 math; ``p`` may be stored narrower).

    p, grad: [...] of the moments' logical shape (viewed as their [rows, cols]); ``step_size`` the bias-corrected
    lr, ``decay_alpha = −lr·wd``. ``store(w)``: writes the fp32 result [rows, cols] into ``p`` (default: a cast,
    i.e. round to nearest).
    """
    dev = p.device
    shape = exp_avg.codes.shape
    scalar = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
    p2, g2 = p.data.reshape(shape), grad.float().reshape(shape)
    _rows_dynamic(p2, g2, exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax)
    w, mc, ma, vc, va = _compiled_dense()(
        p2, g2, exp_avg.codes, exp_avg.absmax, exp_avg_sq.codes, exp_avg_sq.absmax, scalar(step_size),
        scalar(decay_alpha), scalar(beta1), scalar(beta2), scalar(eps), *_codec_args(dev), exp_avg.block)
    if store is None:
        p.data.copy_(w.reshape(p.shape))
    else:
        store(w)
    exp_avg.codes.copy_(mc)
    exp_avg.absmax.copy_(ma)
    exp_avg_sq.codes.copy_(vc)
    exp_avg_sq.absmax.copy_(va)
