"""Model configs and construction: shipped LLaMA configs (20M ... 7B, tiny), meta-device builds, parameter counts.

Typical use::

    config = resolve_model_config("llama_60m", vocab_size=len(tokenizer))
    model = build_model(config, meta=True)   # no storage; materialise layer by layer into INT8
"""

from qgalore_dist.models.build import (
    ModelSpecError,
    build_model,
    enable_activation_checkpointing,
    load_pretrained,
    param_count,
    rebuild_rotary_buffers,
    resolve_model_config,
    shipped_config_names,
)

__all__ = [
    "ModelSpecError",
    "build_model",
    "enable_activation_checkpointing",
    "load_pretrained",
    "param_count",
    "rebuild_rotary_buffers",
    "resolve_model_config",
    "shipped_config_names",
]
