"""Every projected matrix as an [out, in] linear: the structural conversions an INT8 model needs, and the map back
to the transformers layout that checkpoints on disk and exports use.

An INT8 matrix is quantised in groups *within a row*, and rows are output features everywhere (row shards, the
VLoRP reshapes, the ownership plan). Two layer kinds of transformers do not hold their matrices that way:

* GPT-2's ``Conv1D`` stores its weight [in, out] (``y = x W + b``; kept for its original checkpoints,
  https://github.com/huggingface/transformers/issues/311). A targeted one becomes an ``nn.Linear`` holding the
  transpose [out, in] (then a ``QGaLoreLinear``); its bias is unchanged.
* MoE experts (Mixtral, Qwen2-MoE) are 3-D parameters ``gate_up_proj`` [E, 2·I, H] / ``down_proj`` [E, H, I]
  (transformers >= 5). Targeted experts become a :class:`~.experts.SplitExperts` with one linear per expert matrix.

:func:`prepare_int8_layout` converts the targeted layers of a model (on the meta device before materialisation,
or live) and returns the :class:`StoredAs` of each converted matrix: where its values live in the transformers
state dict (``...c_attn.weight`` transposed; slice ``e`` of ``...experts.gate_up_proj``). Loading reads through
it (``models.pretrained``); :func:`to_transformers_layout` applies it backwards when exporting. Plain linears are
stored as they are and are not listed.

Only targeted layers are converted: an untargeted ``Conv1D`` or experts module stays exactly as transformers built
it (dense, its own layout), and the float reference mode converts nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import CheckpointError, UsageError
from .convert import _dedup, _pattern, linear_layer_names, matches_target, set_submodule
from .experts import EXPERT_PARAMS, SplitExperts, supports

__all__ = ["SUPPORTED_MODEL_TYPES", "StoredAs", "int8_layout", "prepare_int8_layout", "to_transformers_layout"]

#: architectures whose projections the default targets cover and whose conversions are tested
#: (tests/unit/test_architectures.py); another model type gets a warning naming the linears it leaves dense
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe", "gpt2")


@dataclass(frozen=True)
class StoredAs:
    """Where the values of one projected matrix (weight [out, in] in the INT8 model) live in the transformers
    layout: tensor ``name`` of its state dict, as its transpose [in, out] (``transposed``, GPT-2 ``Conv1D``) or as
    slice ``expert`` of a 3-D [E, out, in] tensor (MoE experts)."""

    name: str
    transposed: bool = False
    expert: int | None = None


def _targeted(name: str, targets: Sequence[str] | None) -> bool:
    return targets is None or matches_target(name, targets)


def _experts_targeted(name: str, targets: Sequence[str] | None) -> bool:
    """Whether the experts module ``name`` is targeted: both its 3-D parameters or neither (an experts module is
    converted whole)."""
    hits = {p: _targeted(f"{name}.{p}", targets) for p in EXPERT_PARAMS}
    if len(set(hits.values())) > 1:
        raise UsageError(f"target_modules names {', '.join(p for p, h in hits.items() if h)} but not "
                         f"{', '.join(p for p, h in hits.items() if not h)} of {_pattern(name)}: the experts of a "
                         "layer are converted together; name gate_proj, up_proj and down_proj (or none)")
    return all(hits.values())


def int8_layout(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, StoredAs]:
    """``{weight name in the INT8 model: StoredAs}`` of every targeted ``Conv1D`` and supported expert matrix of a
    model in the transformers layout (``target_modules=None``: every one of them). Pure: changes nothing.

    A ``Conv1D`` ``M`` gives ``M.weight -> StoredAs("M.weight", transposed=True)``; a supported experts module
    ``X`` with E experts gives ``X.gate_up_proj.<e>.weight -> StoredAs("X.gate_up_proj", expert=e)`` and the same
    for ``down_proj``, for e in 0..E-1.
    """
    layout: dict[str, StoredAs] = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D) and _targeted(name, target_modules):
            layout[f"{name}.weight"] = StoredAs(f"{name}.weight", transposed=True)
        elif supports(module) and _experts_targeted(name, target_modules):
            for p in EXPERT_PARAMS:
                for e in range(getattr(module, p).shape[0]):
                    layout[f"{name}.{p}.{e}.weight"] = StoredAs(f"{name}.{p}", expert=e)
    return layout


def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    """``nn.Linear`` [out, in] computing ``conv``: on the meta device when it is, else holding ``conv.weight.T``."""
    lin = nn.Linear(conv.nx, conv.nf, bias=True, device="meta", dtype=conv.weight.dtype)  # no init draws
    if not conv.weight.is_meta:
        lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), conv.weight.requires_grad)
        lin.bias = nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad)
    return lin


def _warn_unknown_architecture(model: nn.Module, target_modules: Sequence[str]) -> None:
    """An architecture outside :data:`SUPPORTED_MODEL_TYPES` may name or fuse its projections in ways the targets
    do not know: name the linear layers it leaves dense (the output embedding is dense by design)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None or model_type in SUPPORTED_MODEL_TYPES:
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    left, projected = [], False
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            if matches_target(name, target_modules):
                projected = True
            else:
                left.append(_pattern(name))
        left += [_pattern(f"{name}.{p}") for p, t in module.named_parameters(recurse=False)
                 if t.dim() == 3 and not matches_target(f"{name}.{p}", target_modules)]
    if left and projected:  # nothing projected at all: the caller refuses, listing the layer names
        warnings.warn(f"model_type {model_type!r} is not one of the architectures whose projections are known "
                      f"({', '.join(SUPPORTED_MODEL_TYPES)}); of its linear layers "
                      f"({', '.join(linear_layer_names(model))}) these stay dense: {', '.join(_dedup(left))}",
                      stacklevel=3)


def prepare_int8_layout(model: nn.Module, target_modules: Sequence[str]) -> dict[str, StoredAs]:
    """Convert the targeted ``Conv1D`` s and supported experts modules of ``model`` in place (see the module
    docstring; meta stays meta, live weights are copied) and return their :func:`int8_layout`. Idempotent: a
    converted model has nothing left to convert and gives ``{}``.

    Raises :class:`UsageError` when an experts module is targeted in part; warns for an architecture outside
    :data:`SUPPORTED_MODEL_TYPES` that leaves linears dense.
    """
    targets = tuple(target_modules)
    layout = int8_layout(model, targets)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D) and f"{name}.weight" in layout:
            set_submodule(model, name, _linear_from_conv1d(module))
        elif supports(module) and f"{name}.{EXPERT_PARAMS[0]}.0.weight" in layout:
            set_submodule(model, name, SplitExperts.from_experts(module))
    _warn_unknown_architecture(model, targets)
    return layout


def to_transformers_layout(tensors: Iterable[tuple[str, torch.Tensor]],
                           layout: Mapping[str, StoredAs]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of an INT8 model's float state in the transformers layout: a matrix listed in
    ``layout`` is yielded as its stored tensor — a ``Conv1D`` weight transposed back to [in, out], the E expert
    matrices [out, in] of one 3-D parameter stacked into [E, out, in] once the last arrives (one 3-D tensor and
    its E slices exist at once); everything else passes unchanged, in order."""
    experts: dict[str, int] = {}
    for s in layout.values():
        if s.expert is not None:
            experts[s.name] = experts.get(s.name, 0) + 1
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors:
        s = layout.get(name)
        if s is None:
            yield name, t
        elif s.transposed:
            yield s.name, t.t().contiguous()
        else:
            got = pending.setdefault(s.name, {})
            got[s.expert] = t
            if len(got) == experts[s.name]:
                del pending[s.name]
                yield s.name, torch.stack([got[e] for e in range(experts[s.name])])
    if pending:
        name, got = next(iter(pending.items()))
        raise CheckpointError(f"the state holds {len(got)} of the {experts[name]} expert matrices of {name!r}")
