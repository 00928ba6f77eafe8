"""INT8 weights, stochastic rounding, INT4 packing, 8-bit optimizer-state codec (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgalore_dist.quant.groups import num_groups
from qgalore_dist.quant.int4 import Int4Matrix, pack_int4, unpack_int4
from qgalore_dist.quant.int8 import Int8Weight, dequantize_rows, quantize_rows
from qgalore_dist.quant.rng import stream_key, uniform_rows
from qgalore_dist.quant.state8 import Blockwise8bit, dynamic_map

shapes = st.tuples(st.integers(1, 9), st.integers(1, 700))
group_sizes = st.sampled_from([1, 3, 16, 64, 256])
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


def rand(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@given(shapes, group_sizes, st.integers(0, 2**31), st.floats(1e-4, 1e3), dtypes)
def test_int8_nearest_error_bound(shape, g, seed, scale, dtype):
    w = rand(shape, seed, scale, dtype)
    q = Int8Weight.quantize(w, g)
    assert q.codes.dtype == torch.int8 and q.codes.shape == w.shape
    assert q.scales.shape == (shape[0], num_groups(shape[1], min(g, shape[1])))
    err = (q.dequantize(torch.float32) - w.float()).abs()
    per_elem_scale = dequantize_rows(torch.ones_like(q.codes), q.scales, g)
    # half a step, plus fp32 rounding of codes·scale (|code| <= 127)
    assert torch.all(err <= per_elem_scale * (0.5 + 127 * 2e-7) + 1e-30)
    assert q.dequantize(dtype).dtype == dtype


@given(shapes, group_sizes, st.integers(0, 2**31))
def test_int8_stochastic_error_bound_and_determinism(shape, g, seed):
    w = rand(shape, seed)
    key = stream_key(seed, 7, "layers.0.q_proj.weight", 1)
    a = Int8Weight.quantize(w, g, key=key)
    b = Int8Weight.quantize(w, g, key=key)
    assert torch.equal(a.codes, b.codes)
    per_elem_scale = dequantize_rows(torch.ones_like(a.codes), a.scales, g)
    assert torch.all((a.dequantize() - w).abs() <= per_elem_scale * (1 + 127 * 2e-7))


def test_groups_stay_inside_rows_llama60m_width():
    """1376 = 5·256 + 96: the last group of every row is 96 long; a row's scale never depends on another row."""
    w = rand((4, 1376), 0)
    w[1] *= 1000.0
    q = Int8Weight.quantize(w, 256)
    assert q.scales.shape == (4, 6)
    assert torch.allclose(q.scales[0, 5], w[0, 1280:].abs().max() / 127)
    assert torch.allclose(Int8Weight.quantize(w[2:3], 256).scales, q.scales[2:3])


@given(st.integers(1, 12), st.integers(1, 300), group_sizes, st.integers(0, 2**31), st.integers(0, 5))
def test_row_shard_rounds_like_whole_matrix(m, n, g, seed, start):
    start = min(start, m - 1)
    w = rand((m, n), seed)
    key = stream_key(seed, 3, "w", 9)
    whole = Int8Weight.quantize(w, g, key=key)
    shard = Int8Weight.quantize(w[start:], g, key=key, row_offset=start)
    assert torch.equal(shard.codes, whole.codes[start:])
    assert torch.equal(shard.scales, whole.scales[start:])


def test_stochastic_rounding_is_unbiased():
    """Mean over 4000 independent keys of the dequantised value equals the input to within 4 standard errors."""
    w = rand((2, 64), 5)
    draws = torch.stack([Int8Weight.quantize(w, 64, key=stream_key(0, s, "w", 1)).dequantize() for s in range(4000)])
    scale = Int8Weight.quantize(w, 64).scales.repeat_interleave(64, dim=1)
    # one draw's variance is at most scale²/4, so the mean's standard error is <= scale / (2·√4000)
    assert torch.all((draws.mean(0) - w).abs() <= 4 * scale / (2 * math.sqrt(4000)))
    nearest = Int8Weight.quantize(w, 64).dequantize()
    assert (nearest - w).abs().mean() > 10 * (draws.mean(0) - w).abs().mean()


def test_rng_keys_separate_streams_and_are_uniform():
    u = uniform_rows(0, 100, 1000, stream_key(1, 2, "a"))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    for other in (stream_key(2, 2, "a"), stream_key(1, 3, "a"), stream_key(1, 2, "b"), stream_key(1, 2, "a", 1)):
        v = uniform_rows(0, 100, 1000, other)
        assert (u == v).float().mean() < 0.001
        assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()) < 0.01


@given(st.integers(0, 5000), st.integers(0, 2**31))
def test_int4_pack_unpack_identity(numel, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (numel,), generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, numel), codes)


@given(st.integers(1, 40), st.integers(1, 300), st.integers(0, 2**31))
def test_int4_matrix_round_trip(m, n, seed):
    x = rand((m, n), seed)
    q = Int4Matrix.quantize(x, 64)
    # codes survive exactly: re-quantising the dequantised matrix gives the same codes and scales
    q2 = Int4Matrix.quantize(q.dequantize(), 64)
    assert torch.equal(q.packed, q2.packed) and torch.allclose(q.scales, q2.scales)
    per_elem_scale = q.scales.repeat_interleave(min(64, n), dim=1)[:, :n]
    assert torch.all((q.dequantize() - x).abs() <= per_elem_scale * (0.5 + 7 * 2e-7))


def test_int4_projector_bytes_4096x1024():
    q = Int4Matrix.quantize(torch.randn(4096, 1024), 256)
    assert q.packed.numel() == 4096 * 1024 // 2  # 2 MiB exactly
    assert q.nbytes() == 2 * 1024 * 1024 + 4096 * 4 * 4


@given(st.tuples(st.integers(1, 8), st.integers(512, 1500)), st.integers(0, 2**31), st.floats(1e-8, 1e4),
       st.booleans())
@settings(max_examples=60)
def test_state8_error_bound(shape, seed, scale, signed):
    x = rand(shape, seed, scale)
    if not signed:
        x = x * x
    enc = Blockwise8bit(shape, signed, block=256, min_numel=0)
    enc.from_float(x)
    assert enc.codes.dtype == torch.uint8 and enc.nbytes() < x.numel() * 4 / 3
    blockmax = x.abs().reshape(shape[0], -1)
    bound = 0.0072 if signed else 0.0036
    groups = -(-shape[1] // 256)
    pad = torch.nn.functional.pad(blockmax, (0, groups * 256 - shape[1])).reshape(shape[0], groups, 256)
    per_elem_max = pad.amax(-1).repeat_interleave(256, dim=1)[:, : shape[1]]
    assert torch.all((enc.to_float() - x).abs() <= bound * per_elem_max + 1e-30)
    if not signed:
        assert torch.all(enc.to_float() >= 0)


def test_state8_small_tensors_stay_float_and_maps_are_sorted():
    small = Blockwise8bit((10, 10), True, min_numel=4096)
    assert not small.quantized and small.data.dtype == torch.float32
    small.from_float(torch.full((10, 10), 0.123456789))
    assert torch.all(small.to_float() == torch.tensor(0.123456789))
    for signed in (True, False):
        cmap = dynamic_map(signed)
        assert cmap.numel() == 256 and torch.all(cmap[1:] > cmap[:-1])
        assert (cmap.min() < 0) == signed and cmap.max() == 1.0 and (cmap == 0).any()


def test_state8_relative_precision_of_small_values():
    """The dynamic map keeps small moments that a linear int8 grid would flush to zero."""
    x = torch.ones(1, 4096) * 1e-4
    x[0, 0] = 1.0
    enc = Blockwise8bit((1, 4096), True, min_numel=0)
    enc.from_float(x)
    out = enc.to_float()
    assert torch.all(out[0, 1:256] > 0)
    assert torch.allclose(out[0, 1:256], x[0, 1:256], rtol=0.2)


def test_quantize_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(torch.zeros(3), 4)
