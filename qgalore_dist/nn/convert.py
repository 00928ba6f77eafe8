"""Turn a ``transformers`` causal LM into one whose targeted linears hold INT8 weights.

**Which matrices are targeted.** ``target_modules`` names layers the way LLaMA does (``q_proj`` ... ``down_proj``,
the default): a layer is targeted when its last name component or its full name is listed. Architectures that fuse
or rename these projections are matched through :data:`FUSED_ROLES`, the LLaMA projections each of their layers
computes: Phi-3's ``qkv_proj`` is targeted by ``q_proj, k_proj, v_proj`` (or by its own name), GPT-2's ``attn.c_proj``
by ``o_proj``, a Mixtral expert's ``gate_up_proj`` by ``gate_proj, up_proj``. A fused matrix is projected whole, so
naming only some of its roles is refused (:class:`~qgalore_dist.errors.UsageError`) rather than guessed. A linear
inside a ``ModuleList`` (one expert's matrix, ``experts.gate_up_proj.3``) is matched by the list's name.

The structural conversions that make GPT-2's ``Conv1D`` and MoE 3-D expert tensors into ordinary [out, in]
matrices live in :mod:`.layout`; :func:`quantize_model` runs them first.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..quant.int8 import quantize_rows
from ..quant.rng import SALT_INIT, stream_key
from .int8_linear import QGaLoreLinear

__all__ = ["DEFAULT_TARGET_MODULES", "FUSED_ROLES", "find_target_linears", "is_target", "linear_layer_names",
           "matches_target", "quantize_linear", "quantize_model", "set_submodule", "unmatched_targets"]

# attention and MLP projections of LLaMA / Mistral / Qwen style models (GaLore's and Q-GaLore's default targets)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: ``"<parent>.<leaf>"`` or ``"<leaf>"`` of a layer -> the LLaMA projections it computes (the more specific key
#: wins): Phi-3 and MoE experts fuse projections, GPT-2 names them differently (its MLP has no gate).
FUSED_ROLES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),  # Phi-3 attention
    "gate_up_proj": ("gate_proj", "up_proj"),  # Phi-3 MLP; Mixtral / Qwen2-MoE experts (3-D, one matrix per expert)
    "attn.c_attn": ("q_proj", "k_proj", "v_proj"),  # GPT-2 (Conv1D)
    "attn.c_proj": ("o_proj",),
    "mlp.c_fc": ("up_proj",),
    "mlp.c_proj": ("down_proj",),
}

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _match_parts(name: str) -> list[str]:
    """Name components a target is matched on: a linear that is an item of a ``ModuleList`` (``...experts.
    gate_up_proj.3``, one expert's matrix) is matched by the list's name."""
    parts = name.split(".")
    return parts[:-1] if len(parts) > 1 and parts[-1].isdigit() else parts


def matches_target(name: str, target_modules: Sequence[str]) -> bool:
    """Whether the layer (or 3-D expert parameter) ``name`` is targeted by ``target_modules`` (module docstring).

    Raises :class:`UsageError` when ``target_modules`` names some but not all projections a fused layer computes.
    """
    parts = _match_parts(name)
    leaf = parts[-1]
    if leaf in target_modules or name in target_modules:
        return True
    roles = FUSED_ROLES.get(".".join(parts[-2:])) or FUSED_ROLES.get(leaf)
    if not roles:
        return False
    named = [r for r in roles if r in target_modules]
    if named and len(named) < len(roles):
        missing = [r for r in roles if r not in named]
        raise UsageError(f"target_modules names {', '.join(named)} but not {', '.join(missing)}: "
                         f"{_pattern('.'.join(parts))} computes {', '.join(roles)} in one matrix, which is projected "
                         f"whole; name all of them (or {leaf}), or none")
    return bool(named)


def is_target(name: str, module: nn.Module, target_modules: tuple[str, ...] | list[str]) -> bool:
    """A module is targeted when it is an ``nn.Linear`` (or already converted) and :func:`matches_target`."""
    if not isinstance(module, (nn.Linear, QGaLoreLinear)):
        return False
    return matches_target(name, tuple(target_modules))


def _pattern(name: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``model.layers.*.mlp.experts.down_proj`` (short warnings)."""
    return _LAYER_INDEX.sub(".*", name)


def _dedup(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def find_target_linears(model: nn.Module, target_modules=DEFAULT_TARGET_MODULES) -> dict[str, nn.Module]:
    """``{module name: module}`` of every targeted linear, in model order.

    Layers whose names are targeted but which are no linear (a GPT-2 ``Conv1D`` or MoE 3-D expert tensors not
    converted by :func:`~.layout.prepare_int8_layout`, as in the float reference mode; an unknown layer type) are
    left dense with a warning naming them.
    """
    targets = tuple(target_modules)
    found: dict[str, nn.Module] = {}
    skipped: list[str] = []
    for n, m in model.named_modules():
        if not n:
            continue
        if isinstance(m, (nn.Linear, QGaLoreLinear)):
            if matches_target(n, targets):
                found[n] = m
        elif not isinstance(m, nn.ModuleList) and matches_target(n, targets):
            skipped.append(f"{_pattern(n)} ({type(m).__name__})")
        for pname, p in m.named_parameters(prefix=n, recurse=False):
            if p.dim() == 3 and matches_target(pname, targets):
                skipped.append(f"{_pattern(pname)} (3-D experts of {type(m).__name__})")
    if skipped:
        warnings.warn("targeted layers left dense (no INT8 conversion for them here): "
                      + ", ".join(_dedup(skipped)), stacklevel=2)
    return found


def linear_layer_names(model: nn.Module) -> list[str]:
    """The leaf names of the model's linear layers (``nn.Linear``, INT8, GPT-2 ``Conv1D``, 3-D expert tensors),
    deduplicated, in model order: what ``target_modules`` can name."""
    names = []
    for n, m in model.named_modules():
        if not n or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        if isinstance(m, (nn.Linear, QGaLoreLinear)) or type(m).__name__ == "Conv1D":
            names.append(_match_parts(n)[-1])
        names += [pn for pn, p in m.named_parameters(recurse=False) if p.dim() == 3]
    return _dedup(names)


def unmatched_targets(model: nn.Module, target_modules: Sequence[str]) -> UsageError:
    """The error for ``target_modules`` that matched nothing, listing the linear layer names the model has."""
    return UsageError(f"target_modules={list(target_modules)!r} matched no linear layer of the "
                      f"{type(model).__name__}; its linear layers are: {', '.join(linear_layer_names(model))}")


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
    """Replace every targeted ``nn.Linear`` by a :class:`QGaLoreLinear` in place (targeted GPT-2 ``Conv1D`` and MoE
    experts are first turned into [out, in] linears, :func:`~.layout.prepare_int8_layout`); returns the replaced
    names."""
    from .layout import prepare_int8_layout  # layout builds on this module's target matching

    prepare_int8_layout(model, target_modules)
    targets = [(n, m) for n, m in find_target_linears(model, target_modules).items() if isinstance(m, nn.Linear)]
    if not targets:
        raise unmatched_targets(model, target_modules)
    for name, lin in targets:
        set_submodule(model, name, quantize_linear(name, lin, group_size, seed))
    return [n for n, _ in targets]
