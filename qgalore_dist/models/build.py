"""Resolve model specs to `transformers` configs, build models (optionally on the meta device), count parameters.

A *spec* is one of:

* a shipped config name (``llama_20m`` ... ``llama_7b``, ``llama_tiny``), stored as JSON under ``configs/``;
* a path to a config JSON file;
* a local model directory holding ``config.json`` (e.g. a checkpoint to fine-tune).

Nothing here touches a model hub: this project runs on machines without one.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import ModelSpecError

__all__ = [
    "ModelSpecError",
    "shipped_config_names",
    "resolve_model_config",
    "build_model",
    "load_pretrained",
    "param_count",
    "rebuild_rotary_buffers",
]

_CONFIG_PACKAGE = "qgalore_dist.models"
_CONFIG_DIR = "configs"

# Model types whose parameter layout `param_count` computes in closed form (LLaMA-style decoder blocks:
# q/k/v/o + gate/up/down projections and two RMSNorms per layer). Others fall back to a meta-device build.
_LLAMA_LIKE = {"llama", "mistral"}


def _config_root() -> Path:
    # importlib.resources so this also works from an installed wheel (configs are package data).
    return Path(str(resources.files(_CONFIG_PACKAGE).joinpath(_CONFIG_DIR)))


def shipped_config_names() -> list[str]:
    """Names of the shipped configs, sorted by model size then name (``llama_tiny`` first)."""
    names = [p.stem for p in _config_root().glob("*.json")]
    return sorted(names, key=lambda n: (_size_key(n), n))


def _size_key(name: str) -> float:
    # "llama_60m" -> 60e6, "llama_1b" -> 1e9; unknown suffixes (e.g. "tiny") sort first.
    tail = name.rsplit("_", 1)[-1].lower()
    scale = {"m": 1e6, "b": 1e9}.get(tail[-1:], None)
    try:
        return float(tail[:-1]) * scale if scale else 0.0
    except ValueError:
        return 0.0


def _fail(spec: str, problem: str) -> ModelSpecError:
    return ModelSpecError(
        f"model spec {spec!r}: {problem}; shipped configs: {', '.join(shipped_config_names())}"
    )


def _read_config_json(spec: str, path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(spec, f"cannot read {path} ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(spec, f"malformed JSON in {path} (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise _fail(spec, f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _config_from_dict(spec: str, path: Path, data: dict[str, Any]) -> PretrainedConfig:
    model_type = data.get("model_type")
    if not model_type:
        raise _fail(spec, f"{path} has no 'model_type' field")
    if model_type not in CONFIG_MAPPING:
        raise _fail(spec, f"{path} has unknown model_type {model_type!r} for transformers {transformers.__version__}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError) as exc:
        raise _fail(spec, f"invalid config in {path} ({exc})") from exc


def resolve_model_config(spec: str | Path, vocab_size: int | None = None) -> PretrainedConfig:
    """Turn a spec (shipped name, config JSON path or local model directory) into a `PretrainedConfig`.

    ``vocab_size`` overrides the config's vocabulary (the shipped tokenizer's size, so embeddings match it).
    Raises `ModelSpecError` with a one-line message on an unknown name, a missing path or a malformed config.
    """
    spec_str = str(spec)
    shipped = _config_root() / f"{spec_str}.json"
    path = Path(spec_str).expanduser()
    # A shipped name wins over a same-named relative path only when no such path exists.
    if path.exists():
        if path.is_dir():
            cfg_path = path / "config.json"
            if not cfg_path.is_file():
                raise _fail(spec_str, f"directory {path} has no config.json")
        else:
            cfg_path = path
    elif "/" not in spec_str and "\\" not in spec_str and shipped.is_file():
        cfg_path = shipped
    elif "/" in spec_str or "\\" in spec_str or spec_str.endswith(".json"):
        raise _fail(spec_str, f"path {path} does not exist")
    else:
        raise _fail(spec_str, "not a shipped config name nor an existing path")

    config = _config_from_dict(spec_str, cfg_path, _read_config_json(spec_str, cfg_path))
    if vocab_size is not None:
        if vocab_size <= 0:
            raise ModelSpecError(f"model spec {spec_str!r}: vocab_size must be positive, got {vocab_size}")
        config.vocab_size = int(vocab_size)
    # Keep track of where the config came from (useful in logs and exported checkpoints).
    config._name_or_path = str(path if path.exists() else spec_str)
    return config


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; support both ends of the declared range.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def build_model(
    config: PretrainedConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
) -> PreTrainedModel:
    """Build a freshly initialised causal LM from ``config`` (`AutoModelForCausalLM.from_config`).

    ``meta=True`` builds every parameter and buffer on the ``meta`` device and returns the model
    un-materialised: no storage is allocated, so a 7B model costs only its Python objects. The caller
    materialises it (e.g. layer by layer straight into INT8); note that non-persistent buffers such as
    rotary ``inv_freq`` are meta too — `rebuild_rotary_buffers` recomputes them after ``to_empty``.
    Otherwise the model is constructed directly on ``device`` (no host copy first) in ``dtype``.
    """
    target = torch.device("meta") if meta else torch.device(device)
    with target:
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    return model


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """A causal LM from a local directory (``config.json`` + safetensors) in ``dtype``; never contacts a hub and
    never unpickles. Streams tensor by tensor into a meta-built model
    (:func:`~qgalore_dist.models.pretrained.load_quantized_pretrained` without quantisation): one float copy."""
    from .pretrained import load_quantized_pretrained  # deferred: pretrained builds on this module

    return load_quantized_pretrained(path, quantize=False, dense_dtype=dtype, device=device)


def _llama_param_count(config: PretrainedConfig) -> int:
    h = config.hidden_size
    inter = config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn_bias = bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    attn = h * q_dim + 2 * h * kv_dim + q_dim * h  # q, k, v, o weights
    if attn_bias:
        attn += q_dim + 2 * kv_dim + h
    mlp = 3 * h * inter  # gate, up, down
    if mlp_bias:
        mlp += 2 * inter + h
    per_layer = attn + mlp + 2 * h  # + input / post-attention RMSNorm weights

    embed = config.vocab_size * h
    head = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * h
    return embed + config.num_hidden_layers * per_layer + h + head  # + final norm


def param_count(config: PretrainedConfig) -> int:
    """Exact number of (unique) parameters the model built from ``config`` has, without allocating it.

    Closed form for LLaMA-style configs; other model types are built on the meta device and counted
    (no storage either way). Tied embeddings are counted once, as ``model.parameters()`` does.
    """
    if getattr(config, "model_type", None) in _LLAMA_LIKE:
        return _llama_param_count(config)
    model = build_model(config, meta=True)
    return sum(p.numel() for p in model.parameters())


def rebuild_rotary_buffers(model: torch.nn.Module, device: str | torch.device) -> int:
    """Recompute rotary-embedding buffers (``inv_freq`` ...) of a model materialised from the meta device.

    ``model.to_empty(device)`` leaves non-persistent buffers uninitialised (they are not in checkpoints),
    so every module with an ``inv_freq`` buffer is re-constructed from its config on ``device`` and its
    buffers are copied over. Returns how many modules were rebuilt.
    """
    rebuilt = 0
    for module in model.modules():
        if not hasattr(module, "inv_freq") or not hasattr(module, "config"):
            continue
        with torch.device(device):
            fresh = type(module)(module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf)
        # attention_scaling etc. are plain attributes computed alongside inv_freq.
        for attr in ("attention_scaling", "max_seq_len_cached", "original_max_seq_len"):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))
        rebuilt += 1
    return rebuilt


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant: works when the checkpointed block's inputs need no grad, and with in-backward optimizer steps.
    transformers >= 5 renamed the method (the old name warns); older releases only have the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
