"""Projector (SVD / randomized SVD, side rule, project/back) and the convergence-gated refresh."""

from __future__ import annotations

import pytest
import torch

from qgalore_dist.config import QGaLoreConfig
from qgalore_dist.optim.lowrank_adamw import LowRankAdamW
from qgalore_dist.projection.gate import RefreshGate
from qgalore_dist.projection.projector import (
    compute_basis,
    project,
    project_back,
    projection_side,
    randomized_svd,
    subspace_similarity,
)


def lowrank_matrix(m, n, r, seed=0, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + noise * torch.randn(m, n, generator=g)


def test_side_rule_is_galore_std():
    assert projection_side(64, 32) == "right" and projection_side(32, 32) == "right"
    assert projection_side(32, 64) == "left"
    with pytest.raises(ValueError, match="proj_type"):
        projection_side(3, 3, "reverse")


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_project_shapes_and_exact_recovery_of_lowrank_gradient(shape):
    g = lowrank_matrix(*shape, r=4, noise=0.0)
    side = projection_side(*shape)
    basis = compute_basis(g, 4, side)
    r = project(g, basis, side)
    assert r.shape == ((shape[0], 4) if side == "right" else (4, shape[1]))
    back = project_back(r, basis, side, scale=1.0)
    assert torch.allclose(back, g, atol=1e-3 * g.abs().max())
    eye = basis @ basis.mT if side == "right" else basis.mT @ basis
    assert torch.allclose(eye, torch.eye(4), atol=1e-5)


def test_project_back_rows_equal_whole():
    for shape in [(50, 30), (30, 50)]:
        g = torch.randn(*shape)
        side = projection_side(*shape)
        basis = compute_basis(g, 8, side)
        n = project(g, basis, side)
        whole = project_back(n, basis, side, 0.25)
        assert torch.allclose(project_back(n, basis, side, 0.25, row_offset=7, rows=11), whole[7:18])


def test_randomized_svd_does_not_touch_global_rng_and_matches_svd():
    a = lowrank_matrix(300, 200, 16, noise=1e-4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    gen = torch.Generator().manual_seed(5)
    u, s, vh = randomized_svd(a, 16, 8, 2, gen)
    assert torch.equal(before, torch.get_rng_state())
    exact = torch.linalg.svdvals(a)[:16]
    assert torch.allclose(s, exact, rtol=1e-3)
    basis_r = compute_basis(a, 16, "right", "rsvd", generator=torch.Generator().manual_seed(5))
    basis_e = compute_basis(a, 16, "right", "svd")
    assert subspace_similarity(basis_e, basis_r, "right", "overlap") > 0.999
    with pytest.raises(ValueError, match="Generator"):
        compute_basis(a, 4, "right", "rsvd")
    with pytest.raises(ValueError, match="projection"):
        compute_basis(a, 4, "right", "qr")
    with pytest.raises(ValueError, match="2-D"):
        compute_basis(torch.zeros(3, 3, 3), 2, "right")


def test_similarity_is_sign_invariant():
    a = torch.randn(60, 30)
    b = compute_basis(a, 5, "right")
    flipped = b.clone()
    flipped[0] *= -1
    assert subspace_similarity(b, flipped, "right", "cos") == pytest.approx(1.0)
    assert subspace_similarity(b, flipped, "right", "overlap") == pytest.approx(1.0, abs=1e-5)  # fp32 basis
    p = compute_basis(a.mT, 5, "left")
    pf = -p
    assert subspace_similarity(p, pf, "left", "cos") == pytest.approx(1.0)


def test_random_subspaces_overlap_about_r_over_n():
    g = torch.Generator().manual_seed(0)
    vals = []
    for _ in range(20):
        q1 = torch.linalg.qr(torch.randn(200, 10, generator=g))[0].mT
        q2 = torch.linalg.qr(torch.randn(200, 10, generator=g))[0].mT
        vals.append(subspace_similarity(q1, q2, "right", "overlap"))
    assert abs(sum(vals) / len(vals) - 10 / 200) < 0.02


def gate_config(**kw):
    base = dict(rank=4, update_proj_gap=2, queue_size=3, gamma_proj=2.0, max_proj_gap=16, cos_threshold=0.4,
                quantize=False)
    base.update(kw)
    return QGaLoreConfig(**base)


def run_gate(grads, config):
    rule = LowRankAdamW(config)
    st = rule.init_state("w", tuple(grads[0].shape))
    w = torch.zeros(*grads[0].shape)
    intervals = []
    for g in grads:
        rule.step(st, w, g, lr=0.0)
        intervals.append(st.gate.interval)
    return st, intervals


def test_gate_doubles_up_to_cap_on_identical_gradients():
    g = torch.randn(40, 20)
    st, intervals = run_gate([g] * 200, gate_config())
    assert intervals[-1] == 16
    assert sorted(set(intervals)) == [2, 4, 8, 16]
    assert st.gate.count == len(st.history) < 200 // 2
    # each lengthening needs queue_size fresh confirmations: refreshes at 0, 2, 4, 6 -> interval 4 after step 6
    steps = [r.step for r in st.history]
    assert steps[:5] == [0, 2, 4, 6, 10]


def test_gate_counts_sign_flipped_vectors_as_similar():
    g = torch.randn(40, 20)
    grads = [g if i % 4 < 2 else -g for i in range(60)]
    _, intervals = run_gate(grads, gate_config())
    assert intervals[-1] > 2


def test_gate_keeps_interval_on_random_gradients():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(120, 80, generator=gen) for _ in range(40)]
    st, intervals = run_gate(grads, gate_config(similarity="overlap", overlap_threshold=0.5))
    assert set(intervals) == {2} and st.gate.count == 20
    assert all(r.similarity is None or r.similarity < 0.2 for r in st.history)
    st, intervals = run_gate(grads, gate_config(cos_threshold=0.9))
    assert set(intervals) == {2}


def test_gate_disabled_is_fixed_gap_and_records_every_refresh():
    g = torch.randn(40, 20)
    st, intervals = run_gate([g] * 20, gate_config(gate=False))
    assert set(intervals) == {2} and [r.step for r in st.history] == list(range(0, 20, 2))


def test_gate_state_round_trip():
    gate = RefreshGate(4, 0.4, 3, 2.0, 64)
    for s, sim in [(0, None), (4, 0.9), (8, 0.8)]:
        gate.record(s, sim)
    other = RefreshGate(4, 0.4, 3, 2.0, 64)
    other.load_state_dict(gate.state_dict())
    assert other.state_dict() == gate.state_dict() and other.due(12) and not other.due(11)
