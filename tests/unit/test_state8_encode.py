"""The 8-bit state codec's table-lookup encoder equals the binary search it replaced, bit for bit.

``reference_encode`` is the encoder as it was before the lookup (``torch.bucketize`` over the map's midpoints),
kept here as the oracle.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgalore_dist.quant.state8 import Blockwise8bit, _midpoints, dynamic_map, encode_tables, encode_unit, order_key


def reference_encode(x: torch.Tensor, signed: bool) -> torch.Tensor:
    return torch.bucketize(x.clamp(-1.0, 1.0), _midpoints(dynamic_map(signed)))


def lookup_encode(x: torch.Tensor, signed: bool) -> torch.Tensor:
    return encode_unit(x, *encode_tables(signed))


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=200),
       st.booleans())
@settings(max_examples=300)
def test_lookup_equals_bucketize_on_any_float32(values, signed):
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(lookup_encode(x, signed), reference_encode(x, signed))


@given(st.integers(0, 2**31), st.floats(1e-12, 1e6), st.booleans())
@settings(max_examples=60)
def test_lookup_equals_bucketize_on_normalised_blocks(seed, scale, signed):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed magnitudes: every decade of the map gets hits
    x = torch.randn(4096, generator=g) * torch.exp(torch.randn(4096, generator=g) * 4) * scale
    if not signed:
        x = x.abs()
    x = x / x.abs().max()
    assert torch.equal(lookup_encode(x, signed), reference_encode(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_lookup_at_every_boundary_and_on_a_key_sweep(signed):
    """Each decision boundary, its float32 neighbours, the specials, and every 2**12-th float32 of [-1, 1]."""
    b = _midpoints(dynamic_map(signed))
    near = torch.cat([b, torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, torch.tensor(-2.0)),
                      torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, float("nan"), -float("nan"),
                                    float("inf"), -float("inf"), 3.0, -3.0])])
    lo, hi = int(order_key(torch.tensor([-1.0]))[0]), int(order_key(torch.tensor([1.0]))[0])
    keys = torch.arange(lo, hi + 1, 2**12, dtype=torch.int64).to(torch.int32)
    sweep = torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys).view(torch.float32)
    x = torch.cat([near, sweep])
    assert torch.equal(lookup_encode(x, signed), reference_encode(x, signed))


@pytest.mark.parametrize("shape, signed", [((3, 700), True), ((2, 1500), False), ((5, 128), True)])
def test_from_float_codes_equal_the_bucketize_encoder(shape, signed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 1e-3
    if not signed:
        x = x * x
    enc = Blockwise8bit(shape, signed, block=256, min_numel=0)
    enc.from_float(x)
    # the old from_float, spelled out
    from qgalore_dist.quant.groups import from_groups, group_absmax, to_groups
    absmax = group_absmax(x, 256)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    ref = from_groups(reference_encode(to_groups(x, 256) / safe.unsqueeze(-1), signed).to(torch.uint8), shape[1])
    assert torch.equal(enc.codes, ref) and torch.equal(enc.absmax, absmax)
