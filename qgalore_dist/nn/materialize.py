"""Materialise a meta-device model straight into INT8, one matrix at a time.

A 7B model must never exist in fp32/bf16: each targeted linear is initialised in fp32 on its own (the largest
LLaMA-7B matrix is 4096×11008 → 180 MB transient), quantised with the keyed stochastic-rounding stream, and
dropped before the next. Dense modules (embeddings, norms, lm_head) are then allocated with ``to_empty`` and
initialised with the model's own ``_init_weights``, in ``dense_dtype``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.int8 import quantize_rows
from ..quant.rng import SALT_INIT, stream_key
from .convert import DEFAULT_TARGET_MODULES, find_target_linears, set_submodule
from .int8_linear import QGaLoreLinear


def _init_generator(seed: int, name: str) -> torch.Generator:
    k1, k2 = stream_key(seed, 0, name, SALT_INIT ^ 0xFFFF)
    return torch.Generator(device="cpu").manual_seed((k1 << 32) | k2)


def materialize_quantized(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                          seed: int = 0, device: torch.device | str = "cpu",
                          dense_dtype: torch.dtype = torch.float32, init_std: float | None = None) -> list[str]:
    """Turn a model built on the meta device into a trainable INT8 model on ``device``, in place.

    Targeted linears get weights ~ N(0, init_std²) (default ``config.initializer_range``) drawn from a generator
    keyed by (seed, name) — so every rank and every engine materialises identical codes without communicating —
    then quantised with the initial stochastic-rounding stream. Returns the names of the quantised modules.
    """
    std = init_std if init_std is not None else getattr(getattr(model, "config", None), "initializer_range", 0.02)
    targets = [(n, m) for n, m in find_target_linears(model, target_modules).items() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError(f"target_modules={list(target_modules)!r} matched no nn.Linear in the model")
    for name, lin in targets:
        q = QGaLoreLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, group_size=group_size,
                          device=device, bias_dtype=dense_dtype)
        q.qname = f"{name}.weight"
        w = torch.randn(lin.out_features, lin.in_features, generator=_init_generator(seed, q.qname)).mul_(std)
        codes, scales = quantize_rows(w.to(device), group_size, 8, stream_key(seed, 0, q.qname, SALT_INIT))
        del w
        q.weight_codes.copy_(codes)
        q.weight_scales.copy_(scales)
        set_submodule(model, name, q)
    init_fn = getattr(model, "_init_weights", None)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)  # dense init draws from the global RNG: make it a function of the seed
    for module in model.modules():
        on_meta = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                   if t.is_meta]
        if not on_meta:
            continue
        module.to_empty(device=device, recurse=False)
        if init_fn is not None:
            init_fn(module)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dense_dtype)
    torch.set_rng_state(gen_state)
    from ..models.build import rebuild_rotary_buffers

    rebuild_rotary_buffers(model, device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return [n for n, _ in targets]
