"""The DeepSpeed side-car (docs/design.md §3 "DeepSpeed integration"): what runs *beside* a ZeRO engine.

DeepSpeed ZeRO hands a client optimizer one flat 1-D fp32 slice per rank, so no projected-gradient optimizer can
run *as* DeepSpeed's optimizer. Instead the work is split:

* **dense parameters** (embeddings, norms, ``lm_head``, biases) are DeepSpeed's: ZeRO partitions, reduces and
  steps them. Its client optimizer is :class:`FlatDenseAdamW` — qgalore_dist's dense AdamW rule
  (:func:`~qgalore_dist.optim.dense_adamw.dense_adamw_step`, fp32 or 8-bit blockwise moments) applied element-wise
  to whatever flat slice ZeRO gives it. Nothing is JIT-compiled (DeepSpeed's ``"optimizer": {"type": "AdamW"}``
  would build ``fused_adam`` / ``cpu_adam``), and its math is the single-device reference's dense rule.
* **projected matrices** (INT8 codes + scales, buffers DeepSpeed never sees) are the side-car's:
  :class:`SidecarQGaLoreOptimizer` is the data-parallel :class:`~.sharded_optimizer.ShardedQGaLoreOptimizer`
  restricted to the projected matrices (ZeRO-1/2: replicated INT8, owner-only SVD, moments by owner, both comm
  modes), with its step split in two so DeepSpeed's step can sit between the halves.

One optimizer step (the engine, :mod:`qgalore_dist.train.engines.deepspeed`, orders it; every rank)::

    sidecar.begin_step()               # reduce low-rank (or full) gradients to owners; Σ‖R‖² of owned matrices
    ds_engine.step()                   # ZeRO reduces dense grads, calls FlatDenseAdamW.step(), which calls
                                       #   sidecar.shared_norm(Σ‖dense slice‖²): one all-reduce of both parts
                                       #   -> global norm -> clip coef; then scales its slice's gradient, steps it
    sidecar.finish_step(coef)          # owners normalise, broadcast; every rank applies to its replica

so the clipping norm is ``√(Σ‖R‖² + ‖dense‖²)`` — the single-device reference's definition — over DeepSpeed's
dense gradients and the projected ones, with DeepSpeed's own ``gradient_clipping`` set to 0 (it would clip the
dense side alone). ZeRO partitions are disjoint across ranks, so the sum of the ranks' slice norms is the dense
norm (padding is zero). All traffic of both halves goes through the side-car's :class:`Collectives` (its own
process group), and is counted there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..optim.dense_adamw import DenseState, dense_adamw_step, init_dense_state
from ..optim.norms import StepResult, closure_loss, squared_norm
from ..quant.state8 import Blockwise8bit
from .collectives import Collectives
from .sharded_optimizer import ShardedQGaLoreOptimizer

__all__ = ["FlatDenseAdamW", "Fragment", "SidecarQGaLoreOptimizer", "client_step_result", "cut_groups",
           "zero_fragments"]


class SidecarQGaLoreOptimizer(ShardedQGaLoreOptimizer):
    """:class:`ShardedQGaLoreOptimizer` over the projected matrices only (the dense parameters are DeepSpeed's).
    The engine drives the optimizer's own halves (:meth:`begin_step`, :meth:`shared_norm` with DeepSpeed's dense
    norm², :meth:`finish_step`) around DeepSpeed's step.

    Constructed before ``deepspeed.initialize`` (the start-up agreement check hashes the dense parameters' names and
    shapes too, which ZeRO-3 would have partitioned by then); after construction it holds no dense state.
    ``step()`` stays usable (the same halves, no dense norm) for a world without DeepSpeed.
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, collectives: Collectives, **kw):
        super().__init__(model, config, collectives, **kw)
        # dense parameters are stepped by DeepSpeed: drop the (small, dense-sized) state the base class allocated
        self.dense_named = []
        self.dense_state = {}
        self.param_groups[:] = [g for g in self.param_groups if g.get("kind") != "dense"]

    # --- weights in checkpoints (DeepSpeed's module file holds rank 0's copy too; these are keyed by name) ------
    def weight_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """INT8 codes + scales of the matrices this rank owns (every matrix is in exactly one rank's file)."""
        return {n: dict(zip(("codes", "scales"), self._weight_tensors(n))) for n in sorted(self.owned)}

    @torch.no_grad()
    def load_weight_state(self, state: dict) -> None:
        """Restore the owned matrices' codes + scales (the replicas follow from DeepSpeed's module state; a
        mismatch would be caught and repaired by the next replica check)."""
        missing = sorted(self.owned - set(state))
        if missing:
            raise ValueError(f"weights missing for owned matrices {missing[:3]}")
        for n in sorted(self.owned):
            for t, key in zip(self._weight_tensors(n), ("codes", "scales")):
                src = state[n][key]
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"{n}.{key} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
                t.copy_(src)


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """The [rows, cols] layout the single-device 8-bit state puts blocks in (:class:`Blockwise8bit`)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    return math.prod(shape[:-1]), shape[-1]


@dataclass(frozen=True)
class Fragment:
    """One parameter's piece of a ZeRO flat partition: elements ``[start, start + length)`` of the parameter's
    row-major flat view, at ``offset`` in this rank's flat partition. ``param``: the parameter's index in the
    model's trainable order (the same on every rank); ``rows, cols``: its reference [rows, cols] layout;
    ``numel``: its whole element count (decides 8-bit vs fp32 state, as on one device)."""

    param: int
    rows: int
    cols: int
    numel: int
    start: int
    length: int
    offset: int

    def pieces(self) -> list[tuple[int, int, bool]]:
        """The fragment as row-aligned pieces ``(first row, row count, padded)`` relative to its first row: a
        partial first / last row is padded to a whole row (one row, a copy); the whole rows between are views."""
        c = self.cols
        end = self.start + self.length
        ra, rb = self.start // c, -(-end // c)
        out = []
        r = ra
        if self.start % c or end < (ra + 1) * c:  # the first row is not wholly ours
            out.append((0, 1, True))
            r = ra + 1
        last_partial = end % c != 0 and rb - 1 >= r
        full_end = rb - 1 if last_partial else rb
        if full_end > r:
            out.append((r - ra, full_end - r, False))
        if last_partial:
            out.append((rb - 1 - ra, 1, True))
        return out

    def partial_groups(self, block: int) -> set[tuple[int, int, int]]:
        """The 8-bit blocks ``(param, row, group)`` this fragment holds only part of (a partition boundary cuts
        them): their scale is the max over the ranks holding their parts."""
        c, end = self.cols, self.start + self.length
        out = set()
        for e in (self.start, end - 1):
            row, g = e // c, (e % c) // block
            g0, g1 = row * c + g * block, row * c + min((g + 1) * block, c)
            if g0 < self.start or g1 > end:
                out.add((self.param, row, g))
        return out


def cut_groups(fragments_by_rank: Sequence[Iterable[Fragment]], block: int, quantized: Callable[[int], bool]
               ) -> list[tuple[int, int, int]]:
    """Every rank's partially held 8-bit blocks of quantised parameters, sorted: the same list on every rank (the
    slots of the per-step max all-reduce of their partial scales)."""
    out: set[tuple[int, int, int]] = set()
    for frags in fragments_by_rank:
        for f in frags:
            if quantized(f.numel):
                out |= f.partial_groups(block)
    return sorted(out)


def zero_fragments(ds_optimizer, stage: int, rank: int, index: dict[int, int]) -> dict[int, list[Fragment]]:
    """``{id(flat partition): its fragments}`` of this rank's ZeRO partitions — the map from DeepSpeed's flat
    fp32 slices back to parameter elements. ``index``: ``{id(param): trainable index}``.

    ZeRO-1/2: DeepSpeed's own fragment map (``param._hp_mapping``: the parameter's and the partition's addresses,
    set by ``_link_all_hp_params``). ZeRO-3: each parameter is partitioned alone, ``ceil(numel / N)`` elements per
    rank (``ds_tensor``), and a sub-group's flat fp32 partition is its parameters' partitions in order."""
    out: dict[int, list[Fragment]] = {}
    if stage == 3:
        for i, sub in enumerate(ds_optimizer.fp16_groups):
            flat = ds_optimizer.fp32_partitioned_groups_flat[i]
            frags, off = [], 0
            for p in sub:
                pn = int(p.partition_numel())
                start = rank * pn
                length = max(0, min(pn, int(p.ds_numel) - start))
                if length:
                    frags.append(Fragment(index[id(p)], *_rows_cols(p.ds_shape), int(p.ds_numel), start, length, off))
                off += pn
            out[id(flat)] = frags
        return out
    for i, group in enumerate(ds_optimizer.bit16_groups):
        flat = ds_optimizer.single_partition_of_fp32_groups[i]
        frags = []
        for lp in group:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:  # no element of this parameter in this rank's partition
                continue
            lpa, hpa = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            frags.append(Fragment(index[id(lp)], *_rows_cols(lp.shape), lp.numel(), int(lpa.start), int(lpa.numel),
                                  int(hpa.start)))
        out[id(flat)] = frags
    return out


def client_step_result(norm_fn: Callable[[float], tuple[float, float]] | None,
                       params: Sequence[torch.Tensor]) -> StepResult:
    """The step of a DeepSpeed client optimizer (:class:`FlatDenseAdamW`, the engine's ``FlatTorchAdamW``):
    ``norm_fn(Σ‖this rank's partition gradients‖²) -> (global norm, clip factor)`` — the engine's collective, which
    adds the norm² into the side-car's :meth:`~qgalore_dist.optim.optimizer.QGaLoreBase.shared_norm` — or, without
    one, the local norm and no clipping. A non-finite norm (the same on every rank) is a skipped step, as the
    side-car's ``finish_step`` skips its half."""
    local_sq = sum(squared_norm(p.grad) for p in params)
    norm, coef = norm_fn(local_sq) if norm_fn is not None else (math.sqrt(local_sq), 1.0)
    return StepResult(norm, coef) if math.isfinite(norm) else StepResult(norm, 1.0, skipped=True)


class FlatDenseAdamW(torch.optim.Optimizer):
    """DeepSpeed's client optimizer for the dense parameters: :func:`dense_adamw_step` on each (flat) tensor.

    The rule is element-wise, so fp32 moments (``state_bits=32``: the reference's rule exactly) run on ZeRO's flat
    partitions as they are. 8-bit moments have blocks, and the single-device reference puts them on the rows of
    each parameter (:class:`~qgalore_dist.quant.state8.Blockwise8bit`); once :meth:`bind_fragments` has mapped each
    flat partition back to parameter elements (:func:`zero_fragments`), every fragment keeps the state of the
    parameter rows it touches, stepped as whole rows (a partial first / last row padded with zeros), and a block
    that a partition boundary cuts takes the max of its parts' scales over the ranks (one all-reduce of those
    blocks' scales per step, ``reduce_max``) before it is encoded — so the 8-bit state is the reference's, codes and
    scales, at any world size and ZeRO stage. Unbound 8-bit moments would be blocks over the flat slice (refused:
    the engine always binds).

    ``norm_fn(local_sq) -> (norm, coef)`` is called once per ``step()`` with Σ‖g‖² of this rank's gradients
    (float64) and must return the *global* pre-clip norm and the clipping factor (it is collective: the engine's
    all-reduce over the side-car's group). Without it the norm is local and nothing is clipped. ``last_step`` and
    ``calls`` record what happened (the engine checks one call per optimizer step).

    State is kept per tensor object (ZeRO-3 swaps a sub-group's flat tensor into ``param_groups`` around each call)
    and saved in ``param_groups`` order, like ``torch.optim``'s.
    """

    FORMAT = "qgalore_dist.flat_dense_adamw/1"
    FORMAT_ROWS = "qgalore_dist.flat_dense_adamw/2"  # 8-bit state on parameter rows (fragments)

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, state_bits: int = 32, block: int = 256, min_numel: int = 4096,
                 norm_fn: Callable[[float], tuple[float, float]] | None = None):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits={state_bits!r} is invalid: allowed: 8 or 32")
        super().__init__(list(params), {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.state_bits, self.block, self.min_numel = state_bits, block, min_numel
        self.norm_fn = norm_fn
        self.dense: dict[int, DenseState | list[DenseState]] = {}
        self.fragments: dict[int, list[Fragment]] | None = None
        self._cut_slot: dict[tuple[int, int, int], int] = {}
        self._reduce_max: Callable[[torch.Tensor], None] | None = None
        self.last_step = StepResult()
        self.calls = 0

    def bind_fragments(self, fragments: dict[int, list[Fragment]], cuts: Sequence[tuple[int, int, int]],
                       reduce_max: Callable[[torch.Tensor], None]) -> None:
        """Map each flat partition (``id``) to its parameter fragments (:func:`zero_fragments`); ``cuts``: every
        rank's partially held blocks (:func:`cut_groups`, the same list on every rank); ``reduce_max(t)``: the
        element-wise max of ``t`` over the ranks, in place (collective)."""
        self.fragments = dict(fragments)
        self._cut_slot = {g: i for i, g in enumerate(cuts)}
        self._reduce_max = reduce_max

    def is_8bit(self, numel: int) -> bool:
        """Whether a parameter of ``numel`` elements keeps 8-bit moments (as on one device: by its whole size)."""
        return self.state_bits == 8 and numel >= self.min_numel

    def _state(self, p: torch.Tensor) -> DenseState | list[DenseState]:
        st = self.dense.get(id(p))
        if st is not None:
            return st
        if self.fragments is None or id(p) not in self.fragments:
            if self.state_bits == 8:
                raise RuntimeError("8-bit dense state over a flat ZeRO partition needs bind_fragments() first (its "
                                   "blocks must lie on parameter rows, as on one device)")
            st = init_dense_state(p, self.state_bits, self.block, self.min_numel)
        else:
            st = [self._fragment_state(f, p) for f in self.fragments[id(p)]]
        self.dense[id(p)] = st
        return st

    def _fragment_state(self, f: Fragment, p: torch.Tensor) -> DenseState:
        """The state of the parameter rows a fragment touches (8-bit or not by the whole parameter's size)."""
        nrows = -(-(f.start + f.length) // f.cols) - f.start // f.cols
        min_numel = 0 if self.is_8bit(f.numel) else 1 << 62
        fdt = torch.float64 if p.dtype == torch.float64 else torch.float32
        return DenseState(Blockwise8bit((nrows, f.cols), True, self.block, min_numel, p.device, 8, fdt),
                          Blockwise8bit((nrows, f.cols), False, self.block, min_numel, p.device, 8, fdt))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        live = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step = client_step_result(self.norm_fn, [p for _, p in live])
        self.calls += 1
        if self.last_step.skipped:  # agreed on every rank (no cut-block all-reduce anywhere): nothing applied
            return loss
        coef = self.last_step.clip_coef
        cut_rows: list = []  # (state rows view, padded row values, fragment, row) awaiting agreed block scales
        for group, p in live:
            g = p.grad if coef == 1.0 else p.grad * coef
            st = self._state(p)
            hyper = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
            if isinstance(st, DenseState):
                dense_adamw_step(p, g, st, *hyper)
            else:
                for f, fst in zip(self.fragments[id(p)], st):
                    self._step_fragment(p, g, f, fst, hyper, cut_rows)
        if self.fragments is not None:
            self._encode_cut_rows(cut_rows)
        return loss

    def _step_fragment(self, p: torch.Tensor, g: torch.Tensor, f: Fragment, st: DenseState, hyper: tuple,
                       cut_rows: list) -> None:
        """One fragment as row-aligned pieces: whole rows as views of the partition, a partial first / last row
        through a zero-padded row (zeros: no gradient, no update, no moment, and no effect on a block's max)."""
        c, head = f.cols, f.start % f.cols
        step = st.step
        for r0, n, padded in f.pieces():
            lo = f.offset + (r0 * c - head if r0 else 0)  # partition index of the piece's first held element
            piece = DenseState(st.exp_avg.rows(r0, r0 + n), st.exp_avg_sq.rows(r0, r0 + n), step)
            if not padded:
                dense_adamw_step(p.data[lo:lo + n * c].view(n, c), g[lo:lo + n * c].view(n, c), piece, *hyper)
                continue
            # the held columns of the padded row: [a, b)
            row = f.start // c + r0
            a = max(f.start - row * c, 0)
            b = min(f.start + f.length - row * c, c)
            wp, gp = p.new_zeros(1, c), g.new_zeros(1, c)
            wp[0, a:b], gp[0, a:b] = p.data[lo:lo + b - a], g[lo:lo + b - a]
            kept = []

            def store(m8, x, _r0, kept=kept):
                m8.from_float(x)
                if m8.quantized:
                    kept.append((m8, x.reshape(1, c).clone()))
            dense_adamw_step(wp, gp, piece, *hyper, store_moment=store)
            p.data[lo:lo + b - a] = wp[0, a:b]
            cut_rows.extend((m8, x, f, row) for m8, x in kept)
        st.step = step + 1

    def _encode_cut_rows(self, cut_rows: list) -> None:
        """Blocks cut by a partition boundary: this rank's partial scale of each, the max over ranks (one
        all-reduce of every cut block's two scales — the same slots on every rank), then the rows re-encoded."""
        k = len(self._cut_slot)
        if not k:
            return
        # on the moments' device (a GPU under NCCL); a rank holding no cut block still joins the all-reduce
        device = cut_rows[0][1].device if cut_rows else self.param_groups[0]["params"][0].device
        v = torch.zeros(2 * k, dtype=torch.float32, device=device)
        scales = []
        for m8, x, f, row in cut_rows:
            sc = m8.absmax_of(x)  # this rank's partial scales of the row's blocks [1, G]
            slots = [(gi, self._cut_slot.get((f.param, row, gi))) for gi in range(sc.shape[1])]
            slots = [(gi, k * (not m8.signed) + s) for gi, s in slots if s is not None]
            for gi, s in slots:
                v[s] = torch.maximum(v[s], sc[0, gi])
            scales.append((sc, slots))
        self._reduce_max(v)
        for (m8, x, _, _), (sc, slots) in zip(cut_rows, scales):
            for gi, s in slots:
                sc[0, gi] = v[s]
            m8.encode(x, sc)

    def state_nbytes(self) -> int:
        """Exact bytes of the moments held (every tensor stepped so far)."""
        return sum(sum(x.nbytes() for x in st) if isinstance(st, list) else st.nbytes() for st in self.dense.values())

    def state_dict(self):  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"]]

        def one(p):
            st = self.dense.get(id(p))
            if st is None or isinstance(st, DenseState):
                return None if st is None else st.state_dict()
            return {"fragments": [[f.param, f.start, f.length, f.offset] for f in self.fragments[id(p)]],
                    "states": [x.state_dict() for x in st]}
        return {"format": self.FORMAT if self.fragments is None else self.FORMAT_ROWS, "state_bits": self.state_bits,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
                                 for g in self.param_groups],
                "state": [one(p) for p in params]}

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        fmt = self.FORMAT if self.fragments is None else self.FORMAT_ROWS
        if isinstance(state_dict, dict) and state_dict.get("format") == self.FORMAT and fmt == self.FORMAT_ROWS:
            raise ValueError("this checkpoint's 8-bit dense moments are blocks over ZeRO's flat partitions (saved by "
                             "an earlier qgalore_dist); this version keeps them on parameter rows, as on one device, "
                             "and cannot convert them")
        if not isinstance(state_dict, dict) or state_dict.get("format") != fmt:
            raise ValueError(f"not a {fmt} optimizer state")
        if state_dict["state_bits"] != self.state_bits:
            raise ValueError(f"dense optimizer state has {state_dict['state_bits']}-bit moments, this run "
                             f"{self.state_bits}-bit")
        params = [p for g in self.param_groups for p in g["params"]]
        saved = state_dict["state"]
        if len(saved) != len(params):
            raise ValueError(f"dense optimizer state holds {len(saved)} tensors, this run {len(params)}")
        self.dense = {}
        for p, sd in zip(params, saved):
            if sd is None:
                continue
            st = self._state(p)
            if isinstance(st, DenseState):
                st.load_state_dict(sd)
                continue
            mine = [[f.param, f.start, f.length, f.offset] for f in self.fragments[id(p)]]
            if [list(x) for x in sd["fragments"]] != mine:
                raise ValueError("the saved dense state covers other parameter fragments than this run's ZeRO "
                                 "partition (a different world size or model)")
            for x, xs in zip(st, sd["states"]):
                x.load_state_dict(xs)
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in sg.items() if k not in ("params", "n")})
