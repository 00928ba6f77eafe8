"""``QGaLoreLinear``: a linear layer whose weight lives only as INT8 codes + group scales.

The codes and scales are *buffers*, not Parameters: DeepSpeed ZeRO-3 partitions every ``nn.Parameter`` (a frozen
int8 Parameter became shape [0] in our trials) and DDP would bucket Parameter gradients; qgalore_dist shards and
reduces these tensors itself. The weight gradient therefore does not land in ``.grad``: the backward pass hands
it to ``weight_grad_sink`` — by default accumulated into ``module.weight_grad``; the layer-wise driver replaces the
sink to project the gradient and free it at once, so the full-model gradient never exists.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int8 import Int8Weight, dequantize_rows


class _Int8LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised on the fly; saves the int8 codes, never the float weight."""

    @staticmethod
    def forward(ctx, x, anchor, codes, scales, bias, module):  # noqa: D401 - autograd signature
        w = dequantize_rows(codes, scales, module.group_size, x.dtype)
        ctx.save_for_backward(x, codes, scales)
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scales = ctx.saved_tensors
        module = ctx.module
        w = dequantize_rows(codes, scales, module.group_size, grad_out.dtype)
        grad_x = grad_out @ w
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        module._deliver_weight_grad(go2.mT @ x2)  # [out, in]
        grad_b = go2.sum(0) if ctx.has_bias else None
        return grad_x, None, None, None, grad_b, None


class QGaLoreLinear(nn.Module):
    """Drop-in ``nn.Linear`` replacement with an INT8 weight.

    Buffers: ``weight_codes`` int8 [out, in], ``weight_scales`` float32 [out, ceil(in / group_size)].
    ``qname`` is the parameter name the stochastic-rounding stream is keyed by (set by model preparation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 256,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = -(-in_features // min(group_size, in_features))
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None
        self.qname = ""
        self.weight_grad: torch.Tensor | None = None
        self.weight_grad_sink: Callable[[torch.Tensor], None] | None = None
        # zero-element leaf that requires grad: guarantees backward reaches this layer (so its weight gradient is
        # produced) even when nothing upstream requires grad; not a Parameter, so no engine ever sees it
        self._anchor = torch.empty(0, requires_grad=True)

    @property
    def int8_weight(self) -> Int8Weight:
        """View of the weight as :class:`Int8Weight` sharing this module's buffers (in-place updates land here)."""
        return Int8Weight(self.weight_codes, self.weight_scales, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.int8_weight.dequantize(dtype)

    def _deliver_weight_grad(self, grad: torch.Tensor) -> None:
        if self.weight_grad_sink is not None:
            self.weight_grad_sink(grad)
        elif self.weight_grad is None:
            self.weight_grad = grad
        else:
            self.weight_grad.add_(grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Int8LinearFn.apply(x, self._anchor, self.weight_codes, self.weight_scales, bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
