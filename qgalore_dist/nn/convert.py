"""Turn a ``transformers`` causal LM into one whose targeted linears hold INT8 weights."""

from __future__ import annotations

import torch
from torch import nn

from ..quant.int8 import quantize_rows
from ..quant.rng import SALT_INIT, stream_key
from .int8_linear import QGaLoreLinear

# attention and MLP projections of LLaMA / Mistral / Qwen style models (GaLore's and Q-GaLore's default targets)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_target(name: str, module: nn.Module, target_modules: tuple[str, ...] | list[str]) -> bool:
    """A module is targeted when it is an ``nn.Linear`` (or already converted) whose last name component is in
    ``target_modules``, or whose full name equals an entry."""
    if not isinstance(module, (nn.Linear, QGaLoreLinear)):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf in target_modules or name in target_modules


def find_target_linears(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES) -> dict[str, nn.Module]:
    """``{module name: module}`` of every targeted linear, in model order."""
    return {n: m for n, m in model.named_modules() if n and is_target(n, m, tuple(target_modules))}


def quantize_linear(name: str, linear: nn.Linear, group_size: int, seed: int) -> QGaLoreLinear:
    """INT8 copy of ``linear``; the initial rounding is stochastic, keyed by (seed, step 0, name) so every engine
    and every rank starts from identical codes."""
    q = QGaLoreLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      group_size=group_size, device=linear.weight.device,
                      bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
    qname = f"{name}.weight"
    codes, scales = quantize_rows(linear.weight.data, group_size, 8, stream_key(seed, 0, qname, SALT_INIT))
    q.weight_codes.copy_(codes)
    q.weight_scales.copy_(scales)
    if linear.bias is not None:
        q.bias.data.copy_(linear.bias.data)
    q.qname = qname
    return q


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def quantize_model(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES, group_size: int = 256,
                   seed: int = 0) -> list[str]:
    """Replace every targeted ``nn.Linear`` by a :class:`QGaLoreLinear` in place; returns the replaced names."""
    targets = [(n, m) for n, m in find_target_linears(model, target_modules).items() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError(f"target_modules={list(target_modules)!r} matched no nn.Linear in the model")
    for name, lin in targets:
        set_submodule(model, name, quantize_linear(name, lin, group_size, seed))
    return [n for n, _ in targets]
