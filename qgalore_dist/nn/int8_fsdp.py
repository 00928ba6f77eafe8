"""INT8 weights that FSDP2 shards by rows and all-gathers as INT8 codes + scales (docs/design.md §3, FSDP2).

:class:`Int8RowTensor` is a tensor subclass whose *logical* value is a float ``[rows, n]`` matrix (its dtype is the
compute dtype) stored as int8 codes ``[rows, n]`` + fp32 row-aligned group scales ``[rows, G]`` — the same layout
as :class:`~qgalore_dist.quant.int8.Int8Weight`, so a row shard never splits a scale group. ``fully_shard`` splits it
on dim 0 like ``torch.chunk`` (uneven and empty shards included); the subclass implements the few view / copy ops
FSDP2 applies while sharding (split, slice, new_zeros, copy_, view, as_strided, detach) on codes and scales row by
row. For every forward / backward FSDP2 calls :meth:`Int8RowTensor.fsdp_pre_all_gather`, which hands it the codes
and the scales (each padded to ``ceil(m/N)`` rows), so the all-gather moves ``1 + 4/g`` bytes per element instead
of 2 (bf16) or 4 (fp32); :meth:`Int8RowTensor.fsdp_post_all_gather` wraps the gathered buffers in an unsharded
``Int8RowTensor`` without copying. The weight is dequantised only inside the INT8 linear's autograd function
(:class:`~qgalore_dist.nn.int8_linear.QGaLoreLinear` with its FSDP2 row source), which saves the (unsharded, INT8)
parameter — FSDP2 frees its buffers after forward and re-gathers them
before backward, so no float weight outlives one layer's matmul.

The gradient with respect to the weight is an ordinary float ``[m, n]`` tensor; FSDP2 reduce-scatters it into a
``Shard(0)`` DTensor whose local rows are what :class:`~qgalore_dist.parallel.row_sharded.RowShardedQGaLoreOptimizer`
consumes. The optimizer updates the local codes + scales in place (they are views of FSDP2's sharded storage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..quant.int8 import Int8Weight, dequantize_rows

if TYPE_CHECKING:
    from .int8_linear import QGaLoreLinear

__all__ = ["Int8RowTensor", "to_fsdp_int8", "ALL_GATHER_COUNTER"]

aten = torch.ops.aten


class _Counter:
    """Bytes this process receives through FSDP2 all-gathers of INT8 weights (each rank sends as much), counted
    in ``fsdp_pre_all_gather``: ring all-gather, ``(N-1)·P`` for a ``P``-byte padded shard."""

    def __init__(self) -> None:
        self.bytes = self.elements = self.calls = 0

    def reset(self) -> dict[str, int]:
        """This window's counts as metrics, and a new window."""
        out = {"int8_all_gather_bytes": self.bytes, "int8_all_gather_elements": self.elements,
               "int8_all_gather_calls": self.calls}
        self.bytes = self.elements = self.calls = 0
        return out


ALL_GATHER_COUNTER = _Counter()


class Int8RowTensor(torch.Tensor):
    """A float matrix ``[rows, n]`` held as int8 ``codes`` ``[rows, n]`` + fp32 ``scales`` ``[rows, G]``.

    ``global_rows``: rows of the whole matrix (FSDP2 pads each shard to ``ceil(global_rows / N)`` rows for the
    all-gather). ``qname``: the parameter name (informational).
    """

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
                global_rows: int | None = None):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype,
                 global_rows: int | None = None):
        if codes.dim() != 2 or scales.dim() != 2 or codes.shape[0] != scales.shape[0]:
            raise ValueError(f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} must be 2-D with equal rows")
        self.codes = codes
        self.scales = scales
        self.group_size = group_size
        self.global_rows = int(codes.shape[0] if global_rows is None else global_rows)

    # --- tensor-subclass plumbing (torch.compile / DTensor friendly) -----------------------------------------
    def __tensor_flatten__(self):
        return ["codes", "scales"], (self.group_size, self.dtype, self.global_rows)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return Int8RowTensor(inner["codes"], inner["scales"], meta[0], meta[1], meta[2])

    def __repr__(self) -> str:
        return (f"Int8RowTensor(shape={tuple(self.shape)}, dtype={self.dtype}, group_size={self.group_size}, "
                f"global_rows={self.global_rows})")

    def _like(self, codes: torch.Tensor, scales: torch.Tensor) -> "Int8RowTensor":
        return Int8RowTensor(codes, scales, self.group_size, self.dtype, self.global_rows)

    def int8_weight(self) -> Int8Weight:
        """The codes + scales as :class:`Int8Weight` (shares storage: in-place updates land here)."""
        return Int8Weight(self.codes, self.scales, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scales, self.group_size, dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func) or _OPS.get(getattr(func, "overloadpacket", None))
        if handler is None:
            raise NotImplementedError(f"Int8RowTensor does not implement {func} (it only supports the row views "
                                      "and copies FSDP2 applies; compute goes through QGaLoreLinear)")
        return handler(func, args, kwargs)

    __torch_function__ = torch._C._disabled_torch_function_impl

    # --- FSDP2 all-gather extension ------------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh):
        """Codes and scales, each padded to ``ceil(global_rows / N)`` rows (every rank's inputs must be equal in
        size). The one-argument form of the hook is used on purpose: with the five-argument form FSDP2 requires
        every all-gather input of an unevenly sharded parameter to have the parameter's padded shape, which the
        ``[rows, G]`` scales cannot have."""
        n_ranks = mesh.size()
        pad = -(-self.global_rows // n_ranks)
        codes, scales = self.codes, self.scales
        if codes.shape[0] != pad:
            codes = torch.cat([codes, codes.new_zeros(pad - codes.shape[0], codes.shape[1])])
            scales = torch.cat([scales, scales.new_zeros(pad - scales.shape[0], scales.shape[1])])
        p = codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
        ALL_GATHER_COUNTER.bytes += (n_ranks - 1) * p
        ALL_GATHER_COUNTER.elements += (n_ranks - 1) * codes.numel()
        ALL_GATHER_COUNTER.calls += 1
        return (codes.contiguous(), scales.contiguous()), (self.group_size, self.global_rows)

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any,
                             param_dtype: torch.dtype, *, out: torch.Tensor | None = None):
        """Wrap the gathered buffers (``[N·pad, n]`` codes, ``[N·pad, G]`` scales; torch.chunk puts all padding at
        the end, so rows ``[0, m)`` are the matrix). Later gathers refill the same buffers: nothing to do then —
        and nothing may be written into ``out`` itself, or autograd sees its version counter move between the
        forward that saved it and the backward."""
        codes, scales = all_gather_outputs
        group_size, m = metadata
        if out is not None:
            return None
        dtype = self.dtype if param_dtype is None else param_dtype
        full = Int8RowTensor(codes[:m], scales[:m], group_size, dtype, m)
        return full, (codes, scales)


def _unwrap(t):
    return (t.codes, t.scales) if isinstance(t, Int8RowTensor) else (t, t)


def _split(func, args, kwargs):
    t, rest = args[0], args[1:]
    dim = rest[1] if len(rest) > 1 else kwargs.get("dim", 0)
    if dim != 0:
        raise NotImplementedError("Int8RowTensor splits by rows (dim 0) only")
    cs = func(t.codes, *rest, **kwargs)
    ss = func(t.scales, *rest, **kwargs)
    return [t._like(c, s) for c, s in zip(cs, ss)]


def _slice(func, args, kwargs):
    t = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if dim != 0:
        raise NotImplementedError("Int8RowTensor slices by rows (dim 0) only")
    return t._like(func(t.codes, *args[1:], **kwargs), func(t.scales, *args[1:], **kwargs))


def _new_zeros(func, args, kwargs):
    t, size = args[0], args[1]
    rows = int(size[0])
    if len(size) != 2 or int(size[1]) != t.shape[1]:
        raise NotImplementedError(f"Int8RowTensor.new_zeros({list(size)}): only [rows, {t.shape[1]}]")
    return t._like(t.codes.new_zeros(rows, t.codes.shape[1]), t.scales.new_zeros(rows, t.scales.shape[1]))


def _new_empty(func, args, kwargs):
    t, size = args[0], list(args[1])
    if _numel(size) != 0 and (len(size) != 2 or size[1] != t.shape[1]):
        raise NotImplementedError(f"Int8RowTensor.new_empty({size}): only [rows, {t.shape[1]}] or empty")
    rows = size[0] if len(size) == 2 else 0  # FSDP2's empty trailing shard: no rows
    return t._like(t.codes.new_empty(rows, t.codes.shape[1]), t.scales.new_empty(rows, t.scales.shape[1]))


def _numel(size) -> int:
    out = 1
    for s in size:
        out *= int(s)
    return out


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if not isinstance(src, Int8RowTensor):
        raise NotImplementedError("copying a float tensor into an Int8RowTensor would need a quantisation rule")
    dst.codes.copy_(src.codes)
    dst.scales.copy_(src.scales)
    return dst


def _view(func, args, kwargs):
    t, size = args[0], list(args[1])
    if size == list(t.shape):
        return t._like(t.codes, t.scales)
    if size == [-1] or size == [t.numel()]:
        # FSDP2 keeps a 1-D view of the padded shard (``_sharded_param_data``) for its default all-gather path,
        # which the extension replaces: an alias of the rows serves (nothing reads it as 1-D)
        return t._like(t.codes, t.scales)
    raise NotImplementedError(f"Int8RowTensor.view({size})")


def _as_strided(func, args, kwargs):
    t, size = args[0], list(args[1])
    if size == list(t.shape):
        return t._like(t.codes, t.scales)
    raise NotImplementedError(f"Int8RowTensor.as_strided({size})")


def _alias(func, args, kwargs):
    t = args[0]
    return t._like(t.codes, t.scales)


def _clone(func, args, kwargs):
    t = args[0]
    return t._like(t.codes.clone(), t.scales.clone())


def _to_copy(func, args, kwargs):
    t = args[0]
    device = kwargs.get("device", t.device)
    dtype = kwargs.get("dtype", t.dtype)
    return Int8RowTensor(t.codes.to(device), t.scales.to(device), t.group_size, dtype, t.global_rows)


def _empty_like(func, args, kwargs):
    """``Module.to_empty``: storage for codes and scales on the new device (a model built on the meta device and
    sharded there gets its row shards allocated, each rank only its own)."""
    t = args[0]
    device = kwargs.get("device") or t.device
    return Int8RowTensor(torch.empty_like(t.codes, device=device), torch.empty_like(t.scales, device=device),
                         t.group_size, t.dtype, t.global_rows)


def _is_same_size(func, args, kwargs):
    return tuple(args[0].shape) == tuple(args[1].shape)


_OPS = {
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_empty,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.is_same_size.default: _is_same_size,
    aten.empty_like.default: _empty_like,
}


def to_fsdp_int8(model: nn.Module, dtype: torch.dtype) -> dict[str, "QGaLoreLinear"]:
    """Switch every :class:`~qgalore_dist.nn.int8_linear.QGaLoreLinear` of ``model`` to the FSDP2 row source in
    place (its codes + scales become an :class:`Int8RowTensor` Parameter, no copy); ``dtype`` is the compute dtype.
    Returns ``{module name: module}``."""
    from .int8_linear import QGaLoreLinear

    swapped: dict[str, QGaLoreLinear] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QGaLoreLinear) and mod.source.kind == "buffer":
            mod.qname = mod.qname or f"{name}.weight"
            mod.use_fsdp_rows(dtype)
            swapped[name] = mod
    return swapped
