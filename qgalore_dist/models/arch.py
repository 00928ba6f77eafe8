"""What qgalore_dist knows per architecture, beyond the target names (:mod:`qgalore_dist.nn.convert`) and the
INT8 layout conversions (:mod:`qgalore_dist.nn.layout`): where the decoder layers are, how checkpoints written per
expert hold MoE experts, and the projected / dense parameter counts of a prepared model.

Supported and tested (``tests/unit/test_architectures.py``): LLaMA, Mistral, Qwen2 (q/k/v biases), Gemma,
Gemma-2, Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``), Mixtral and Qwen2-MoE (3-D experts, one projected matrix
per expert), GPT-2 (``Conv1D``, projected as its [out, in] transpose).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelSpecError
from ..nn.int8_linear import QGaLoreLinear
from ..nn.layout import SUPPORTED_MODEL_TYPES

__all__ = ["LEGACY_EXPERT_FILES", "SUPPORTED_MODEL_TYPES", "LegacyExperts", "decoder_layer_modules",
           "init_non_persistent_buffers", "parameter_counts"]


@dataclass(frozen=True)
class LegacyExperts:
    """How files written one tensor per expert hold the 3-D expert parameters of transformers >= 5.

    The hub's Mixtral / Qwen2-MoE checkpoints, and what ``save_pretrained`` of transformers 5 still writes, hold
    ``<experts>.<e>.<part>.weight`` per expert; transformers fuses them while loading (``conversion_mapping.py``:
    ``MergeModulelist`` over experts, ``Concatenate`` of the parts along rows) and splits them back when saving.
    qgalore_dist reads the same files tensor by tensor instead, so it needs the map read backwards.
    """

    #: (name fragment in transformers >= 5, the fragment in the files): Mixtral's ``block_sparse_moe`` became ``mlp``
    renames: tuple[tuple[str, str], ...] = ()
    #: 3-D parameter -> the per-expert file tensors whose rows it concatenates, in order (gate rows, then up rows)
    parts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def file_name(self, name: str) -> str:
        """``name`` (transformers >= 5) as the files spell it."""
        for new, old in self.renames:
            name = name.replace(new, old)
        return name


#: the per-expert file formats, by the model type that writes them (mirrors transformers/conversion_mapping.py)
LEGACY_EXPERT_FILES: dict[str, LegacyExperts] = {
    "mixtral": LegacyExperts(renames=((".mlp.", ".block_sparse_moe."),),
                             parts={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}),
    "qwen2_moe": LegacyExperts(parts={"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}),
}


def decoder_layer_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer of ``model``, in model order: the modules whose class is named in the
    ``_no_split_modules`` of the model or of any ``PreTrainedModel`` inside it (``LlamaDecoderLayer``,
    ``GPT2Block``, ``MixtralDecoderLayer`` ...: what transformers itself never splits across devices), outermost
    only. Pure: nothing is changed. Raises :class:`ModelSpecError` when the model declares none, or none exists."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    if not names:
        raise ModelSpecError(f"{type(model).__name__} declares no _no_split_modules: its decoder layers are unknown")
    layers: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules under a layer already taken
    for m in model.modules():  # pre-order: a layer comes before what it contains
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            layers.append(m)
            inside.update(id(s) for s in m.modules())
    if not layers:
        raise ModelSpecError(f"{type(model).__name__} holds no module of its _no_split_modules {sorted(names)}")
    return layers


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(projected, dense)`` element counts of a prepared model: projected = the whole ``m·n`` of every INT8
    matrix (:class:`QGaLoreLinear`, also when this process holds only a row shard), dense = every other parameter
    (tied parameters once; a QGaLoreLinear's bias is dense). Works on the meta device."""
    projected = 0
    int8_params: set[int] = set()
    for m in model.modules():
        if isinstance(m, QGaLoreLinear):
            projected += m.out_features * m.in_features
            w = m._parameters.get("weight")  # the FSDP2 source's Int8RowTensor parameter
            if w is not None:
                int8_params.add(id(w))
    dense = sum(p.numel() for p in model.parameters() if id(p) not in int8_params)
    return projected, dense


def init_non_persistent_buffers(model: nn.Module) -> int:
    """Set the non-persistent buffers of a model materialised from the meta device — values no checkpoint holds,
    left uninitialised by ``to_empty`` (Gemma's ``embed_scale`` = √hidden) — by the model's own ``_init_weights``,
    module by module, as ``from_pretrained`` does. Rotary modules (``inv_freq``) are left to
    :func:`~qgalore_dist.models.build.rebuild_rotary_buffers`. The module's parameters and persistent buffers are
    flagged ``_is_hf_initialized`` during the call, which transformers' init functions (``transformers.
    initialization``) honour by leaving them alone. Returns how many modules were initialised."""
    init_fn = getattr(model, "_init_weights", None)
    if init_fn is None:
        return 0
    done = 0
    for module in model.modules():
        volatile = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not volatile or hasattr(module, "inv_freq"):
            continue
        keep = [t for t in module._parameters.values() if t is not None]
        keep += [t for n, t in module._buffers.items() if t is not None and n not in volatile]
        flagged = [t for t in keep if not getattr(t, "_is_hf_initialized", False)]
        for t in flagged:
            t._is_hf_initialized = True
        try:
            with torch.no_grad():
                init_fn(module)
        finally:
            for t in flagged:
                del t._is_hf_initialized
        done += 1
    return done
