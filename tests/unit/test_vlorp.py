"""VLoRP: projection granularity, seeded random projections, and the ProjFactor rule (CPU, whole file < 60 s)."""

from __future__ import annotations

import copy
import hashlib
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import load_galore_adamw
from helpers import tiny_llama, token_batches, train

from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer, quantize_model
from qgalore_dist.optim.lowrank_adamw import LowRankAdamW
from qgalore_dist.optim.projfactor import ProjFactor, ProjFactorState, projfactor_numel
from qgalore_dist.optim.rules import make_rule
from qgalore_dist.projection.projector import projection_side
from qgalore_dist.projection.random_proj import RandomBasis
from qgalore_dist.projection.vlorp import (
    check_rank_fits,
    from_granular,
    granular_rows,
    granular_shape,
    resolve_granularity,
    to_granular,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on an oversubscribed 2-core box spin in OpenMP: one thread is ~50x faster here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fcfg(**kw):
    base = dict(rank=4, update_proj_gap=3, scale=0.25, quantize=False, gate=False, lr=1e-2, fused=False)
    base.update(kw)
    return QGaLoreConfig(**base)


def grads(shape, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(k)]


# --- granularity -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_c1_is_galore_bit_for_bit(shape):
    """granularity=1 (explicitly, config and per matrix) reproduces galore-torch's GaLoreAdamW exactly."""
    GaLoreAdamW = load_galore_adamw()
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(w0.clone())
    ref = GaLoreAdamW([{"params": [p], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}],
                      lr=1e-2, weight_decay=0.01)
    rule = LowRankAdamW(fcfg(weight_decay=0.01, granularity=1))
    st = rule.init_state("w", shape, granularity=1.0)
    w = w0.clone()
    for g in grads(shape, 7):  # refreshes at steps 0, 3, 6
        p.grad = g.clone()
        ref.step()
        rule.step(st, w, g, lr=1e-2)
        assert torch.equal(p.data, w)
    g = grads(shape, 1, seed=5)[0]
    assert to_granular(g, shape) is g and from_granular(g, *shape) is g  # c = 1 never touches the tensor
    # c = 2 takes another path (sanity: the comparison above is not vacuous)
    rule2 = LowRankAdamW(fcfg(weight_decay=0.01, granularity=2))
    st2 = rule2.init_state("w", shape)
    w2 = w0.clone()
    rule2.step(st2, w2, g, lr=1e-2)
    assert st2.exp_avg.shape == ((96, 4) if shape[0] >= shape[1] else (4, 96))
    assert not torch.equal(w2, w0)


@pytest.mark.parametrize("c", [0.25, 0.5, 2.0, 4.0])
@pytest.mark.parametrize("shape", [(32, 16), (16, 32)])
def test_granular_reshape_round_trip_and_row_map(shape, c):
    m, n = shape
    side = projection_side(m, n)
    ps = granular_shape(m, n, side, c)
    if side == "right":
        assert ps == (int(m * c), int(n / c))
    else:
        assert ps == (int(m / c), int(n * c))
    g = torch.randn(m, n)
    gg = to_granular(g, ps)
    assert gg.shape == ps and torch.equal(from_granular(gg, m, n), g)
    # weight rows [o, o + k) are exactly the reshaped rows granular_rows() names (row shards stay shards)
    o, k = 8, 8
    go, gk = granular_rows(o, k, m, ps[0])
    assert torch.equal(gg[go:go + gk].reshape(k, n), g[o:o + k])


def test_granularity_errors_are_clear():
    with pytest.raises(ValueError, match=r"needs 2 to divide n=5461"):
        granular_shape(2048, 5461, "left", 0.5, "down_proj")  # LLaMA-1B MLP width
    with pytest.raises(ValueError, match=r"needs 4 to divide n=30"):
        granular_shape(64, 30, "right", 4.0)
    with pytest.raises(ValueError, match=r"rank 8 does not fit .* 4×512"):
        check_rank_fits(32, 64, "left", 8.0, 8, "k_proj")
    for bad in (3, 0.3, 0, -2, "2"):
        with pytest.raises(ValueError) as e:
            QGaLoreConfig(granularity=bad)
        assert str(e.value).startswith("granularity=") and "power of two" in str(e.value)
    for kw, field in [({"optimizer": "sgd"}, "optimizer"), ({"projection": "sparse"}, "projection")]:
        with pytest.raises(ValueError, match=f"^{field}="):
            QGaLoreConfig(**kw)
    assert QGaLoreConfig(granularity=2).granularity == 2.0
    assert QGaLoreConfig.from_dict(QGaLoreConfig(granularity=0.5, optimizer="projfactor").to_dict()).granularity == 0.5
    # a rule refuses a matrix that cannot take c
    with pytest.raises(ValueError, match="needs 4 to divide m=90"):
        LowRankAdamW(fcfg(granularity=0.25)).init_state("gate_proj", (90, 64))


def test_granularity_fallback_model_level():
    shapes = {"attn": (64, 64), "gate": (90, 64), "down": (64, 90)}
    with pytest.raises(ValueError) as e:
        resolve_granularity(shapes, 0.25, 8)
    msg = str(e.value)
    assert "gate [90, 64]" in msg and "down [64, 90]" in msg and "attn" not in msg
    assert "granularity_fallback=True" in msg and "\n" not in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = resolve_granularity(shapes, 0.25, 8, fallback=True)
    assert got == {"attn": 0.25, "gate": 1.0, "down": 1.0}
    assert len(caught) == 1 and "gate" in str(caught[0].message) and "down" in str(caught[0].message)
    # through the optimizer: the fallback matrices run at c = 1, the others at c
    model = tiny_llama(layers=1, inter=90)
    with pytest.raises(ValueError, match="mlp.gate_proj"):
        QGaLoreOptimizer(model, fcfg(rank=8, granularity=0.25))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = QGaLoreOptimizer(model, fcfg(rank=8, granularity=0.25, granularity_fallback=True))
    assert len([w for w in caught if "fall back" in str(w.message)]) == 1
    grans = {n.split(".")[-2]: st.granularity for n, st in opt.mstate.items()}
    assert grans == {"q_proj": 0.25, "k_proj": 0.25, "v_proj": 0.25, "o_proj": 0.25, "gate_proj": 1.0,
                     "up_proj": 1.0, "down_proj": 1.0}


@pytest.mark.parametrize("optimizer", ["adamw", "projfactor"])
@pytest.mark.parametrize("projection", ["svd", "gaussian"])
def test_row_shards_equal_whole(optimizer, projection):
    """apply_rows on row shards (global offsets) == the whole matrix, at c < 1 and c > 1, both sides."""
    for shape, c in [((32, 16), 2.0), ((32, 16), 0.5), ((16, 32), 2.0), ((16, 32), 0.5)]:
        cfg = fcfg(granularity=c, projection=projection, optimizer=optimizer)
        rule = make_rule(cfg)
        st = rule.init_state("w", shape)
        g = grads(shape, 1)[0]
        rule.refresh(st, g)
        n, step_size = rule.normalise(st, rule.project(st, g), 1e-2)
        whole = torch.zeros(shape)
        rule.apply_rows(st, whole, n, step_size, 1e-2)
        for off in (0, 4, 12):
            part = torch.zeros(4, shape[1])
            rule.apply_rows(st, part, n, step_size, 1e-2, row_offset=off)
            assert torch.allclose(part, whole[off:off + 4], rtol=1e-6, atol=1e-7), (shape, c, off)
        if optimizer == "projfactor":  # partial factor sums over shards add up to the whole
            r = rule.project(st, g)
            rows_w, cols_w = rule.factor_sums(st, r)
            half = shape[0] // 2
            parts = [rule.factor_sums(st, r, off, half) for off in (0, half)]
            assert torch.allclose(torch.cat([p[0] for p in parts]), rows_w)
            assert torch.allclose(parts[0][1] + parts[1][1], cols_w, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2"):
        granular_rows(3, 4, 32, 16)


# --- random projections ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_projection_is_unbiased(kind):
    r, d, draws = 8, 16, 400
    acc_r = torch.zeros(d, d, dtype=torch.float64)
    acc_l = torch.zeros(d, d, dtype=torch.float64)
    for s in range(draws):
        q = RandomBasis(kind, 0, s, "w", (r, d), r).dequantize(torch.float64)   # right: Q [r, n']
        p = RandomBasis(kind, 0, s, "w", (d, r), r).dequantize(torch.float64)   # left: P [m', r]
        acc_r += q.mT @ q
        acc_l += p @ p.mT
    eye = torch.eye(d, dtype=torch.float64)
    assert (acc_r / draws - eye).abs().max() < 0.12  # E[QᵀQ] = I: ~5σ for 400 draws of r = 8
    assert (acc_l / draws - eye).abs().max() < 0.12  # E[P Pᵀ] = I
    # through the rule, with granularity 2: back-projection of the projection averages to the gradient
    shape = (32, 16)
    g = grads(shape, 1, dtype=torch.float64)[0]
    rule = LowRankAdamW(fcfg(projection=kind, granularity=2, update_proj_gap=1, scale=1.0))
    st = rule.init_state("w", shape)
    acc = torch.zeros(shape, dtype=torch.float64)
    for s in range(draws):
        st.step = s
        rule.refresh(st, None)  # random projections need no gradient
        acc += rule.update_of_rows(st, rule.project(st, g), torch.float64, 0, shape[0])
    assert ((acc / draws - g).norm() / g.norm()).item() < 0.15  # relative error ~ sqrt(n'/(r·draws)) ≈ 0.09


def test_same_seed_same_projection_in_another_process():
    def digest():
        h = hashlib.sha256()
        for kind in ("gaussian", "rademacher"):
            for shape in ((8, 64), (96, 8)):
                h.update(RandomBasis(kind, 7, 400, "layers.3.mlp.up_proj.weight", shape, 8).dequantize().numpy()
                         .tobytes())
        return h.hexdigest()

    code = ("import hashlib\nfrom qgalore_dist.projection.random_proj import RandomBasis\nh = hashlib.sha256()\n"
            "for kind in ('gaussian', 'rademacher'):\n    for shape in ((8, 64), (96, 8)):\n"
            "        h.update(RandomBasis(kind, 7, 400, 'layers.3.mlp.up_proj.weight', shape, 8).dequantize().numpy()"
            ".tobytes())\nprint(h.hexdigest())\n")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                         check=True)
    assert out.stdout.strip() == digest()
    # and a different step / name / seed gives a different draw
    a = RandomBasis("gaussian", 7, 400, "w", (8, 64), 8).dequantize()
    for other in (RandomBasis("gaussian", 7, 401, "w", (8, 64), 8), RandomBasis("gaussian", 8, 400, "w", (8, 64), 8),
                  RandomBasis("gaussian", 7, 400, "v", (8, 64), 8)):
        assert not torch.equal(a, other.dequantize())
    # a row shard of a left basis draws exactly the whole matrix's rows
    p = RandomBasis("rademacher", 1, 2, "w", (96, 8), 8)
    assert torch.equal(p.rows(40, 16), p.dequantize()[40:56])
    assert torch.allclose(p.dequantize().abs(), torch.full((96, 8), 1 / math.sqrt(8)))


def test_random_refresh_fixed_gap_not_stored_and_checkpointed():
    rule = LowRankAdamW(fcfg(projection="gaussian", update_proj_gap=2, gate=True, quantize=True,
                             moments_on_refresh="rotate", state_bits=32))
    st = rule.init_state("w", (24, 16))
    w = torch.zeros(24, 16)
    for g in grads((24, 16), 9):
        rule.step(st, w, g, lr=1e-3)
    assert [r.step for r in st.history] == [0, 2, 4, 6, 8] and {r.interval for r in st.history} == {2}
    assert all(r.similarity is None for r in st.history)
    assert st.state_bytes()["projector"] == 0 and isinstance(st.basis, RandomBasis) and st.basis.step == 8
    d = st.state_dict()
    assert "basis" not in d["tensors"] and d["meta"]["random_basis"] == {"kind": "gaussian", "seed": 0, "step": 8}
    other = rule.init_state("w", (24, 16))
    other.load_state_dict(copy.deepcopy(d), 32)
    assert torch.equal(other.basis_float(), st.basis_float())


# --- ProjFactor --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (176, 64), (64, 176)])
def test_projfactor_state_matches_formula(shape, c):
    m, n = shape
    r = 4
    rule = ProjFactor(fcfg(rank=r, granularity=c, projection="rademacher", quantize=True, state_bits=32))
    st = rule.init_state("w", shape)
    rule.refresh(st, None)
    numel = st.state_numel()
    assert numel["first_moment"] + numel["factors"] == projfactor_numel(m, n, r, c) == max(m, n) * c * r + m + n
    assert numel["accumulator"] == max(m, n) * c * r
    sb = st.state_bytes()
    assert sb["projector"] == 0 and sb["moments"] == 4 * projfactor_numel(m, n, r, c)
    assert isinstance(st, ProjFactorState) and st.exp_avg_sq is None


def reference_projfactor(w, gs, cfg):
    """ProjFactor written out on full matrices (float64), right projection, c = 2, random basis, transfer on."""
    b1, b2 = cfg.betas
    m, n = w.shape
    c = int(cfg.granularity)
    mom = torch.zeros(m * c, cfg.rank, dtype=torch.float64)
    a, b = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    q_old = None
    for t, g in enumerate(gs, start=1):
        step = t - 1
        if step % cfg.update_proj_gap == 0:
            q = RandomBasis(cfg.projection, cfg.seed, step, "w", (cfg.rank, n // c), cfg.rank).dequantize(
                torch.float64)
            if q_old is not None:
                mom = mom @ (q_old @ q.mT)
            q_old = q
        rg = g.reshape(m * c, n // c) @ q_old.mT
        gh = (rg @ q_old).reshape(m, n)
        mom = b1 * mom + (1 - b1) * rg
        a = b2 * a + (1 - b2) * (gh * gh).mean(1)
        b = b2 * b + (1 - b2) * (gh * gh).mean(0)
        v = a[:, None] * b[None, :] / a.mean()
        upd = (mom @ q_old).reshape(m, n) / (v.sqrt() + cfg.eps)
        w = w - cfg.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * cfg.scale * upd
        w = w - cfg.lr * cfg.weight_decay * w
    return w


def test_projfactor_matches_written_out_reference_and_round_trips():
    cfg = fcfg(rank=4, granularity=2, projection="gaussian", optimizer="projfactor", update_proj_gap=2,
               weight_decay=0.01)
    gs = grads((24, 16), 5, dtype=torch.float64)
    w0 = torch.randn(24, 16, dtype=torch.float64)
    rule = make_rule(cfg)
    st = rule.init_state("w", (24, 16), dtype=torch.float64)
    w = w0.clone()
    for g in gs[:3]:
        rule.step(st, w, g, lr=cfg.lr)
    saved = copy.deepcopy(st.state_dict())
    w_saved = w.clone()
    for g in gs[3:]:
        rule.step(st, w, g, lr=cfg.lr)
    assert torch.allclose(w, reference_projfactor(w0, gs, cfg), rtol=1e-10, atol=1e-12)
    # checkpoint round trip continues identically
    st2 = rule.init_state("w", (24, 16), dtype=torch.float64)
    st2.load_state_dict(saved, 32)
    for g in gs[3:]:
        rule.step(st2, w_saved, g, lr=cfg.lr)
    assert torch.equal(w_saved, w)
    with pytest.raises(ValueError, match="holds adamw state, this run uses projfactor"):
        st2.load_state_dict(LowRankAdamW(cfg).init_state("w", (24, 16)).state_dict(), 32)


def test_projfactor_momentum_transfer_option():
    g = grads((20, 12), 1)[0]
    for transfer in (True, False):
        rule = ProjFactor(fcfg(rank=3, update_proj_gap=1, projfactor_momentum_transfer=transfer))
        st = rule.init_state("w", (20, 12))
        rule.step(st, torch.zeros(20, 12), g, lr=0.0)
        before = st.exp_avg.to_float().clone()
        rule.refresh(st, -g)  # same subspace, singular vectors may flip sign
        after = st.exp_avg.to_float()
        if transfer:  # carried into the new basis: the back-projected momentum is unchanged
            assert torch.allclose(rule.back_rows(st, after, torch.float32), before @ compute_q(g, 3), atol=1e-5)
        else:
            assert torch.equal(after, before)


def compute_q(g, r):
    from qgalore_dist.projection.projector import compute_basis
    return compute_basis(g, r, "right")


def quantized_model(dtype=torch.float32, seed=0):
    m = tiny_llama(seed, dtype, layers=1)
    quantize_model(m, group_size=32, seed=seed)
    return m


def qcfg(**kw):
    base = dict(rank=8, update_proj_gap=10, scale=0.25, lr=5e-3, weight_group_size=32, proj_group_size=32,
                state_min_numel=256, state_block_size=64, optimizer="projfactor", fused=False)
    base.update(kw)
    return QGaLoreConfig(**base)


def test_projfactor_gradient_accumulation_equals_large_batch():
    """4 micro-batches of b == 1 batch of 4b (fp64, fp32 moments) — across a resampling step: a random basis is
    drawn once per optimizer step, never per micro-batch."""
    big = token_batches(3, batch=8, seed=4)
    small = [x[i * 2:(i + 1) * 2] for x in big for i in range(4)]
    a = quantized_model(torch.float64)
    b = copy.deepcopy(a)
    cfg = qcfg(update_proj_gap=2, state_bits=32, projection="gaussian", granularity=2)
    oa = QGaLoreOptimizer(a, cfg, layerwise=True, grad_accum=1)
    ob = QGaLoreOptimizer(b, cfg, layerwise=True, grad_accum=4)
    la = train(a, oa, big)
    name = ob.matrices[0].name
    x = small[0]
    b(input_ids=x, labels=x).loss.backward()  # one micro-batch: the accumulator is a projected gradient
    assert ob.accum[name].numel() == ob.mstate[name].state_numel()["accumulator"]
    ob.zero_grad()
    lb = train(b, ob, small, accum=4)
    assert la == pytest.approx(lb, rel=1e-6)
    ca = {n: t for n, t in a.named_buffers() if n.endswith("weight_codes")}
    cb = {n: t for n, t in b.named_buffers() if n.endswith("weight_codes")}
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert [r.step for r in ob.mstate[name].history] == [0, 2]


def test_projfactor_trains_tiny_llama_int8():
    m = quantized_model()
    opt = QGaLoreOptimizer(m, qcfg(projection="gaussian", granularity=2, update_proj_gap=10), dense_state_bits=8)
    assert isinstance(opt.rule, ProjFactor)
    losses = train(m, opt, token_batches(40, batch=4))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(t.dtype == torch.int8 for n, t in m.named_buffers() if n.endswith("weight_codes"))
    mem = opt.memory_bytes()
    assert mem["projectors"] == 0  # random bases are regenerated, never stored


def test_lowrank_lion_is_a_rule_in_one_file():
    """optim/lion.py: one step by hand — u = sign(β1·m + (1−β1)·R), m ← β2·m + (1−β2)·R, W ← W − lr·scale·project_back(u)
    — on a float matrix, and the state has one moment."""
    from qgalore_dist import QGaLoreConfig
    from qgalore_dist.optim.lion import LowRankLion

    cfg = QGaLoreConfig(rank=4, quantize=False, optimizer="lion", lr=1e-2, scale=0.5, betas=(0.9, 0.99))
    rule = make_rule(cfg)
    assert isinstance(rule, LowRankLion)
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 8, generator=g, dtype=torch.float64)
    grads = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    st = rule.init_state("w", (12, 8), dtype=torch.float64)
    assert st.exp_avg_sq is None and st.state_bytes()["moments"] == st.exp_avg.nbytes()
    w = w0.clone()
    m = torch.zeros(12, 4, dtype=torch.float64)
    want = w0.clone()
    for grad in grads:
        rule.step(st, w, grad, lr=1e-2)
        q = st.basis_float(torch.float64)  # right projection: R = G Qᵀ
        r = grad @ q.mT
        u = torch.sign(0.9 * m + 0.1 * r)
        m = 0.99 * m + 0.01 * r
        want = want - 1e-2 * 0.5 * (u @ q)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(st.exp_avg.to_float(torch.float64), m, rtol=0, atol=1e-12)


def test_a_rule_refuses_another_rules_state():
    """State dicts say which rule wrote them: AdamW, ProjFactor and Lion states do not load into each other."""
    from qgalore_dist import QGaLoreConfig

    states = {}
    for name in ("adamw", "projfactor", "lion"):
        rule = make_rule(QGaLoreConfig(rank=4, quantize=False, optimizer=name))
        states[name] = (rule, rule.init_state("w", (12, 8)))
    for a, (_, sa) in states.items():
        for b, (_, sb) in states.items():
            if a == b:
                sb.load_state_dict(sa.state_dict(), 256)
            else:
                with pytest.raises(ValueError, match=f"holds {a} state, this run uses {b}"):
                    sb.load_state_dict(sa.state_dict(), 256)
