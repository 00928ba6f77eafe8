"""Export to a plain ``transformers`` checkpoint: every INT8 weight dequantised into an ordinary ``nn.Linear``.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (no qgalore_dist needed) and computes the same
logits as the INT8 model, up to float rounding. Works from a live model or from a checkpoint directory::

    python -m qgalore_dist.checkpoint.export runs/demo/step_000200 exported/ [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from ..models import build_model, rebuild_rotary_buffers
from ..nn.int8_linear import QGaLoreLinear
from ..quant.int8 import dequantize_rows
from .save_load import CheckpointError, load_checkpoint, load_model_state

__all__ = ["dequantized_state_dict", "export_checkpoint", "export_model", "export_state", "main",
           "quantized_modules"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def quantized_modules(model: nn.Module) -> dict[str, int]:
    """``{module name: weight group size}`` of every :class:`QGaLoreLinear` — what a checkpoint must record to be
    dequantised without building the INT8 model."""
    return {n: m.group_size for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)}


def dequantized_state_dict(state: Mapping[str, torch.Tensor], quantized: Mapping[str, int],
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``state`` with every ``<name>.weight_codes`` / ``<name>.weight_scales`` pair of a quantised module replaced
    by the float ``<name>.weight`` (codes × scales); floating tensors cast to ``dtype``, others kept."""
    out: dict[str, torch.Tensor] = {}
    for name, group in quantized.items():
        ck, sk = f"{name}.weight_codes", f"{name}.weight_scales"
        if ck not in state or sk not in state:
            raise CheckpointError(f"state has no INT8 weight for quantised module {name!r}")
        out[f"{name}.weight"] = dequantize_rows(state[ck], state[sk], group, dtype)
    done = {f"{n}.weight_{s}" for n in quantized for s in ("codes", "scales")}
    for k, v in state.items():
        if k in done:
            continue
        if k.endswith((".weight_codes", ".weight_scales")):
            raise CheckpointError(f"state holds INT8 tensor {k!r} of a module not listed as quantised")
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def _atomic_dir(out_dir: Path):
    """``(tmp, publish)``: write into ``tmp``, then ``publish()`` renames it to ``out_dir`` (replacing a previous
    export only once the new one is complete)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def publish() -> None:
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)

    return tmp, publish


def export_state(state: Mapping[str, torch.Tensor], config: PretrainedConfig, quantized: Mapping[str, int],
                 out_dir: str | os.PathLike[str], tokenizer: Any = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``save_pretrained`` output (+ tokenizer) for a model state that may hold INT8 weights.

    The float model is built on the meta device and takes the dequantised tensors by assignment, so the only
    full-precision copy that ever exists is the exported one.
    """
    out_dir = Path(out_dir)
    config = copy.deepcopy(config)
    config.use_cache = True  # training turns the KV cache off; an exported model is for inference
    model = build_model(config, dtype=dtype, meta=True)
    sd = dequantized_state_dict(state, quantized, dtype)
    load_model_state(model, sd, f"the dequantised state (for a {config.model_type} model of this config)",
                     assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # assign=True replaced the shared Parameter by two separate ones
    rebuild_rotary_buffers(model, "cpu")
    tmp, publish = _atomic_dir(out_dir)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise in training logs
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out_dir


def export_model(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Export a live (possibly INT8) ``transformers`` model; the model itself is left unchanged."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return export_state(state, model.config, quantized_modules(model), out_dir, tokenizer, dtype)


def export_checkpoint(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      dtype: torch.dtype = torch.float32) -> Path:
    """Export a training checkpoint directory (verified first) with the tokenizer it carries."""
    ckpt = load_checkpoint(ckpt_dir)
    try:
        cfg_dict = dict(ckpt.trainer["model_config"])
        quantized = dict(ckpt.trainer["quantized_modules"])
        config = CONFIG_MAPPING[cfg_dict["model_type"]].from_dict(cfg_dict)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: trainer.json lacks a usable model config ({exc})") from exc
    tokenizer = None
    if ckpt.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir), local_files_only=True)
    return export_state(ckpt.model_state, config, quantized, out_dir, tokenizer, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qgalore_dist.checkpoint.export",
                                     description="Export a qgalore_dist checkpoint as a plain dequantised "
                                                 "transformers model directory (+ tokenizer).")
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/step_000200)")
    parser.add_argument("out_dir", help="output directory (replaced atomically if it exists)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the exported weights")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, _DTYPES[args.dtype])
    except (CheckpointError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
