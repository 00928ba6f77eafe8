"""8-bit dense AdamW state over DeepSpeed's flat ZeRO partitions equals the single-device state (issue 14).

ZeRO hands its client optimizer flat slices that cut parameters anywhere; :class:`FlatDenseAdamW` maps them back
to parameter rows (:func:`~qgalore_dist.parallel.deepspeed_sidecar.zero_fragments`' fragments) and agrees the scale
of every block a boundary cuts with a max over the ranks. Simulated here without DeepSpeed: N "ranks" are threads
holding ZeRO-1/2-style partitions of one concatenated flat buffer, or ZeRO-3-style per-parameter partitions, and
``reduce_max`` is a max over the threads. Exact by construction: every parameter's columns are a multiple of 64 —
a whole number of torch's widest unrolled element-wise loop (2 vectors of 16 floats on AVX-512, 2 × 8 on AVX2) —
and every tensor is small (one thread), so a piece of whole rows and the whole tensor take the same vector path for
every element, with no scalar tail (which may round an FMA differently); the one 5-element parameter (it shifts
the ZeRO-1/2 boundaries off the blocks) is below one unrolled loop, so scalar whole and in pieces alike. Codes,
scales and weights compare bitwise.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgalore_dist.optim.dense_adamw import dense_adamw_step, init_dense_state
from qgalore_dist.parallel.deepspeed_sidecar import FlatDenseAdamW, Fragment, _rows_cols, cut_groups

BLOCK, MIN_NUMEL = 48, 200  # blocks of 48 in rows of 64k columns: partition boundaries cut blocks
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _partition(numels, world, mode):
    """Per rank: [(param, start, length, offset)] and the flat size — ZeRO-1/2 (one concatenated buffer cut into N
    equal partitions) or ZeRO-3 (each parameter cut into ceil(numel / N) pieces)."""
    ranks = [[] for _ in range(world)]
    sizes = [0] * world
    if mode == "zero12":
        total = sum(numels)
        part = -(-total // world)
        base = 0
        for i, n in enumerate(numels):
            for r in range(world):
                lo, hi = max(base, r * part), min(base + n, (r + 1) * part)
                if lo < hi:
                    ranks[r].append((i, lo - base, hi - lo, lo - r * part))
            base += n
        sizes = [part] * world
    else:
        for i, n in enumerate(numels):
            pn = -(-n // world)
            for r in range(world):
                length = max(0, min(pn, n - r * pn))
                if length:
                    ranks[r].append((i, r * pn, length, sizes[r]))
                sizes[r] += pn
    return ranks, sizes


def _run(shapes, world, mode, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    # reference: the single-device dense step on each whole parameter
    ref = [p.clone() for p in params]
    ref_st = [init_dense_state(p, 8, BLOCK, MIN_NUMEL) for p in ref]
    for k in range(steps):
        for p, g, s in zip(ref, grads[k], ref_st):
            dense_adamw_step(p, g, s, **HYPER)

    numels = [p.numel() for p in params]
    parts, sizes = _partition(numels, world, mode)
    frags = [[Fragment(i, *_rows_cols(shapes[i]), numels[i], a, n, off) for i, a, n, off in mine] for mine in parts]
    cuts = cut_groups(frags, BLOCK, lambda n: n >= MIN_NUMEL)
    barrier = threading.Barrier(world)
    shared = {}

    def reduce_max(rank):
        def fn(t):
            shared[rank] = t.clone()
            barrier.wait()
            t.copy_(torch.stack([shared[r] for r in range(world)]).amax(0))
            barrier.wait()
        return fn

    flats, opts, errors = [], [], []
    for r in range(world):
        flat = torch.zeros(sizes[r])
        for f in frags[r]:
            flat[f.offset:f.offset + f.length] = params[f.param].reshape(-1)[f.start:f.start + f.length]
        opt = FlatDenseAdamW([flat], lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                             weight_decay=HYPER["weight_decay"], state_bits=8, block=BLOCK, min_numel=MIN_NUMEL)
        opt.bind_fragments({id(flat): frags[r]}, cuts, reduce_max(r))
        flats.append(flat)
        opts.append(opt)

    def rank_main(r):
        try:
            for k in range(steps):
                g = torch.zeros(sizes[r])
                for f in frags[r]:
                    g[f.offset:f.offset + f.length] = grads[k][f.param].reshape(-1)[f.start:f.start + f.length]
                flats[r].grad = g
                opts[r].step()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ref, ref_st, frags, flats, opts, cuts


def _check(shapes, world, mode):
    ref, ref_st, frags, flats, opts, cuts = _run(shapes, world, mode)
    seen = set()
    for r in range(world):
        for f, fst in zip(frags[r], opts[r].dense[id(flats[r])]):
            # weights: bitwise
            got = flats[r][f.offset:f.offset + f.length]
            want = ref[f.param].reshape(-1)[f.start:f.start + f.length]
            assert torch.equal(got, want), (r, f)
            ra = f.start // f.cols
            nrows = fst.exp_avg.shape[0]
            for mine, theirs in ((fst.exp_avg, ref_st[f.param].exp_avg), (fst.exp_avg_sq, ref_st[f.param].exp_avg_sq)):
                assert mine.quantized == theirs.quantized == (f.numel >= MIN_NUMEL)
                # held elements' moments decode to the reference's, and their codes are the reference's
                a = f.start - ra * f.cols
                got_v = mine.to_float().reshape(-1)[a:a + f.length]
                want_v = theirs.to_float().reshape(-1)[f.start:f.start + f.length]
                assert torch.equal(got_v, want_v), (r, f, mine.signed)
                if mine.quantized:
                    got_c = mine.codes.reshape(-1)[a:a + f.length]
                    want_c = theirs.codes[ra:ra + nrows].reshape(-1)[a:a + f.length]
                    assert torch.equal(got_c, want_c), (r, f)
                    # every block this fragment touches carries the whole block's scale
                    g0 = (f.start % f.cols) // BLOCK
                    g1 = ((f.start + f.length - 1) % f.cols) // BLOCK
                    for i in range(nrows):
                        lo = g0 if i == 0 else 0
                        hi = g1 if i == nrows - 1 else mine.absmax.shape[1] - 1
                        assert torch.equal(mine.absmax[i, lo:hi + 1], theirs.absmax[ra + i, lo:hi + 1]), (r, f, i)
            seen.add(f.param)
    assert seen == set(range(len(shapes)))
    return cuts


SHAPES = [(5,), (64,), (12, 64), (5, 128), (3, 64), (192,), (7, 64)]


@pytest.mark.parametrize("mode", ["zero12", "zero3"])
@pytest.mark.parametrize("world", [2, 3])
def test_flat_partitions_keep_the_single_device_8bit_state(world, mode):
    cuts = _check(SHAPES, world, mode)
    assert cuts  # the boundaries cut blocks (otherwise the max all-reduce would be untested)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.sampled_from([64, 128, 192])), min_size=1, max_size=5),
       st.integers(2, 4), st.sampled_from(["zero12", "zero3"]))
def test_any_partition_keeps_the_single_device_8bit_state(dims, world, mode):
    _check([(r, c) if r > 1 else (c,) for r, c in dims], world, mode)


def test_fragment_pieces_cover_it_once():
    for start, length, cols in [(0, 48, 16), (5, 40, 16), (16, 16, 16), (3, 5, 16), (0, 7, 16), (20, 30, 16)]:
        f = Fragment(0, 9, cols, 9 * cols, start, length, 0)
        covered = []
        ra = start // cols
        for r0, n, padded in f.pieces():
            assert not padded or n == 1
            for row in range(ra + r0, ra + r0 + n):
                for c in range(cols):
                    e = row * cols + c
                    if start <= e < start + length:
                        covered.append(e)
        assert covered == list(range(start, start + length)), (start, length)


def test_unbound_8bit_state_is_refused_and_old_flat_checkpoints_are_named():
    p = torch.zeros(400)
    p.grad = torch.ones(400)
    opt = FlatDenseAdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, state_bits=8,
                         min_numel=MIN_NUMEL)
    with pytest.raises(RuntimeError, match="bind_fragments"):
        opt.step()
    opt.bind_fragments({id(p): [Fragment(0, 1, 400, 400, 0, 400, 0)]}, [], lambda t: None)
    opt.step()
    sd = opt.state_dict()
    assert sd["format"] == FlatDenseAdamW.FORMAT_ROWS
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="flat partitions"):
        opt.load_state_dict({**sd, "format": FlatDenseAdamW.FORMAT})


def test_non_finite_global_norm_applies_nothing():
    """The global norm is agreed across ranks: when it is not finite, DeepSpeed's client optimizer applies
    nothing (as every placement's finish_step skips) — no weight or moment moves, and no cut-block all-reduce."""
    p = torch.ones(400)
    opt = FlatDenseAdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, state_bits=8,
                         min_numel=MIN_NUMEL, norm_fn=lambda sq: (float("inf"), 1.0))
    calls = []
    opt.bind_fragments({id(p): [Fragment(0, 1, 400, 400, 0, 400, 0)]}, [(0, 0, 0)], calls.append)
    p.grad = torch.full((400,), float("inf"))
    opt.step()
    assert opt.last_step.skipped and torch.equal(p, torch.ones(400)) and not calls
    assert id(p) not in opt.dense or all(s.step == 0 for s in opt.dense[id(p)])
