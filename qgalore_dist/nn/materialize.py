"""Materialise a meta-device model straight into INT8, one matrix at a time, each process only its own rows.

A 7B model must never exist in fp32/bf16, and under a sharding engine no rank may hold more than its share. So a
model is built on the meta device, its targeted linears become meta :class:`QGaLoreLinear` (:func:`int8_skeleton`),
an engine decides where every tensor lives (the whole model; FSDP2's row-sharded DTensors after ``fully_shard``;
the ZeRO-3 side-car's row shards) and allocates it (``to_empty``), and :func:`fill` writes every tensor's rows from
a :class:`ParamSource`: the float rows of one matrix at a time are quantised into its INT8 rows (the transient is
one matrix's rows in fp32) and every dense tensor gets only the rows the process holds. :func:`materialize` is the
whole-model (or row-range) case of the same path.

*Where the values come from* is the seam, :class:`ParamSource`:

* :class:`KeyedRandomInit` — a fresh model: every value a pure function of (seed, name, global element index), so a
  rank draws only its rows and the model is bit-identical for any world size and engine;
* ``models.pretrained.SafetensorsSource`` — a pretrained checkpoint read from memory-mapped safetensors files,
  rounded to nearest (``checkpoint.as_model`` reads our own checkpoints the same way, INT8 codes as they are).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..quant.int8 import quantize_rows
from ..quant.rng import SALT_INIT, keyed_normal_rows, stream_key
from .convert import DEFAULT_TARGET_MODULES, find_target_linears, set_submodule, unmatched_targets
from .int8_linear import QGaLoreLinear
from .layout import prepare_int8_layout

__all__ = ["KeyedRandomInit", "ParamSource", "PendingModel", "RowRange", "allocate_and_fill", "cast_dense", "fill",
           "int8_skeleton", "materialize", "materialize_quantized", "row_view"]

#: ``rows(qname, out_features) -> (r0, r1)``: the weight rows ``[r0, r1)`` of a targeted linear this process keeps.
RowRange = Callable[[str, int], tuple[int, int]]


class ParamSource(Protocol):
    """Where the values of a meta-built model come from (the seam of :func:`fill`)."""

    def matrix_rows(self, qname: str, shape: tuple[int, int], rows: tuple[int, int],
                    device: torch.device | str) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Float rows ``[r0, r1)`` of the targeted weight ``qname`` (whole shape ``[m, n]``) -> ``([r1 - r0, n]``
        any float dtype on ``device``, rounding key: a keyed stochastic-rounding stream, or ``None`` = nearest)."""
        ...

    def dense_rows(self, name: str, module: nn.Module, shape: tuple[int, ...], rows: tuple[int, int],
                   dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Rows ``[r0, r1)`` along dim 0 of the dense tensor ``name`` (global shape ``shape``; a parameter or
        persistent buffer owned by ``module``) -> ``[r1 - r0, *shape[1:]]`` in ``dtype`` (a 0-d tensor: rows
        ``(0, 1)``, returned 0-d)."""
        ...

    # optional: ``int8_rows(qname, rows, group_size, device) -> (codes [r1 - r0, n] int8, scales [r1 - r0,
    # ceil(n / group_size)] fp32) | None`` — INT8 rows the source already holds, taken as they are (re-quantising
    # dequantised codes need not give the same codes back); None: quantise ``matrix_rows`` instead


# ------------------------------------------------------------------------------------------ a fresh model
_SMALL_MODULE = 1 << 22  # a module with at most this many own elements is initialised whole by the model's own rule


class KeyedRandomInit:
    """A fresh model, identical on every rank and engine without communicating, each rank drawing only its rows.

    * Targeted weights: N(0, std²), ``std = config.initializer_range``, each row from a generator keyed by
      (seed, name, global row index) (:func:`~qgalore_dist.quant.rng.keyed_normal_rows`); rounded with the initial
      keyed stochastic-rounding stream (seed, step 0, name, global element index).
    * Modules with at most 4 M own elements (norms, small linears): the model's own ``_init_weights`` on a whole
      copy of the module, under an RNG seeded from (seed, module name) — cheap, and the same rule transformers
      applies (ones for RMSNorm, zeros for Gemma's offset norm ...); a rank keeps its rows of the result.
    * Larger dense tensors (embeddings, ``lm_head``, untargeted big linears): matrices N(0, std²) keyed by row like
      the targeted weights (an embedding's ``padding_idx`` row zero), vectors zero (biases) — what
      ``_init_weights`` does for ``nn.Linear`` / ``nn.Embedding``, drawn by global row.
    * Biases of targeted linears: zero.
    """

    def __init__(self, model: nn.Module, seed: int = 0, init_std: float | None = None):
        self.seed = seed
        config = getattr(model, "config", None)
        self.std = float(init_std if init_std is not None else getattr(config, "initializer_range", 0.02))
        self.init_fn: Callable[[nn.Module], None] | None = getattr(model, "_init_weights", None)
        self._whole: tuple[int, dict[str, torch.Tensor]] | None = None  # the last small module's values

    def _key(self, name: str) -> tuple[int, int]:
        return stream_key(self.seed, 0, name, SALT_INIT ^ 0xFFFF)

    def matrix_rows(self, qname, shape, rows, device):
        r0, r1 = rows
        w = keyed_normal_rows(r0, r1 - r0, shape[1], self._key(qname), self.std, device)
        return w, stream_key(self.seed, 0, qname, SALT_INIT)

    def _small_module(self, module: nn.Module, module_name: str) -> dict[str, torch.Tensor]:
        """The model's own initialisation of ``module``'s own parameters (whole, fp32, CPU), seeded by its name."""
        if self._whole is not None and self._whole[0] == id(module):
            return self._whole[1]
        clone = copy.copy(module)  # same class (``_init_weights`` dispatches on it), own tensors only
        clone._parameters = {n: None if p is None else
                             nn.Parameter(torch.empty(tuple(p.shape), dtype=torch.float32), requires_grad=False)
                             for n, p in module._parameters.items()}
        # buffers as CPU placeholders: some rules set them too (Gemma's ``embed_scale``); the clone is discarded
        clone._buffers = {n: None if b is None else torch.empty(tuple(b.shape), dtype=b.dtype)
                          for n, b in module._buffers.items()}
        clone._modules = {}
        k1, k2 = stream_key(self.seed, 0, module_name, SALT_INIT ^ 0xD0D0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((k1 << 32) | k2)
            for p in clone._parameters.values():
                if p is not None:
                    p.data.zero_()  # what a rule that initialises nothing (an unknown module) leaves
            if self.init_fn is not None:
                self.init_fn(clone)
        values = {n: p.data for n, p in clone._parameters.items() if p is not None}
        self._whole = (id(module), values)
        return values

    def dense_rows(self, name, module, shape, rows, dtype, device):
        r0, r1 = rows
        out_shape = (r1 - r0, *shape[1:]) if shape else ()
        if isinstance(module, QGaLoreLinear):  # its bias (the weight is a targeted matrix)
            return torch.zeros(out_shape, dtype=dtype, device=device)
        module_name, _, pname = name.rpartition(".")
        own = sum(math.prod(p.shape) for p in module._parameters.values() if p is not None)
        if own <= _SMALL_MODULE and pname in module._parameters:
            whole = self._small_module(module, module_name)[pname]
            return (whole[r0:r1] if shape else whole).to(device=device, dtype=dtype)
        if len(shape) >= 2:
            cols = math.prod(shape[1:])
            w = keyed_normal_rows(r0, r1 - r0, cols, self._key(name), self.std, device).view(out_shape)
            pad = getattr(module, "padding_idx", None)
            if isinstance(module, nn.Embedding) and pad is not None and r0 <= pad < r1:
                w[pad - r0].zero_()
            return w.to(dtype)
        return torch.zeros(out_shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- the skeleton
def int8_skeleton(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                  rows: RowRange | None = None, bias_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every targeted ``nn.Linear`` of a meta-device model by a meta :class:`QGaLoreLinear` (no storage;
    targeted GPT-2 ``Conv1D`` s and MoE experts first become [out, in] linears, :func:`~.layout.prepare_int8_layout`:
    a source is asked for their matrices by their names here, e.g. ``...experts.down_proj.3.weight``);
    with ``rows``, one holding only weight rows ``[r0, r1)`` (codes [r1 - r0, n], ``row_offset = r0``: a row shard,
    not runnable until its engine installs a row-shard source). Returns the replaced names."""
    prepare_int8_layout(model, target_modules)  # targeted Conv1D / MoE experts become [out, in] linears first
    targets = [(n, m) for n, m in find_target_linears(model, target_modules).items() if isinstance(m, nn.Linear)]
    if not targets:
        raise unmatched_targets(model, target_modules)
    for name, lin in targets:
        q = QGaLoreLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, group_size=group_size,
                          device="meta", bias_dtype=bias_dtype)
        q.qname = f"{name}.weight"
        if rows is not None:
            r0, r1 = rows(q.qname, lin.out_features)
            if not 0 <= r0 <= r1 <= lin.out_features:
                raise ValueError(f"{q.qname}: row range [{r0}, {r1}) outside its {lin.out_features} rows")
            if (r0, r1) != (0, lin.out_features):
                q.weight_codes = q.weight_codes[r0:r1]
                q.weight_scales = q.weight_scales[r0:r1]
                q.row_offset = r0
        set_submodule(model, name, q)
    return [n for n, _ in targets]


def row_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(the local tensor, global index of its first row)`` of a parameter: an FSDP2 DTensor sharded on dim 0
    (rows laid out as ``torch.chunk`` does) or a plain tensor (offset 0)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, 0
    if len(t.placements) != 1 or t.placements[0] != Shard(0):
        raise ValueError(f"a tensor sharded as {t.placements} is not a row shard")
    mesh = t.device_mesh
    per = -(-int(t.shape[0]) // mesh.size()) if t.dim() else 0
    return t.to_local(), min(int(t.shape[0]), mesh.get_local_rank() * per) if t.dim() else 0


def _int8_rows(source: ParamSource, q: QGaLoreLinear, rows: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
    stored = getattr(source, "int8_rows", None)  # a source that already holds INT8 (one of our checkpoints)
    got = stored(q.qname, rows, q.group_size, device) if stored is not None else None
    if got is not None:
        return got
    w, key = source.matrix_rows(q.qname, (q.out_features, q.in_features), rows, device)
    return quantize_rows(w, q.group_size, 8, key, row_offset=rows[0])


@torch.no_grad()
def fill(model: nn.Module, source: ParamSource) -> None:
    """Write every allocated tensor of ``model`` — INT8 rows of each :class:`QGaLoreLinear` (buffers, a row
    shard's buffers, or FSDP2's row-sharded ``Int8RowTensor`` parameter), dense parameters and persistent buffers
    (whole or FSDP2 row shards) — from ``source``, module by module; each tensor gets the rows it holds (in its
    own dtype). Tensors shared under two names (tied embeddings) are written once; non-persistent buffers
    (rotary ``inv_freq``) are the caller's (:func:`~qgalore_dist.models.build.rebuild_rotary_buffers`)."""
    done: set[int] = set()
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        int8_param = isinstance(mod, QGaLoreLinear) and mod.source.kind == "fsdp"
        if isinstance(mod, QGaLoreLinear):
            if int8_param:
                local, r0 = row_view(mod.weight)
                codes_dst, scales_dst = local.codes, local.scales
            else:
                codes_dst, scales_dst, r0 = mod.weight_codes, mod.weight_scales, getattr(mod, "row_offset", 0)
            codes, scales = _int8_rows(source, mod, (r0, r0 + int(codes_dst.shape[0])), codes_dst.device)
            codes_dst.copy_(codes)
            scales_dst.copy_(scales)
        own = [(n, t) for n, t in mod._parameters.items() if t is not None and not (int8_param and n == "weight")]
        own += [(n, t) for n, t in mod._buffers.items()
                if t is not None and n not in mod._non_persistent_buffers_set
                and not (isinstance(mod, QGaLoreLinear) and n in ("weight_codes", "weight_scales"))]
        for n, t in own:
            if id(t) in done:
                continue
            done.add(id(t))
            local, r0 = row_view(t)
            rows = (r0, r0 + int(local.shape[0])) if t.dim() else (0, 1)
            local.copy_(source.dense_rows(prefix + n, mod, tuple(t.shape), rows, local.dtype, local.device))


def materialize(model: nn.Module, source: ParamSource, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                device: torch.device | str = "cpu", dense_dtype: torch.dtype = torch.float32, quantize: bool = True,
                rows: RowRange | None = None) -> list[str]:
    """Materialise a model built on the meta device from ``source`` in this process, in place: the
    :func:`int8_skeleton` (with ``quantize``; codes int8 [m, n], scales fp32 [m, ceil(n / group_size)], biases in
    ``dense_dtype``; only rows ``[r0, r1)`` with ``rows``), every other parameter in ``dense_dtype`` (all of them
    without ``quantize``), allocated on ``device`` and :func:`fill`-ed; rotary buffers rebuilt, tied weights
    re-tied. Returns the names of the quantised modules."""
    targets = int8_skeleton(model, target_modules, group_size, rows, dense_dtype) if quantize else []
    cast_dense(model, dense_dtype)
    allocate_and_fill(model, source, device)
    return targets


def allocate_and_fill(model: nn.Module, source: ParamSource, device: torch.device | str, tie: bool = True) -> None:
    """The end of every materialisation, once each tensor has its final layout (whole, row shard, FSDP2
    DTensor): allocate everything still on the meta device (``to_empty``), re-tie tied weights (``tie``: not across
    FSDP2 units), :func:`fill` from ``source``, rebuild rotary buffers; an error if anything stayed on meta."""
    model.to_empty(device=device)
    if tie and hasattr(model, "tie_weights"):
        model.tie_weights()  # casts and to_empty gave each name of a tied pair its own tensor again
    fill(model, source)
    from ..models.arch import init_non_persistent_buffers
    from ..models.build import rebuild_rotary_buffers

    rebuild_rotary_buffers(model, device)
    init_non_persistent_buffers(model)  # the others no checkpoint holds (Gemma's embed_scale)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"materialize: {len(left)} tensors left on the meta device (first: {left[0]})")


@dataclass
class PendingModel:
    """A model on the meta device — its INT8 skeleton in place, dense parameters in their storage dtype — and the
    source of its values: what a sharding engine lays out (``fully_shard``) before anything is allocated, then
    fills with :func:`allocate_and_fill`; other engines take :meth:`materialize`."""

    model: nn.Module
    source: ParamSource

    def materialize(self, device: torch.device | str, tie: bool = True) -> nn.Module:
        """The whole model on ``device``."""
        allocate_and_fill(self.model, self.source, device, tie)
        return self.model


def cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter of a (meta) model in ``dtype`` (its storage dtype), in place."""
    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                mod._parameters[n] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)


def materialize_quantized(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                          seed: int = 0, device: torch.device | str = "cpu",
                          dense_dtype: torch.dtype = torch.float32, init_std: float | None = None) -> list[str]:
    """Turn a model built on the meta device into a freshly initialised INT8 model on ``device``, in place
    (:class:`KeyedRandomInit`: every rank and engine materialises identical codes without communicating).
    Returns the names of the quantised modules."""
    return materialize(model, KeyedRandomInit(model, seed, init_std), target_modules, group_size, device,
                       dense_dtype)
