"""``RowShardedInt8Linear``: an INT8 linear whose codes + scales are partitioned across ranks by rows (ZeRO-3).

Each rank stores rows ``[r0, r0 + k)`` of the ``[out, in]`` INT8 codes and their group scales (``torch.chunk``
split, :func:`qgalore_dist.dist.row_sharded.chunk_rows`) as *buffers*: DeepSpeed ZeRO-3 partitions every
``nn.Parameter`` (frozen ones too) into flat fp slices, so the INT8 weight must never be one. The forward pass
gathers the whole weight **as INT8** (1 byte/element + scales), dequantises it, and frees it; the backward pass
gathers it again — autograd saves only the layer input, never the gathered weight (DeepSpeed's ``OptimizedLinear``
shards its base weight the same way). The weight gradient ``[out, in]`` is handed to ``grad_sink``, which
reduce-scatters it to the row owners (DeepSpeed reduces nothing for buffers).

This module does no communication itself: ``gather`` and ``grad_sink`` are callables installed by the engine's
side-car (:mod:`qgalore_dist.dist.deepspeed_zero3`), which routes them through the counted ``Collectives``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int8 import Int8Weight, dequantize_rows

__all__ = ["RowShardedInt8Linear"]


class _RowShardedInt8LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b, W gathered (INT8) from the row shards in forward and again in backward; saves only x."""

    @staticmethod
    def forward(ctx, x, anchor, codes, scales, bias, module):  # noqa: D401 - autograd signature
        full_codes, full_scales = module.gather()
        w = dequantize_rows(full_codes, full_scales, module.group_size, x.dtype)
        del full_codes, full_scales
        ctx.save_for_backward(x)
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module = ctx.module
        full_codes, full_scales = module.gather()
        w = dequantize_rows(full_codes, full_scales, module.group_size, grad_out.dtype)
        del full_codes, full_scales
        grad_x = grad_out @ w
        del w
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        module.grad_sink(go2.mT @ x2)  # [out, in], this rank's micro-batch only
        grad_b = go2.sum(0) if ctx.has_bias else None
        return grad_x, None, None, None, grad_b, None


class RowShardedInt8Linear(nn.Module):
    """This rank's rows of an INT8 linear layer.

    Buffers (non-persistent: the side-car checkpoints them per rank, keyed by parameter name — DeepSpeed's
    module file holds rank 0's view only): ``weight_codes`` int8 ``[k, in]``, ``weight_scales`` fp32 ``[k, G]``.
    ``rows_per_rank`` is every rank's row count; ``row_offset`` this rank's first global row; ``qname`` the
    parameter name (``<module>.weight``) that keys the ownership plan, state and rounding stream.
    ``gather() -> (codes [out, in], scales [out, G])`` and ``grad_sink(grad [out, in])`` are set by the side-car.
    """

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scales: torch.Tensor,
                 rows_per_rank: list[int], row_offset: int, group_size: int, qname: str,
                 bias: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.rows_per_rank = list(rows_per_rank)
        self.row_offset = row_offset
        self.qname = qname
        self.register_buffer("weight_codes", codes, persistent=False)
        self.register_buffer("weight_scales", scales, persistent=False)
        self.bias = bias
        self.gather: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.grad_sink: Callable[[torch.Tensor], None] | None = None
        # zero-element leaf that requires grad (as in QGaLoreLinear): backward always reaches this layer
        self._anchor = torch.empty(0, requires_grad=True)

    @property
    def int8_weight(self) -> Int8Weight:
        """This rank's rows as an :class:`Int8Weight` sharing the buffers (optimizer updates land here)."""
        return Int8Weight(self.weight_codes, self.weight_scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather is None or self.grad_sink is None:
            raise RuntimeError(f"{self.qname}: row-sharded INT8 linear used before its side-car installed "
                               "gather / grad_sink")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _RowShardedInt8LinearFn.apply(x, self._anchor, self.weight_codes, self.weight_scales, bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows_per_rank}, "
                f"row_offset={self.row_offset}, group_size={self.group_size}")
