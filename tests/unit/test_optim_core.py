"""The Q-GaLore optimizer on one device: galore-torch parity, quantised training, layer-wise mode, gradient
accumulation, clipping, moment rotation, config errors, state round trip."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from conftest import load_galore_adamw
from helpers import tiny_llama, token_batches, train

from qgalore_dist import QGaLoreConfig, QGaLoreOptimizer, quantize_model
from qgalore_dist.nn import QGaLoreLinear, find_target_linears
from qgalore_dist.optim.lowrank_adamw import LowRankAdamW


def codes(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_codes")}


def test_float_mode_matches_galore_torch():
    GaLoreAdamW = load_galore_adamw()
    m1 = tiny_llama()
    m2 = copy.deepcopy(m1)
    targets = [m.weight for m in find_target_linears(m1).values()]
    ids = {id(p) for p in targets}
    others = [p for p in m1.parameters() if id(p) not in ids]
    ref = GaLoreAdamW([{"params": others}, {"params": targets, "rank": 8, "update_proj_gap": 5, "scale": 0.25,
                                            "proj_type": "std"}], lr=2e-3, weight_decay=0.01)
    ours = QGaLoreOptimizer(m2, QGaLoreConfig(rank=8, update_proj_gap=5, scale=0.25, quantize=False, lr=2e-3,
                                              weight_decay=0.01, gate=False))
    batches = token_batches(12)
    l1, l2 = train(m1, ref, batches), train(m2, ours, batches)
    assert l1 == pytest.approx(l2, rel=1e-5)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert ((a - b).norm() / a.norm()).item() <= 1e-5, n
    assert ours.svd_count == len(targets) * 3  # refreshes at steps 0, 5, 10


def quantized_model(dtype=torch.float32, seed=0):
    m = tiny_llama(seed, dtype)
    quantize_model(m, group_size=32, seed=seed)
    return m


def qconfig(**kw):
    base = dict(rank=8, update_proj_gap=10, scale=0.25, lr=5e-3, weight_group_size=32, proj_group_size=32,
                state_min_numel=256, state_block_size=64)
    base.update(kw)
    return QGaLoreConfig(**base)


def test_quantized_mode_trains_and_keeps_int8_storage():
    m = quantized_model()
    assert sum(isinstance(x, QGaLoreLinear) for x in m.modules()) == 14
    opt = QGaLoreOptimizer(m, qconfig(), dense_state_bits=8, stagger_refresh=True)
    losses = train(m, opt, token_batches(50, batch=4))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(b.dtype == torch.int8 for n, b in m.named_buffers() if n.endswith("weight_codes"))
    assert not any(p.dtype == torch.int8 for p in m.parameters())
    mem = opt.memory_bytes()
    # every projector is packed int4: half a byte per element plus one fp32 scale per 32-element row group
    expected_proj = 0
    for pm in opt.matrices:
        st = opt.mstate[pm.name]
        rows, cols = (st.rank, st.shape[1]) if st.side == "right" else (st.shape[0], st.rank)
        expected_proj += (rows * cols + 1) // 2 + rows * -(-cols // min(32, cols)) * 4
    assert mem["projectors"] == expected_proj


def test_layerwise_in_backward_step_equals_step_after_backward():
    batches = token_batches(6)
    a = quantized_model(torch.float64)
    b = copy.deepcopy(a)
    oa = QGaLoreOptimizer(a, qconfig(update_proj_gap=3))
    ob = QGaLoreOptimizer(b, qconfig(update_proj_gap=3), layerwise=True)
    la, lb = train(a, oa, batches), train(b, ob, batches)
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(codes(a).values(), codes(b).values()))
    assert not ob.accum and all(m.weight_grad is None for m in b.modules() if isinstance(m, QGaLoreLinear))


@pytest.mark.parametrize("layerwise", [True, False])
def test_gradient_accumulation_equals_large_batch(layerwise):
    """No refresh inside the window: 4 micro-batches of b == 1 batch of 4b (fp64: codes bit-identical)."""
    first = token_batches(1, batch=8, seed=3)
    big = token_batches(3, batch=8, seed=4)
    small = [x[i * 2:(i + 1) * 2] for x in big for i in range(4)]
    a = quantized_model(torch.float64)
    b = copy.deepcopy(a)
    # fp32 moments: an 8-bit moment code can flip on a 1e-16 difference in summation order
    cfg = qconfig(update_proj_gap=100, state_bits=32)
    oa = QGaLoreOptimizer(a, cfg, layerwise=layerwise, grad_accum=1)
    ob = QGaLoreOptimizer(b, cfg, layerwise=layerwise, grad_accum=4)
    train(a, oa, first)  # step 0 refreshes every matrix from the same gradient in both runs
    train(b, ob, first)
    la = train(a, oa, big)
    lb = train(b, ob, small, accum=4)
    assert la == pytest.approx(lb, rel=1e-6)  # transformers computes the loss in fp32 even for fp64 logits
    ca, cb = codes(a), codes(b)
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12), n


def test_refresh_uses_first_micro_batch_gradient():
    m = quantized_model(torch.float64)
    ref = copy.deepcopy(m)
    opt = QGaLoreOptimizer(m, qconfig(update_proj_gap=100), layerwise=True, grad_accum=2)
    x1, x2 = token_batches(2, seed=9)
    m(input_ids=x1, labels=x1).loss.backward()
    m(input_ids=x2, labels=x2).loss.backward()
    opt.step()
    # the basis of every matrix is the SVD of its gradient on x1 alone
    ref_opt = QGaLoreOptimizer(ref, qconfig(update_proj_gap=100))
    (ref(input_ids=x1, labels=x1).loss / 2).backward()
    for pm in ref_opt.matrices:
        st = LowRankAdamW(ref_opt.config).init_state(pm.name, pm.shape)
        LowRankAdamW(ref_opt.config).refresh(st, pm.grad())
        assert torch.equal(st.basis.packed, opt.mstate[pm.name].basis.packed), pm.name


@pytest.mark.parametrize("layerwise", [True, False])
def test_clipping_uses_consumed_gradient_norm(layerwise):
    x = token_batches(1, seed=5)[0]
    base = quantized_model(torch.float64)
    runs = {}
    for clip in (0.0, 1e-3):
        m = copy.deepcopy(base)
        opt = QGaLoreOptimizer(m, qconfig(), layerwise=layerwise, grad_accum=2, grad_clip=clip)
        (m(input_ids=x, labels=x).loss / 2).backward()
        (m(input_ids=x, labels=x).loss / 2).backward()
        expected = None
        if clip:
            sq = sum(float(r.pow(2).sum()) for r in opt.accum.values()) if layerwise else 0.0
            if not layerwise:
                for pm in opt.matrices:
                    st = opt.mstate[pm.name]
                    opt.rule.refresh(st, pm.grad()) if opt.rule.needs_refresh(st) else None
                    sq += float(opt.rule.project(st, pm.grad()).pow(2).sum())
                    st.gate.count, st.gate.next_refresh, st.basis = 0, 0, None
                    st.history.clear()
            sq += sum(float(p.grad.pow(2).sum()) for _, p in opt.dense_named)
            expected = sq ** 0.5
        assert opt.step(lambda: 4.86) == 4.86  # the closure's loss, like torch.optim
        norm = opt.last_step.grad_norm
        runs[clip] = (m, norm)
        if clip:
            assert norm == pytest.approx(expected, rel=1e-9)
        else:
            assert norm > 0  # measured even when not clipping
    (m0, _), (m1, _) = runs[0.0], runs[1e-3]
    # Adam is scale invariant at step 1 except through eps: clip by 1e-3 must still change the dense update
    emb0, emb1 = m0.model.embed_tokens.weight, m1.model.embed_tokens.weight
    assert not torch.allclose(emb0, emb1)


def test_step_halves_are_the_one_orchestration():
    """Every placement steps through QGaLoreBase.step (no placement re-implements it), and the halves an engine
    drives itself (DeepSpeed: its dense norm² added in shared_norm) equal step() with that norm² folded in."""
    from qgalore_dist.optim.optimizer import QGaLoreBase
    from qgalore_dist.parallel.deepspeed_sidecar import SidecarQGaLoreOptimizer
    from qgalore_dist.parallel.row_sharded import RowShardedQGaLoreOptimizer
    from qgalore_dist.parallel.sharded_optimizer import ShardedQGaLoreOptimizer

    for cls in (QGaLoreOptimizer, ShardedQGaLoreOptimizer, SidecarQGaLoreOptimizer, RowShardedQGaLoreOptimizer):
        for name in ("step", "begin_step", "shared_norm", "finish_step"):
            # unwrapped: torch.optim.Optimizer patches a subclass's step with its hook wrapper on first use
            assert inspect.unwrap(getattr(cls, name)) is inspect.unwrap(getattr(QGaLoreBase, name)), \
                (cls.__name__, name)

    base = quantized_model()
    x = token_batches(1)[0]
    norms = []
    for extra in (0.0, 9.0):
        m = copy.deepcopy(base)
        opt = QGaLoreOptimizer(m, qconfig(), grad_clip=1e-3)
        m(input_ids=x, labels=x).loss.backward()
        share = opt.begin_step()
        with pytest.raises(RuntimeError, match="twice"):
            opt.begin_step()
        norm, coef = opt.shared_norm(extra)
        assert norm == pytest.approx((share + extra) ** 0.5, rel=1e-12)
        assert opt.finish_step(coef).clip_coef == coef == pytest.approx(1e-3 / (norm + 1e-6))
        with pytest.raises(RuntimeError, match="without begin_step"):
            opt.finish_step()
        norms.append(opt.last_step.grad_norm)
    assert norms[1] ** 2 == pytest.approx(norms[0] ** 2 + 9.0, rel=1e-12)


def _poisoned_run(batches, projection: str, poison: int | None, everywhere: bool):
    model = tiny_llama(seed=0)
    quantize_model(model, seed=0)
    opt = QGaLoreOptimizer(model, QGaLoreConfig(rank=8, update_proj_gap=2, lr=1e-2, projection=projection),
                           grad_clip=1.0, dense_state_bits=8)
    skipped = []
    for i, x in enumerate(batches):
        loss = model(input_ids=x, labels=x).loss
        (loss * float("nan") if i == poison and everywhere else loss).backward()
        if i == poison and not everywhere:
            lin = next(m for m in model.modules() if isinstance(m, QGaLoreLinear))
            lin.weight_grad[1, 2] = float("nan")
        opt.step()
        skipped.append(opt.last_step.skipped)
        opt.zero_grad()
    return model, opt, skipped


@pytest.mark.parametrize("projection", ["svd", "rsvd", "rademacher"])
@pytest.mark.parametrize("bad_step", [0, 2])  # the first refresh, a later one (gap 2)
def test_non_finite_gradients_at_a_refresh_are_a_step_never_taken(projection, bad_step):
    """An overflow in backward on a refresh step (every gradient NaN): the step is skipped — no SVD of a
    non-finite gradient (it raised before), bases, moments and gates untouched, the refreshes still due — so the
    run then equals one that never saw that batch, bit for bit."""
    xs = token_batches(5, batch=2, seed=3)
    model, opt, skipped = _poisoned_run([*xs[:bad_step], xs[0], *xs[bad_step:]], projection, bad_step, True)
    clean, clean_opt, _ = _poisoned_run(xs, projection, None, True)
    assert skipped == [i == bad_step for i in range(len(xs) + 1)]
    assert opt.svd_count == clean_opt.svd_count
    for (k, v), (k2, v2) in zip(model.state_dict().items(), clean.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("bad_step", [0, 2])
def test_one_non_finite_matrix_gradient_at_a_refresh_skips_and_refreshes_next_step(bad_step):
    """Only one matrix's gradient is non-finite: the step is skipped; that matrix keeps its state and refreshes at
    the next step (the others refreshed from the skipped batch's finite gradients: a new subspace, no update)."""
    xs = token_batches(4, batch=2, seed=3)
    model, opt, skipped = _poisoned_run(xs, "svd", bad_step, False)
    assert skipped == [i == bad_step for i in range(len(xs))]
    name = next(n for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)) + ".weight"
    st = opt.mstate[name]
    # refreshed once per due step of its own (optimizer) step count, which a skipped step does not advance: the
    # SVD of the non-finite gradient raised before; now the refresh waits for the next (finite) window
    assert [r.step for r in st.history] == [0, 2]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_rotate_moments_keeps_second_moment_non_negative():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(30, 20, generator=gen) for _ in range(5)]
    for mode in ("square", "reset", "keep"):
        cfg = QGaLoreConfig(rank=4, update_proj_gap=2, quantize=False, moments_on_refresh="rotate",
                            second_moment_on_rotate=mode, gate=False)
        rule = LowRankAdamW(cfg)
        st = rule.init_state("w", (30, 20))
        for g in grads:  # refreshes at steps 0, 2, 4
            rule.step(st, torch.zeros(30, 20), g, lr=1e-3)
        v = st.exp_avg_sq.to_float()
        assert torch.all(v >= 0)
        if mode == "reset":  # reset at the step-4 refresh, then one update: v = (1 - β2) R²
            r = rule.project(st, grads[-1])
            assert torch.allclose(v, (1 - cfg.betas[1]) * r * r)
    # the first moment is carried into the new basis: same subspace with flipped signs -> same up to sign
    cfg = QGaLoreConfig(rank=3, update_proj_gap=1, quantize=False, moments_on_refresh="rotate", gate=False)
    rule = LowRankAdamW(cfg)
    st = rule.init_state("w", (20, 12))
    g = torch.randn(20, 12, generator=gen)
    rule.step(st, torch.zeros(20, 12), g, lr=0.0)
    m_before = st.exp_avg.to_float().clone()
    rule.refresh(st, -g)
    assert torch.allclose(st.exp_avg.to_float().abs(), m_before.abs(), atol=1e-5)


def test_state_dict_round_trip_continues_identically():
    batches = token_batches(8)
    a = quantized_model(torch.float64)
    oa = QGaLoreOptimizer(a, qconfig(update_proj_gap=3), dense_state_bits=8)
    train(a, oa, batches[:4])
    b = copy.deepcopy(a)
    ob = QGaLoreOptimizer(b, qconfig(update_proj_gap=3), dense_state_bits=8)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert train(a, oa, batches[4:]) == train(b, ob, batches[4:])
    assert all(torch.equal(x, y) for x, y in zip(codes(a).values(), codes(b).values()))
    with pytest.raises(ValueError, match="format"):
        ob.load_state_dict({})
    bad = copy.deepcopy(oa.state_dict())
    bad["projected"].pop(next(iter(bad["projected"])))
    with pytest.raises(ValueError, match="missing"):
        ob.load_state_dict(bad)


@pytest.mark.parametrize("kw, field", [
    ({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"weight_group_size": 0}, "weight_group_size"),
    ({"projection": "qr"}, "projection"), ({"similarity": "angle"}, "similarity"),
    ({"cos_threshold": 1.5}, "cos_threshold"), ({"overlap_threshold": -0.1}, "overlap_threshold"),
    ({"gamma_proj": 0.5}, "gamma_proj"), ({"betas": (0.9, 1.0)}, "betas"), ({"max_proj_gap": 10}, "max_proj_gap"),
    ({"proj_type": "full"}, "proj_type"), ({"queue_size": 0}, "queue_size"),
])
def test_config_errors_name_the_parameter(kw, field):
    with pytest.raises(ValueError) as e:
        QGaLoreConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg
    assert str(list(kw.values())[0])[:3] in msg


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown qgalore setting"):
        QGaLoreConfig.from_dict({"rnak": 4})
    assert QGaLoreConfig.from_dict(QGaLoreConfig(rank=7).to_dict()).rank == 7


def test_non_2d_and_rank_clamp_warning():
    rule = LowRankAdamW(QGaLoreConfig())
    with pytest.raises(ValueError, match="2-D"):
        rule.init_state("w", (4, 4, 4))
    m = quantized_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = QGaLoreOptimizer(m, qconfig(rank=40))
    clamp = [w for w in caught if "clamped" in str(w.message)]
    assert len(clamp) == 1 and "k_proj" in str(clamp[0].message) and "q_proj" not in str(clamp[0].message)
    assert opt.mstate["model.layers.0.self_attn.k_proj.weight"].rank == 32
    with pytest.raises(ValueError, match="quantize_model"):
        QGaLoreOptimizer(tiny_llama(), qconfig())
