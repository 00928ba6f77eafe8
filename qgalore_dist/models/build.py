"""Resolve model specs to `transformers` configs, build models (optionally on the meta device), count parameters.

A *spec* is one of:

* a shipped config name (``llama_20m`` ... ``llama_7b``, ``llama_tiny``), stored as JSON under ``configs/``;
* a path to a config JSON file;
* a local model directory holding ``config.json`` (e.g. a checkpoint to fine-tune).

Nothing here touches a model hub: this project runs on machines without one.
"""

from __future__ import annotations

import json
import weakref
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
    "filled_defaults",
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
    except UnicodeDecodeError as exc:
        raise _fail(spec, f"{path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise _fail(spec, f"cannot read {path} ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(spec, f"malformed JSON in {path} (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise _fail(spec, f"{path}: JSON nested too deeply to read") from exc
    if not isinstance(data, dict):
        raise _fail(spec, f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


# The size fields a config must give (real configs omit many others, which keep transformers' defaults), under
# their canonical names; a file may spell them as its architecture does (GPT-2: n_embd, n_layer, n_head) through the
# config class's attribute_map. The feed-forward width has per-architecture names of its own (OPT: ffn_dim); it is
# required only where the architecture has such a field (GPT-2's n_inner is optional: 4 × n_embd).
_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_FFN_NAMES = ("intermediate_size", "ffn_dim", "d_ff")
# Optional fields that change the model's shape or size: when the file omits them, the default (as resolved) is
# reported (see `filled_defaults`). The many other omitted fields (dropouts, eps, rope, token ids) are not listed.
_SHAPE_DEFAULTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                   "attention_bias", "mlp_bias", "qkv_bias", "n_inner", "num_local_experts", "num_experts",
                   "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                   "word_embed_proj_dim", "sliding_window")

try:  # transformers >= 5 validates configs with huggingface_hub's strict dataclasses (not ValueError subclasses)
    from huggingface_hub.errors import StrictDataclassError as _StrictError
except ImportError:  # pragma: no cover - older huggingface_hub
    _StrictError = ValueError

_FILLED: dict[int, tuple[weakref.ref, tuple[str, ...]]] = {}


def filled_defaults(config: PretrainedConfig) -> tuple[str, ...]:
    """``name=value`` for each shape field (kv heads, head dim, positions, tied embeddings, biases, experts ...)
    that the config file behind ``config`` omitted, so transformers' default was used; () when none was, or for a
    config not made by :func:`resolve_model_config`."""
    entry = _FILLED.get(id(config))
    return entry[1] if entry is not None and entry[0]() is config else ()


def _remember_filled(config: PretrainedConfig, names: tuple[str, ...]) -> None:
    key = id(config)
    _FILLED[key] = (weakref.ref(config, lambda _ref: _FILLED.pop(key, None)), names)


def _names_in_file(cls: type, canonical: str) -> tuple[str, ...]:
    """The keys a config file of class ``cls`` may use for the attribute ``canonical``."""
    amap = getattr(cls, "attribute_map", {}) or {}
    names = [canonical, *([amap[canonical]] if canonical in amap else [])]
    names += [k for k, v in amap.items() if v == canonical]
    if canonical == "intermediate_size":
        names += [n for n in _FFN_NAMES if n not in names]
    return tuple(dict.fromkeys(names))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# optional integer fields that, when a file gives them (not null), must be positive
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions", "n_inner",
                   "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "shared_expert_intermediate_size")


def _check_sizes(spec: str, path: Path, cls: type, data: dict[str, Any]) -> list[str]:
    """Refuse a config without its size fields or with non-positive ones (before transformers sees it); returns the
    shape fields the file omits (their defaults are reported)."""
    try:
        defaults = cls().to_dict()
    except Exception:  # noqa: BLE001 - a class without usable defaults: nothing to compare against
        defaults = {}
    missing = []
    for canonical in _SIZE_FIELDS:
        names = _names_in_file(cls, canonical)
        if not any(n in defaults for n in names):
            continue  # this architecture has no such field (GPT-2's feed-forward width is the optional n_inner)
        given = next((n for n in names if data.get(n) is not None), None)
        if given is None:
            missing.append(next(n for n in names if n in defaults))  # as this architecture spells it
        elif not _positive_int(data[given]):
            raise _fail(spec, f"{path}: {given} must be a positive integer, got {data[given]!r}")
    if missing:
        raise _fail(spec, f"{path} lacks the size field(s) {', '.join(missing)} (a model_type alone would build "
                          "transformers' default size); give them in the config")
    for name in _OPTIONAL_SIZES:
        if data.get(name) is not None and not _positive_int(data[name]):
            raise _fail(spec, f"{path}: {name} must be a positive integer or null, got {data[name]!r}")
    _check_consistent(spec, path, cls, data, data)  # before transformers' own (less specific) validators
    return [n for n in _SHAPE_DEFAULTS if n in defaults and n not in data
            and not any(alias in data for alias in _names_in_file(cls, n))]


def _check_consistent(spec: str, path: Path, cls: type, data: dict[str, Any],
                      config: PretrainedConfig | dict[str, Any]) -> None:
    """The sizes fit together: those the file gives (``config`` is ``data``), then the resolved ones (defaults
    filled). The message uses the file's own names, '(default)' for a filled value."""
    def shown(canonical: str) -> str:
        given = next((n for n in _names_in_file(cls, canonical) if n in data), None)
        return given or f"{canonical} (default)"

    def value(canonical: str) -> Any:
        if not isinstance(config, dict):
            return getattr(config, canonical, None)
        return next((config[n] for n in _names_in_file(cls, canonical) if config.get(n) is not None), None)

    hidden, heads, kv = value("hidden_size"), value("num_attention_heads"), value("num_key_value_heads")
    if not (_positive_int(hidden) and _positive_int(heads)):
        return
    if data.get("head_dim") is None and hidden % heads:
        raise _fail(spec, f"{path}: {shown('hidden_size')} {hidden} is not divisible by "
                          f"{shown('num_attention_heads')} {heads} (the hidden size must be heads × head_dim)")
    if _positive_int(kv) and heads % kv:
        raise _fail(spec, f"{path}: {shown('num_attention_heads')} {heads} is not divisible by "
                          f"{shown('num_key_value_heads')} {kv}")


def _probe_build(spec: str, path: Path, config: PretrainedConfig) -> None:
    """Build a one-layer copy on the meta device (no storage, milliseconds): an activation, rope setting or model
    type that transformers cannot build fails here with the file named, not later inside the run."""
    import copy

    probe = copy.deepcopy(config)
    try:
        if _positive_int(getattr(probe, "num_hidden_layers", None)):
            probe.num_hidden_layers = 1
        build_model(probe, meta=True)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on a config it cannot build
        detail = " ".join(str(exc).split()) or "no detail"
        raise _fail(spec, f"{path}: transformers cannot build a causal LM from this config "
                          f"({type(exc).__name__}: {detail})") from exc


def _config_from_dict(spec: str, path: Path, data: dict[str, Any]) -> PretrainedConfig:
    model_type = data.get("model_type")
    if not model_type:
        raise _fail(spec, f"{path} has no 'model_type' field")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise _fail(spec, f"{path} has unknown model_type {model_type!r} for transformers {transformers.__version__}")
    cls = CONFIG_MAPPING[model_type]
    omitted = _check_sizes(spec, path, cls, data)
    try:
        config = cls.from_dict(data)
    except (TypeError, ValueError, KeyError, ArithmeticError, _StrictError) as exc:
        detail = " ".join(str(exc).split())
        raise _fail(spec, f"invalid config in {path} ({detail})") from exc
    _check_consistent(spec, path, cls, data, config)
    _probe_build(spec, path, config)
    derived_head_dim = getattr(config, "hidden_size", 0) // max(1, getattr(config, "num_attention_heads", 1) or 1)
    _remember_filled(config, tuple(
        f"{n}={getattr(config, n)!r}" for n in omitted if getattr(config, n, None) is not None
        and not (n == "head_dim" and getattr(config, n) == derived_head_dim)))  # None: derived, as head_dim is
    return config


def config_from_dict(spec: str, path: Path, data: dict[str, Any]) -> PretrainedConfig:
    """A model config from a dict read from ``path`` (a config file, or a checkpoint's trainer.json), with the
    same checks as a config file: size fields present, consistent, buildable; errors name ``spec`` and ``path``."""
    return _config_from_dict(spec, path, data)


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
