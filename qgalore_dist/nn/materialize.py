"""Materialise a meta-device model straight into INT8, one matrix at a time.

A 7B model must never exist in fp32/bf16: each targeted linear gets its float values on its own (the largest
LLaMA-7B matrix is 4096×11008 → 180 MB transient in fp32), is quantised, and its float copy is dropped before the
next. Dense modules (embeddings, norms, lm_head) are then materialised module by module in ``dense_dtype``.

*Where the values come from* is the one thing that varies, so it is a seam, :class:`ParamSource`:

* :class:`KeyedRandomInit` — a fresh model (:func:`materialize_quantized`): N(0, std²) from a generator keyed by
  (seed, name), rounded with the keyed stochastic-rounding stream; dense modules from the model's ``_init_weights``;
* ``models.pretrained.SafetensorsSource`` — a pretrained checkpoint read from memory-mapped safetensors files,
  rounded to nearest.

:func:`materialize` is the single loop both go through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

from ..quant.int8 import quantize_rows
from ..quant.rng import SALT_INIT, stream_key
from .convert import DEFAULT_TARGET_MODULES, find_target_linears, set_submodule
from .int8_linear import QGaLoreLinear

__all__ = ["KeyedRandomInit", "ParamSource", "RowRange", "materialize", "materialize_quantized"]

#: ``rows(qname, out_features) -> (r0, r1)``: the weight rows ``[r0, r1)`` of a targeted linear this process keeps.
RowRange = Callable[[str, int], tuple[int, int]]


class ParamSource(Protocol):
    """Where the values of a meta-built model come from (the seam of :func:`materialize`)."""

    def matrix_rows(self, qname: str, shape: tuple[int, int], rows: tuple[int, int],
                    device: torch.device | str) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Float rows ``[r0, r1)`` of the targeted weight ``qname`` (whole shape ``[m, n]``) -> ``([r1 - r0, n]``
        any float dtype on ``device``, rounding key: a keyed stochastic-rounding stream, or ``None`` = nearest)."""
        ...

    def fill_bias(self, name: str, bias: nn.Parameter) -> None:
        """Write the bias ``[m]`` of the targeted linear ``name`` into ``bias`` (allocated, in the dense dtype)."""
        ...

    def fill_dense(self, name: str, module: nn.Module, device: torch.device | str, dense_dtype: torch.dtype) -> None:
        """Materialise the meta parameters and buffers of ``module`` (called ``name``, only its own: not its
        children's) on ``device``; parameters in ``dense_dtype``."""
        ...

    def dense_phase(self) -> AbstractContextManager[None]:
        """A context the dense modules are materialised in (e.g. a seeded global RNG)."""
        ...

    # optional: ``int8_rows(qname, rows, group_size, device) -> (codes [r1 - r0, n] int8, scales [r1 - r0,
    # ceil(n / group_size)] fp32) | None`` — INT8 rows the source already holds, taken as they are (re-quantising
    # dequantised codes need not give the same codes back); None: quantise ``matrix_rows`` instead


class KeyedRandomInit:
    """A fresh model, identical on every rank and engine without communicating.

    Targeted weights ~ N(0, std²) from a generator keyed by (seed, name), rounded with the initial keyed
    stochastic-rounding stream (seed, step 0, name); dense modules from the model's ``_init_weights`` under the
    global RNG seeded with ``seed`` (restored afterwards); targeted biases zero (what ``_init_weights`` does).
    """

    def __init__(self, model: nn.Module, seed: int = 0, init_std: float | None = None):
        self.seed = seed
        config = getattr(model, "config", None)
        self.std = init_std if init_std is not None else getattr(config, "initializer_range", 0.02)
        self.init_fn: Callable[[nn.Module], None] | None = getattr(model, "_init_weights", None)

    def _generator(self, name: str) -> torch.Generator:
        k1, k2 = stream_key(self.seed, 0, name, SALT_INIT ^ 0xFFFF)
        return torch.Generator(device="cpu").manual_seed((k1 << 32) | k2)

    def matrix_rows(self, qname, shape, rows, device):
        # a generator stream cannot skip ahead by rows: draw the whole matrix (one matrix transient) and slice
        w = torch.randn(*shape, generator=self._generator(qname)).mul_(self.std)
        r0, r1 = rows
        if (r0, r1) != (0, shape[0]):
            w = w[r0:r1]
        return w.to(device), stream_key(self.seed, 0, qname, SALT_INIT)

    def fill_bias(self, name, bias):
        pass  # QGaLoreLinear allocates zeros, as `_init_weights` sets a linear's bias

    def fill_dense(self, name, module, device, dense_dtype):
        module.to_empty(device=device, recurse=False)
        if self.init_fn is not None:
            self.init_fn(module)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dense_dtype)

    @contextmanager
    def dense_phase(self) -> Iterator[None]:
        gen_state = torch.get_rng_state()
        torch.manual_seed(self.seed)  # dense init draws from the global RNG: make it a function of the seed
        try:
            yield
        finally:
            torch.set_rng_state(gen_state)


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))


def materialize(model: nn.Module, source: ParamSource, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                device: torch.device | str = "cpu", dense_dtype: torch.dtype = torch.float32, quantize: bool = True,
                rows: RowRange | None = None) -> list[str]:
    """Materialise a model built on the meta device from ``source``, in place, one matrix / module at a time.

    With ``quantize`` each targeted ``nn.Linear`` ([m, n] weight) becomes a :class:`QGaLoreLinear`: codes int8
    [m, n] and scales float32 [m, ceil(n / group_size)] from ``quantize_rows`` of the source's float rows with the
    source's rounding key; its bias [m] in ``dense_dtype``. ``rows`` keeps only weight rows ``[r0, r1)`` of each
    targeted linear (codes [r1 - r0, n], ``row_offset = r0``; keyed rounding uses global row indices, so the rows
    equal those of the whole matrix): such a module is a row shard, not runnable until its engine installs a
    row-shard source. Every other parameter / buffer (all of them without ``quantize``) is materialised by
    ``source.fill_dense`` in ``dense_dtype``. Rotary buffers are rebuilt and tied weights re-tied.
    Returns the names of the quantised modules.
    """
    targets = [(n, m) for n, m in find_target_linears(model, target_modules).items() if isinstance(m, nn.Linear)]
    if quantize and not targets:
        raise ValueError(f"target_modules={list(target_modules)!r} matched no nn.Linear in the model")
    if not quantize:
        targets = []
    for name, lin in targets:
        q = QGaLoreLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, group_size=group_size,
                          device=device, bias_dtype=dense_dtype)
        q.qname = f"{name}.weight"
        r0, r1 = rows(q.qname, lin.out_features) if rows is not None else (0, lin.out_features)
        if not 0 <= r0 <= r1 <= lin.out_features:
            raise ValueError(f"{q.qname}: row range [{r0}, {r1}) outside its {lin.out_features} rows")
        stored = getattr(source, "int8_rows", None)  # a source that already holds INT8 (one of our checkpoints)
        got = stored(q.qname, (r0, r1), group_size, device) if stored is not None else None
        if got is not None:
            codes, scales = got
        else:
            w, key = source.matrix_rows(q.qname, (lin.out_features, lin.in_features), (r0, r1), device)
            codes, scales = quantize_rows(w, group_size, 8, key, row_offset=r0)
            del w
        if (r0, r1) == (0, lin.out_features):
            q.weight_codes.copy_(codes)
            q.weight_scales.copy_(scales)
        else:  # a row shard: the buffers hold only the kept rows
            q.weight_codes, q.weight_scales = codes, scales
            q.row_offset = r0
        if q.bias is not None:
            source.fill_bias(f"{name}.bias", q.bias)
        set_submodule(model, name, q)
    with source.dense_phase():
        for name, module in model.named_modules():
            if _has_meta(module):
                source.fill_dense(name, module, device, dense_dtype)
    from ..models.build import rebuild_rotary_buffers

    rebuild_rotary_buffers(model, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"materialize: {len(left)} tensors left on the meta device (first: {left[0]})")
    return [n for n, _ in targets]


def materialize_quantized(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                          seed: int = 0, device: torch.device | str = "cpu",
                          dense_dtype: torch.dtype = torch.float32, init_std: float | None = None) -> list[str]:
    """Turn a model built on the meta device into a trainable INT8 model on ``device``, in place.

    Targeted linears get weights ~ N(0, init_std²) (default ``config.initializer_range``) drawn from a generator
    keyed by (seed, name) — so every rank and every engine materialises identical codes without communicating —
    then quantised with the initial stochastic-rounding stream. Returns the names of the quantised modules.
    """
    return materialize(model, KeyedRandomInit(model, seed, init_std), target_modules, group_size, device,
                       dense_dtype)
