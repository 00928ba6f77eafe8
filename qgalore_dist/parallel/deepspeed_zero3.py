"""The ZeRO-3 side-car: INT8 matrices partitioned across ranks by rows (docs/design.md §3, "Sharded engines").

:class:`Zero3Sidecar` switches every targeted :class:`~qgalore_dist.nn.QGaLoreLinear` of the model to its row-shard
weight source, keeping this rank's rows (``chunk_rows`` split) — before
``deepspeed.initialize`` partitions the dense parameters — and drives
:class:`~qgalore_dist.parallel.row_sharded.RowShardedQGaLoreOptimizer` over those row shards. Per projected ``m×n``
matrix, N ranks, ``g`` the weight group, A micro-batches per step, bytes through one rank's link:

* **forward and backward** each all-gather the INT8 codes + fp32 scales: ``2·(N−1)/N · m·n·(1 + 4/g)`` per pass
  (sent + received), the gathered weight freed after each use;
* **weight gradient — project before communicating**: in backward each rank projects its micro-batch's gradient
  with the replicated basis (right ``R = G'Qᵀ`` [m', r], left ``PᵀG'`` [r, n']) and accumulates it locally; once
  per step the right ones are reduce-scattered to the ranks holding each reshaped row and the left ones reduced to
  the owner: ``(N−1)/N · max(m, n)·c·r·b`` instead of ``(N−1)/N · m·n·b`` per micro-batch. On a refresh step the
  due matrices' gradients go as full rows to their row owners every micro-batch (the owner's SVD needs the
  gradient; the window's projection has to wait for the new basis);
* **optimizer**: the row-sharded optimizer's traffic (right projection row-local; left: ``r·n`` reduced and
  broadcast; refresh: gradient rows gathered to the owner only, projector sent back).

Resident per rank: ``m·n·(1 + 4/g) / N`` bytes of weights (+ the transient gathered layer). Dense parameters are
ZeRO-3's. The projected step is split around DeepSpeed's: :meth:`Zero3Sidecar.begin_step` (reductions) before it,
:meth:`Zero3Sidecar.shared_norm` inside it (one all-reduce of both sides' squared norms, called by the dense client
optimizer), :meth:`Zero3Sidecar.finish_step` (the update) after it.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES, find_target_linears
from ..nn.int8_linear import QGaLoreLinear
from ..quant.int8 import dequantize_rows
from .collectives import Collectives, CommCounters
from .replicas import check_same_setup
from .row_sharded import RowShard, RowShardedQGaLoreOptimizer, chunk_rows

__all__ = ["Zero3Sidecar", "export_gathered", "gathered_state", "shard_model_rows"]


def shard_model_rows(model: nn.Module, rank: int, world_size: int,
                     target_modules=DEFAULT_TARGET_MODULES) -> list[QGaLoreLinear]:
    """Switch each targeted :class:`QGaLoreLinear` to this rank's rows (its row-shard source, in place, model
    order); the full codes are dropped."""
    out = []
    for name, mod in find_target_linears(model, target_modules).items():
        if not isinstance(mod, QGaLoreLinear):
            raise ValueError(f"{name} is not an INT8 QGaLoreLinear (ZeRO-3 side-car shards INT8 weights only)")
        mod.qname = f"{name}.weight"
        mod.use_row_shard(chunk_rows(mod.out_features, world_size), rank)
        out.append(mod)
    return out


class Zero3Sidecar:
    """Row-sharded INT8 matrices + their optimizer beside DeepSpeed ZeRO-3 (module docstring).

    The engine calls, per optimizer step: :meth:`begin_step` (the low-rank reductions, refreshes), then DeepSpeed's
    step, whose client optimizer calls :meth:`shared_norm` once (the dense partition's squared norm folded into the
    one clipping norm), then :meth:`finish_step` (the projected update).
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, collectives: Collectives, *,
                 target_modules=DEFAULT_TARGET_MODULES, stagger_refresh: bool = True, grad_clip: float = 0.0):
        self.collectives = collectives
        self.rank, self.world_size = collectives.rank, collectives.world_size
        named = {n: m for n, m in find_target_linears(model, target_modules).items()}
        # every rank must agree on the matrices before any gather runs (shapes drive every collective)
        check_same_setup(collectives, {
            "config": config.to_dict(),
            "matrices": [[n, m.out_features, m.in_features, m.group_size] for n, m in named.items()],
            "dense": [[n, list(p.shape), str(p.dtype)] for n, p in model.named_parameters() if p.requires_grad],
        })
        self.modules = shard_model_rows(model, self.rank, self.world_size, target_modules)
        self.by_name = {m.qname: m for m in self.modules}
        self.grad_rows: dict[str, torch.Tensor] = {}
        self.local_lowrank: dict[str, torch.Tensor] = {}  # this rank's projected gradients of the window
        for mod in self.modules:
            mod.gather = lambda mod=mod: self._gather(mod)
            mod.grad_sink = lambda g, mod=mod: self._take_grad(mod, g)
        shards = [RowShard(m.qname, (m.out_features, m.in_features), m.rows_per_rank, m.int8_weight)
                  for m in self.modules]
        self.opt = RowShardedQGaLoreOptimizer(shards, config, collectives, grad_clip=grad_clip,
                                              stagger_refresh=stagger_refresh)
        self.param_groups = self.opt.param_groups
        self.last_comm = CommCounters().as_dict()
        self.gather_calls = 0

    # --- communication around the INT8 layer ------------------------------------------------------------------
    def _gather(self, mod: QGaLoreLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole INT8 weight from every rank's rows: one bucketed all-gather of codes + scales (1 byte per
        element + the scales); unequal shards are padded to the largest."""
        kmax, m = max(mod.rows_per_rank), mod.out_features
        k = mod.rows_per_rank[self.rank]
        codes, scales = mod.weight_codes, mod.weight_scales
        if k < kmax:
            codes = torch.cat([codes, codes.new_zeros(kmax - k, codes.shape[1])])
            scales = torch.cat([scales, scales.new_zeros(kmax - k, scales.shape[1])])
        out_c = codes.new_empty(kmax * self.world_size, codes.shape[1])
        out_s = scales.new_empty(kmax * self.world_size, scales.shape[1])
        self.collectives.all_gather_into([out_c, out_s], [codes, scales])
        self.gather_calls += 1
        if kmax * self.world_size == m:
            return out_c, out_s
        keep = torch.cat([torch.arange(r * kmax, r * kmax + kr) for r, kr in enumerate(mod.rows_per_rank)])
        return out_c[keep], out_s[keep]

    @torch.no_grad()
    def _take_grad(self, mod: QGaLoreLinear, grad: torch.Tensor) -> None:
        """This rank's micro-batch gradient [m, n] of one matrix, in backward. Project before communicating: a
        matrix not due for a refresh is projected here with the replicated basis and accumulated locally (the
        low-rank sums travel once per step, in :meth:`begin_step`); a due one goes as full rows to its row holders
        (the owner's SVD needs the gradient)."""
        if not self.opt.needs_full_gradient(mod.qname):
            r = self.opt.project_local(mod.qname, grad)
            acc = self.local_lowrank.get(mod.qname)
            if acc is None:
                self.local_lowrank[mod.qname] = r
            else:
                acc.add_(r)
            return
        self._reduce_rows(mod, grad)

    @torch.no_grad()
    def _reduce_rows(self, mod: QGaLoreLinear, grad: torch.Tensor) -> None:
        """Sum ``grad`` [m, n] over ranks into each row chunk's rank (a reduce-scatter's bytes); accumulate ours."""
        grad = grad.contiguous()
        chunks, off = {}, 0
        for r, kr in enumerate(mod.rows_per_rank):
            if kr:
                chunks[r] = [grad[off:off + kr]]
            off += kr
        self.collectives.reduce_to_owners(chunks)
        mine = grad[mod.row_offset:mod.row_offset + mod.rows_per_rank[self.rank]]
        acc = self.grad_rows.get(mod.qname)
        if acc is None:
            self.grad_rows[mod.qname] = mine.clone()
        else:
            acc.add_(mine)

    # --- the step: begin_step before DeepSpeed's, finish_step after it ---------------------------------------
    def begin_step(self) -> float:
        """Collective, before DeepSpeed's step: the row-sharded first half over the averaged row gradients
        (refreshes, projection, reductions). Returns this rank's projected share of the squared norm."""
        ws = self.world_size
        grads: dict[str, torch.Tensor | None] = {}
        for mod in self.modules:
            g = self.grad_rows.get(mod.qname)
            grads[mod.qname] = None if g is None else (g.div_(ws) if ws > 1 else g)
            if mod.qname in self.local_lowrank:
                grads.pop(mod.qname)
        sq = self.opt.begin_step(grads=grads, local_lowrank=self.local_lowrank)
        self.local_lowrank = {}
        return sq

    def shared_norm(self, dense_local_sq: float) -> tuple[float, float]:
        """Collective, called once per step from inside DeepSpeed's step (by the dense optimizer): the optimizer's
        norm all-reduce with this rank's dense partition norm² added. Returns (global norm, clipping factor). No
        step runs here: the projected step is :meth:`finish_step`, after DeepSpeed's."""
        return self.opt.shared_norm(dense_local_sq)

    def finish_step(self, coef: float | None = None) -> None:
        """Collective, after DeepSpeed's step: the row-sharded second half with the shared clipping factor."""
        self.opt.finish_step(coef)
        self.last_comm = self.opt.last_comm
        self.grad_rows.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grad_rows.clear()
        self.local_lowrank = {}
        self.opt.zero_grad(set_to_none)

    # --- accounting ---------------------------------------------------------------------------------------------
    @property
    def svd_count(self) -> int:
        return self.opt.svd_count

    @property
    def phase_times(self) -> dict[str, float]:
        return getattr(self.opt, "phase_times", {})

    def memory_bytes(self) -> dict[str, int]:
        return self.opt.memory_bytes()

    # --- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd)

    def weight_state(self) -> dict[str, Any]:
        """This rank's rows of every matrix (codes, scales, row offset), keyed by parameter name."""
        return {m.qname: {"codes": m.weight_codes, "scales": m.weight_scales, "row_offset": m.row_offset}
                for m in self.modules}

    @torch.no_grad()
    def load_weight_state(self, state: dict) -> None:
        for m in self.modules:
            if m.qname not in state:
                raise ValueError(f"weights missing for {m.qname}")
            e = state[m.qname]
            if int(e["row_offset"]) != m.row_offset or tuple(e["codes"].shape) != tuple(m.weight_codes.shape):
                raise ValueError(f"{m.qname}: saved rows at offset {e['row_offset']} shape "
                                 f"{tuple(e['codes'].shape)}, this rank holds {m.row_offset} "
                                 f"{tuple(m.weight_codes.shape)}")
            m.weight_codes.copy_(e["codes"])
            m.weight_scales.copy_(e["scales"])

    # --- export -------------------------------------------------------------------------------------------------
    def _gathered(self, module: nn.Module, is_main: bool,
                  dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Collective generator — every rank must run it to the end: the model's float state one tensor at a time
        on the main rank (None elsewhere): each dense parameter gathered from its ZeRO-3 partitions, each INT8
        matrix gathered and dequantised (in ``dtype``), then the persistent buffers."""
        yield from gathered_state(module, is_main, self._int8_tensors(is_main, dtype))

    def _int8_tensors(self, is_main: bool, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | None]]:
        for mod in self.modules:
            codes, scales = self._gather(mod)
            yield mod.qname, (dequantize_rows(codes, scales, mod.group_size, dtype) if is_main else None)
        self.collectives.reset_step()

    def full_state(self, module: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
        """Collective: the whole model's float state (dense parameters gathered from ZeRO-3, every INT8 matrix
        gathered and dequantised) on the main rank; None elsewhere."""
        state = {n: t for n, t in self._gathered(module, is_main) if t is not None}
        return state if is_main else None

    def export(self, module: nn.Module, out_dir, tokenizer, is_main: bool, dtype: torch.dtype = torch.bfloat16):
        """Streaming export: one tensor gathered to the main rank at a time, written shard by shard."""
        return export_gathered(self._gathered(module, is_main, dtype), [m.qname.removesuffix(".weight")
                                                                        for m in self.modules],
                               module.config, out_dir, tokenizer, is_main, dtype)


@torch.no_grad()
def gathered_state(module: nn.Module, is_main: bool,
                   int8: Iterator[tuple[str, torch.Tensor | None]] = iter(())
                   ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Collective generator — every rank must run it to the end: each parameter of a ZeRO-3 ``module`` gathered
    from its partitions, one at a time, on the main rank (None elsewhere); then the pairs of ``int8`` (the INT8
    matrices, gathered by their side-car); then the persistent buffers."""
    import deepspeed

    for n, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            t = p.detach().cpu().clone() if is_main else None
        yield n, t
    yield from int8
    persistent = set(module.state_dict(keep_vars=True))  # names only (non-persistent buffers are not saved)
    params = {n for n, _ in module.named_parameters()}
    for n, b in module.named_buffers():
        if n in persistent and n not in params:
            yield n, (b.detach().cpu() if is_main else None)


def export_gathered(gathered: Iterator[tuple[str, torch.Tensor | None]], int8: list[str], config, out_dir,
                    tokenizer, is_main: bool, dtype: torch.dtype):
    """Write what the collective generator ``gathered`` yields as a transformers model on the main rank, shard by
    shard (``int8``: the modules whose weights were dequantised); the other ranks run the same collectives."""
    from ..checkpoint.export import DequantizedTensors, export_tensors

    if not is_main:
        for _ in gathered:  # the same collectives as the main rank's, in order
            pass
        return None
    tensors = ((n, t.to(dtype) if t.is_floating_point() else t) for n, t in gathered)
    try:
        return export_tensors(DequantizedTensors(tensors, int8), config, out_dir, tokenizer, dtype=dtype)
    except BaseException:
        for _ in gathered:  # the other ranks are in these gathers: finish them, then fail
            pass
        raise
