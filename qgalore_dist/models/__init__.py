"""Model configs and construction: shipped LLaMA configs (20M ... 7B, tiny), meta-device builds, parameter counts.

Typical use::

    config = resolve_model_config("llama_60m", vocab_size=len(tokenizer))
    model = build_model(config, meta=True)   # no storage; materialise layer by layer into INT8
    model = load_quantized_pretrained("path/to/hf_dir")   # safetensors straight into INT8, tensor by tensor
"""

from qgalore_dist.models.build import (
    ModelSpecError,
    build_model,
    enable_activation_checkpointing,
    filled_defaults,
    load_pretrained,
    param_count,
    rebuild_rotary_buffers,
    resolve_model_config,
    shipped_config_names,
)
from qgalore_dist.models.pretrained import (
    SafetensorsCheckpoint,
    SafetensorsSource,
    load_quantized_pretrained,
    pretrained_eval_loss,
    pretrained_source,
    safetensors_files,
    streamed_float_model,
)

__all__ = [
    "ModelSpecError",
    "SafetensorsCheckpoint",
    "SafetensorsSource",
    "build_model",
    "enable_activation_checkpointing",
    "filled_defaults",
    "load_pretrained",
    "load_quantized_pretrained",
    "param_count",
    "pretrained_eval_loss",
    "pretrained_source",
    "rebuild_rotary_buffers",
    "resolve_model_config",
    "safetensors_files",
    "shipped_config_names",
    "streamed_float_model",
]
