"""bf16 storage of dense parameters with fp32 compute (CPU): the stochastic rounding, the chunked dense step and
a tiny LLaMA trained that way against the fp32-stored reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_llama, token_batches, train
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer
from qgalore_dist.nn.convert import quantize_model
from qgalore_dist.nn.dense_storage import UpcastLinear, store_dense_params
from qgalore_dist.optim.dense_adamw import dense_adamw_step, init_dense_state
from qgalore_dist.quant.bf16 import stochastic_round_bf16


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each fp32 value in magnitude (truncate / truncate + 1 ulp)."""
    bits = x.view(torch.int32)
    down = (bits & ~0xFFFF).view(torch.float32)
    up = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    return down, up


finite32 = st.floats(min_value=-(2.0 ** 100), max_value=2.0 ** 100, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite32, min_size=1, max_size=64), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_sr_lands_on_a_neighbour_and_is_deterministic(vals, k1, k2):
    x = torch.tensor(vals, dtype=torch.float32)
    out = stochastic_round_bf16(x, (k1, k2))
    assert out.dtype == torch.bfloat16
    down, up = _neighbours(x)
    o = out.float()
    assert bool(((o == down) | (o == up)).all())
    exact = (x.view(torch.int32) & 0xFFFF) == 0
    assert torch.equal(o[exact], x[exact])  # representable values never move
    assert torch.equal(out, stochastic_round_bf16(x, (k1, k2)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 200), st.integers(0, 500), st.integers(0, 2**32 - 1))
def test_sr_chunk_offsets_draw_like_the_whole(n, cut, k):
    x = torch.randn(n) * 3
    cut = min(cut, n)
    key = (k, k ^ 0x5A5A)
    whole = stochastic_round_bf16(x, key)
    parts = torch.cat([stochastic_round_bf16(x[:cut], key, 0), stochastic_round_bf16(x[cut:], key, cut)])
    assert torch.equal(whole, parts)


def test_sr_is_unbiased_where_nearest_is_stuck():
    # 1 + 1e-3 lies between bf16 1.0 and 1.0078125: nearest rounding returns 1.0 every time
    x = torch.full((200_000,), 1.0 + 1e-3)
    assert torch.equal(x.to(torch.bfloat16).float(), torch.ones_like(x))
    mean = stochastic_round_bf16(x, (7, 11)).float().mean().item()
    # binomial: p = 0.128, σ of the mean = 0.0078 * sqrt(p (1 - p) / n) ≈ 5.8e-6
    assert abs(mean - (1.0 + 1e-3)) < 4e-5
    x = -x  # and for negative values
    assert abs(stochastic_round_bf16(x, (7, 11)).float().mean().item() + (1.0 + 1e-3)) < 4e-5


@pytest.mark.parametrize("bits,fused", [(32, False), (8, False), (8, True)])
def test_chunked_dense_step_equals_one_pass(bits, fused):
    torch.manual_seed(0)
    p0 = torch.randn(96, 512)
    grads = [torch.randn(96, 512) for _ in range(3)]
    out = []
    for chunk in (1 << 30, 3 * 512):  # one pass; 3 rows at a time (uneven last chunk)
        p = p0.clone()
        stt = init_dense_state(p, bits)
        for g in grads:
            dense_adamw_step(p, g, stt, 1e-2, (0.9, 0.999), 1e-8, 0.1, fused=fused, chunk_elems=chunk)
        out.append((p, stt.state_dict()))
    assert torch.equal(out[0][0], out[1][0])
    for k, v in out[0][1]["tensors"].items():
        assert torch.equal(v, out[1][1]["tensors"][k]), k


def test_bf16_dense_step_rounds_stochastically():
    """A norm-like weight at 1.0 with lr 1e-3: nearest rounding never moves it, stochastic rounding does (and
    on average by the fp32 step)."""
    g = torch.full((4096,), -1.0)
    ref = torch.ones(4096)
    st32 = init_dense_state(ref, 32)
    p_near, p_sr = torch.ones(4096, dtype=torch.bfloat16), torch.ones(4096, dtype=torch.bfloat16)
    s_near, s_sr = init_dense_state(p_near, 32), init_dense_state(p_sr, 32)
    for step in range(1, 6):
        dense_adamw_step(ref, g, st32, 1e-3, (0.9, 0.999), 1e-8, 0.0)
        dense_adamw_step(p_near, g, s_near, 1e-3, (0.9, 0.999), 1e-8, 0.0)
        dense_adamw_step(p_sr, g, s_sr, 1e-3, (0.9, 0.999), 1e-8, 0.0, sr_key=(step, 99))
    assert torch.equal(p_near.float(), torch.ones(4096))
    assert abs(p_sr.float().mean().item() - ref.mean().item()) < 2e-4
    assert ref.mean().item() > 1.004


@pytest.mark.parametrize("chunk_rows", [4096, 20])  # one block; three blocks, the last one short
def test_upcast_linear_matches_fp32_linear(chunk_rows, monkeypatch):
    import qgalore_dist.nn.dense_storage as ds

    monkeypatch.setattr(ds, "_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    ref = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.to(torch.bfloat16).float())
        ref.load_state_dict(lin.state_dict())
    lin.weight.data = lin.weight.data.to(torch.bfloat16)
    lin.bias.data = lin.bias.data.to(torch.bfloat16)
    ref.bias.data = lin.bias.data.float()
    lin.__class__ = UpcastLinear
    x1 = torch.randn(5, 7, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = lin(x1), ref(x2)
    assert y1.dtype == torch.float32
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    assert lin.weight.grad.dtype == torch.bfloat16 and lin.bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(lin.weight.grad.float(), ref.weight.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin.bias.grad.float(), ref.bias.grad, rtol=1e-2, atol=1e-2)


def test_store_dense_params_refuses_unknown_modules_and_keeps_tying():
    m = nn.Sequential(nn.Conv1d(4, 4, 3))
    with pytest.raises(ValueError, match=r"0 \(Conv1d\)"):
        store_dense_params(m, torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="narrower"):
        store_dense_params(tiny_llama(), torch.float32, torch.bfloat16)
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie by hand (the helper builds untied)
    names = store_dense_params(model, torch.bfloat16, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16 and "model.norm.weight" in names


def _train_tiny(dense_dtype: torch.dtype, steps: int = 24) -> tuple[list[float], nn.Module]:
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, seed=0)
    store_dense_params(model, dense_dtype, torch.float32)
    cfg = QGaLoreConfig(rank=8, update_proj_gap=10, lr=3e-3, scale=0.25)
    opt = QGaLoreOptimizer(model, cfg, dense_state_bits=8, layerwise=True, grad_accum=1)
    return train(model, opt, token_batches(steps, batch=4, seq=24)), model


def test_tiny_llama_trains_with_bf16_dense_storage():
    torch.set_num_threads(1)
    ref, _ = _train_tiny(torch.float32)
    losses, model = _train_tiny(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3  # it learns
    # the same trajectory as fp32 storage, up to bf16 storage noise
    assert abs(sum(losses[-4:]) - sum(ref[-4:])) / 4 < 0.05, (losses[-4:], ref[-4:])
    # norm weights start at 1.0 and their lr-3e-3 steps are below half a bf16 ulp: only stochastic rounding
    # moves them
    assert not torch.equal(model.model.norm.weight.float(), torch.ones_like(model.model.norm.weight.float()))


def test_squared_norm_chunks_large_tensors(monkeypatch):
    import qgalore_dist.optim.norms as norms

    t = torch.randn(37, 129)
    assert norms.squared_norm(t) == float(t.double().pow(2).sum())  # one pass: bit-identical
    monkeypatch.setattr(norms, "_CHUNK", 100)  # 48 chunks, the last one short
    assert norms.squared_norm(t) == pytest.approx(float(t.double().pow(2).sum()), rel=1e-12)


def test_row_blocked_apply_equals_whole_matrix_apply(monkeypatch):
    """Large INT8 matrices are re-quantised a block of rows at a time; forcing blocks on a tiny model (left and
    right projections both occur) must give what the whole-matrix path gives: the same update rows and the same
    keyed rounding by global index. A row block's matmul may round its last bit differently from the whole
    matrix's (GEMV vs GEMM kernels), so a scale may differ in its last bit and a rare code by one step. Only the
    step-0 refresh happens (gap 1000): a later SVD would turn such a last-bit difference into another basis on one
    CPU and not on another (it did on AVX-512), so the window is kept free of refreshes."""
    import qgalore_dist.optim.optimizer as optmod

    torch.set_num_threads(1)
    out = []
    for chunk in (1 << 30, 64 * 5 + 1):  # whole matrices; blocks of 5 rows (64 columns) or 1 row (176 columns)
        monkeypatch.setattr(optmod, "_APPLY_CHUNK", chunk)
        torch.manual_seed(0)
        model = tiny_llama()
        quantize_model(model, seed=0)
        cfg = QGaLoreConfig(rank=8, update_proj_gap=1000, lr=3e-3, scale=0.25)
        opt = QGaLoreOptimizer(model, cfg, dense_state_bits=8, layerwise=True, grad_accum=2, grad_clip=1.0)
        train(model, opt, token_batches(8, batch=2, seq=16), accum=2)
        out.append({k: v.clone() for k, v in model.state_dict().items()})
    for k, a in out[0].items():
        b = out[1][k]
        if a.dtype == torch.int8:
            d = (a.int() - b.int()).abs()
            assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3, k
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9, msg=k)
    codes = [k for k in out[0] if k.endswith("weight_codes")]
    assert sum(torch.equal(out[0][k], out[1][k]) for k in codes) >= len(codes) - 1


def test_upcast_embedding_sums_gradients_in_fp32():
    """Many same-sign contributions to one row: a bf16 running sum stalls (each addend falls below half an ulp
    of the total); the fp32 per-token sum rounded once stays within bf16 precision."""
    from qgalore_dist.nn.dense_storage import UpcastEmbedding

    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=3)
    ref = nn.Embedding(50, 16, padding_idx=3)
    with torch.no_grad():
        emb.weight.copy_(emb.weight.to(torch.bfloat16).float())
    ref.load_state_dict(emb.state_dict())
    store_dense_params(nn.Sequential(emb), torch.bfloat16, torch.float32)
    assert type(emb) is UpcastEmbedding and emb.weight.dtype == torch.bfloat16
    ids = torch.cat([torch.full((20000,), 7), torch.randint(0, 50, (500,))]).reshape(10, -1)
    out, out_ref = emb(ids), ref(ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref)
    (out * 1e-3).sum().backward()
    (out_ref * 1e-3).sum().backward()
    g, gr = emb.weight.grad.float(), ref.weight.grad
    assert emb.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(g, gr, rtol=2 ** -8, atol=0)  # one bf16 rounding of the fp32 sum
    assert torch.equal(g[3], torch.zeros(16))  # padding row gets no gradient
    # what the plain route (upcast after the bf16 gather) would give for row 7: far off
    w = nn.Parameter(emb.weight.detach().clone())
    (nn.functional.embedding(ids, w).float() * 1e-3).sum().backward()
    assert abs(float(w.grad[7, 0]) - float(gr[7, 0])) > 0.05 * abs(float(gr[7, 0]))


def test_norms_that_compute_in_the_weight_dtype_are_refused():
    class CastsDownRMSNorm(nn.Module):  # casts its input to the weight's dtype, as some RMSNorm variants do
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.weight * x.to(self.weight.dtype)

    with pytest.raises(ValueError, match="CastsDownRMSNorm.*computes in torch.bfloat16"):
        store_dense_params(nn.Sequential(CastsDownRMSNorm()), torch.bfloat16, torch.float32)
