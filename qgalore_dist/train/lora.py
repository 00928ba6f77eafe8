"""``--method lora``: peft LoRA adapters on the targeted linears, the base frozen — the comparison users ask for first.

The base model is the same model the other methods train (built on the meta device, filled from the same source),
kept in the compute dtype (``--dtype``: fp32 on CPU, bf16 on GPU) with ``requires_grad=False``; peft's LoRA layers
wrap the ``--target-modules`` linears and AdamW (``--optimizer adamw`` or ``adamw8bit``) trains only the adapters.

Adapters are added on the meta model, before any engine lays it out, so every engine — including the sharded starts
of fsdp and ZeRO-3 — materialises them like any other parameter: :class:`LoraSource` gives their values (``lora_A``
peft's Kaiming-uniform rule under an RNG keyed by (seed, name), so every rank and world size draws the same
adapters; ``lora_B`` zero) and passes the base's names, peft's prefixes removed, to the model's own source.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..nn.convert import find_target_linears
from ..nn.materialize import ParamSource
from ..quant.rng import SALT_INIT, stream_key

__all__ = ["LoraSource", "add_lora", "base_name"]

_PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """A parameter's name in the model without adapters: peft's ``base_model.model.`` prefix and ``.base_layer``
    removed (``base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`` -> ``model.layers.0.mlp.up_proj.
    weight``)."""
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")


def add_lora(model: nn.Module, args: Any) -> nn.Module:
    """``model`` (meta or real) wrapped by peft with LoRA on ``args.target_module_list``; the base frozen.

    Returns the ``PeftModel``; its ``.config`` is the base model's (peft forwards attribute access)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise UsageError("--method lora needs peft: pip install 'qgalore_dist[finetune]' (or pip install peft)") \
            from exc
    targets = [n for n, m in find_target_linears(model, tuple(args.target_module_list)).items()
               if isinstance(m, nn.Linear)]
    if not targets:
        raise UsageError(f"--method lora: --target-modules {args.target_modules} matches no linear layer")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
                        lora_dropout=args.lora_dropout, target_modules=targets, bias="none")
    # peft draws lora_A from the global RNG; on a meta model nothing is drawn (LoraSource gives the values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return get_peft_model(model, config)


class LoraSource:
    """The values of a LoRA-wrapped meta model: adapters keyed by name, the base from ``inner`` (a
    :class:`~qgalore_dist.nn.materialize.ParamSource` of the model without adapters)."""

    def __init__(self, inner: ParamSource, seed: int) -> None:
        self.inner, self.seed = inner, seed
        int8_rows = getattr(inner, "int8_rows", None)
        if int8_rows is not None:
            self.int8_rows = lambda qname, *a: int8_rows(base_name(qname), *a)

    def matrix_rows(self, qname, shape, rows, device):
        return self.inner.matrix_rows(base_name(qname), shape, rows, device)

    def dense_rows(self, name, module, shape, rows, dtype, device):
        r0, r1 = rows
        if ".lora_B." in name:  # zero: the adapted model starts as the base model
            return torch.zeros((r1 - r0, *shape[1:]), dtype=dtype, device=device)
        if ".lora_A." in name:
            # peft's rule, kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in)); drawn whole (r rows
            # are small) under a key of (seed, name), then this rank's rows
            k1, k2 = stream_key(self.seed, 0, name, SALT_INIT ^ 0x10A)
            gen = torch.Generator().manual_seed((k1 << 32) | k2)
            bound = 1.0 / math.sqrt(shape[1])
            whole = torch.empty(tuple(shape), dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            return whole[r0:r1].to(dtype=dtype, device=device)
        return self.inner.dense_rows(base_name(name), module, shape, rows, dtype, device)
