"""``QGaLoreLinear``: the one INT8 linear layer — its weight lives only as INT8 codes + group scales.

One module and one autograd function serve every engine; where the codes live, how the layer gets the whole
weight for its matmuls and where the weight gradient goes is the layer's **weight source**:

======================  ==============================================  ============================================
source                  storage (per rank)                              weight gradient
======================  ==============================================  ============================================
:class:`BufferSource`   buffers ``weight_codes`` [out, in] + scales     ``weight_grad_sink`` (the optimizer's
(local, replicated)     [out, G] (persistent)                           layer-wise consumer) or ``weight_grad``
:class:`FSDPRowSource`  the Parameter ``weight``, an                    returned to autograd: FSDP2 reduce-scatters
(FSDP2)                 :class:`~.int8_fsdp.Int8RowTensor` FSDP2 shards  it into row shards
                        by rows and all-gathers as INT8
:class:`RowShardSource` buffers over this rank's rows ``[r0, r0 + k)``  ``grad_sink`` (the side-car projects it,
(DeepSpeed ZeRO-3)      (non-persistent); ``gather()`` all-gathers       or reduces it to the row owners)
                        the INT8 rows for each matmul
======================  ==============================================  ============================================

The codes are never a float weight outside one matmul: the buffer source saves the INT8 codes for backward, FSDP2
re-gathers its (saved) parameter before backward, the row-shard source gathers again in backward. Buffers rather
than Parameters hold the codes where an engine must not touch them: DeepSpeed ZeRO-3 partitions every
``nn.Parameter`` (a frozen int8 Parameter became shape [0] in our trials) and DDP would bucket Parameter
gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int8 import Int8Weight, dequantize_rows

__all__ = ["BufferSource", "FSDPRowSource", "QGaLoreLinear", "RowShardSource"]


class BufferSource:
    """Whole INT8 weight in the module's buffers (local and replicated placements)."""

    kind = "buffer"

    def weight_input(self, module: "QGaLoreLinear") -> torch.Tensor:
        return module._anchor

    def forward_weight(self, module, winput) -> tuple[torch.Tensor, torch.Tensor]:
        return module.weight_codes, module.weight_scales

    def to_save(self, codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return codes, scales  # INT8 codes, never a float weight (autograd checks they are not changed meanwhile)

    def backward_weight(self, module, winput, saved) -> tuple[torch.Tensor, torch.Tensor]:
        return saved[0], saved[1]

    def deliver(self, module, grad: torch.Tensor, winput) -> torch.Tensor | None:
        if module.weight_grad_sink is not None:
            module.weight_grad_sink(grad)
        elif module.weight_grad is None:
            module.weight_grad = grad
        else:
            module.weight_grad.add_(grad)
        return None

    def int8_weight(self, module) -> Int8Weight:
        return Int8Weight(module.weight_codes, module.weight_scales, module.group_size)


class FSDPRowSource:
    """The Parameter ``weight`` is an :class:`~.int8_fsdp.Int8RowTensor`; FSDP2 shards it and gathers it (as INT8)
    before forward and backward; the weight gradient goes back to autograd, FSDP2 reduce-scatters it."""

    kind = "fsdp"

    def weight_input(self, module):
        return module.weight

    def forward_weight(self, module, winput):
        return winput.codes, winput.scales

    def to_save(self, codes, scales):
        return ()  # the parameter itself is saved: FSDP2 frees its gathered storage and re-gathers it for backward

    def backward_weight(self, module, winput, saved):
        return winput.codes, winput.scales

    def deliver(self, module, grad, winput):
        return grad.to(winput.dtype)  # [out, in], the parameter's logical dtype

    def int8_weight(self, module) -> Int8Weight:
        w = module.weight
        w = w.to_local() if hasattr(w, "to_local") else w
        return w.int8_weight()


class RowShardSource:
    """This rank's rows in (non-persistent) buffers; ``module.gather()`` returns the whole INT8 weight for one
    matmul (freed after it), ``module.grad_sink(grad)`` takes the weight gradient of this rank's micro-batch."""

    kind = "row_shard"

    def weight_input(self, module):
        return module._anchor

    def forward_weight(self, module, winput):
        return module.gather()

    def to_save(self, codes, scales):
        return ()  # gathered again in backward: no rank keeps the whole weight between the passes

    def backward_weight(self, module, winput, saved):
        return module.gather()

    def deliver(self, module, grad, winput):
        module.grad_sink(grad)
        return None

    def int8_weight(self, module) -> Int8Weight:
        return Int8Weight(module.weight_codes, module.weight_scales, module.group_size)


class _Int8LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised from INT8 for the matmul only; what is saved for backward and where the
    weight gradient goes is the source's."""

    @staticmethod
    def forward(ctx, x, winput, bias, module):  # noqa: D401 - autograd signature
        src = module.source
        codes, scales = src.forward_weight(module, winput)
        w = dequantize_rows(codes, scales, module.group_size, x.dtype)
        ctx.save_for_backward(x, winput, *src.to_save(codes, scales))
        del codes, scales
        ctx.module = module
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, winput, *saved = ctx.saved_tensors
        module = ctx.module
        codes, scales = module.source.backward_weight(module, winput, saved)
        w = dequantize_rows(codes, scales, module.group_size, grad_out.dtype)
        del codes, scales
        grad_x = grad_out @ w
        del w
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
        grad_w = module.source.deliver(module, go2.mT @ x2, winput)  # [out, in]
        grad_b = go2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class QGaLoreLinear(nn.Module):
    """Drop-in ``nn.Linear`` replacement with an INT8 weight (``source``: see the module docstring).

    Created with the buffer source: ``weight_codes`` int8 [out, in], ``weight_scales`` float32
    [out, ceil(in / group_size)]. ``qname`` is the parameter name the stochastic-rounding stream, the ownership plan
    and the optimizer state are keyed by (set by model preparation). Engines switch the source in place:
    :meth:`use_fsdp_rows` (FSDP2), :meth:`use_row_shard` (ZeRO-3).
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
        self.source: BufferSource | FSDPRowSource | RowShardSource = BufferSource()
        self.weight_grad: torch.Tensor | None = None
        self.weight_grad_sink: Callable[[torch.Tensor], None] | None = None
        # zero-element leaf that requires grad: guarantees backward reaches this layer (so its weight gradient is
        # produced) even when nothing upstream requires grad; not a Parameter, so no engine ever sees it
        self._anchor = torch.empty(0, requires_grad=True)

    # --- the weight, whatever the source ------------------------------------------------------------------------
    @property
    def int8_weight(self) -> Int8Weight:
        """This rank's INT8 rows (the whole weight for the buffer source) as :class:`Int8Weight`, sharing storage:
        in-place updates land in the layer."""
        return self.source.int8_weight(self)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.int8_weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Int8LinearFn.apply(x, self.source.weight_input(self), bias, self)

    # --- switching the source (engines) -----------------------------------------------------------------------
    def use_fsdp_rows(self, dtype: torch.dtype) -> None:
        """FSDP2: the codes + scales become the Parameter ``weight`` (an :class:`~.int8_fsdp.Int8RowTensor` of
        logical dtype ``dtype``, no copy), which ``fully_shard`` shards by rows and all-gathers as INT8."""
        from .int8_fsdp import Int8RowTensor

        codes, scales = self.weight_codes, self.weight_scales
        del self.weight_codes, self.weight_scales  # no replicated buffers beside the sharded parameter
        self.weight = nn.Parameter(Int8RowTensor(codes, scales, self.group_size, dtype), requires_grad=True)
        self.source = FSDPRowSource()

    def use_row_shard(self, rows_per_rank: list[int], rank: int) -> None:
        """DeepSpeed ZeRO-3: keep rows ``[r0, r0 + k)`` of a ``torch.chunk`` split (``rows_per_rank``) as
        non-persistent buffers (the side-car checkpoints them per rank, keyed by name; DeepSpeed's module file
        holds rank 0's view only). The side-car sets ``gather`` and ``grad_sink`` before the first forward."""
        r0 = int(sum(rows_per_rank[:rank]))
        k = int(rows_per_rank[rank])
        if self.weight_codes.shape[0] != self.out_features:  # built with only its rows (a sharded start)
            if (self.weight_codes.shape[0], getattr(self, "row_offset", 0)) != (k, r0):
                raise ValueError(f"{self.qname}: holds rows [{getattr(self, 'row_offset', 0)}, "
                                 f"{getattr(self, 'row_offset', 0) + self.weight_codes.shape[0]}), this rank's are "
                                 f"[{r0}, {r0 + k})")
            codes, scales = self.weight_codes, self.weight_scales
        else:
            codes = self.weight_codes[r0:r0 + k].clone()
            scales = self.weight_scales[r0:r0 + k].clone()
        del self.weight_codes, self.weight_scales
        self.register_buffer("weight_codes", codes, persistent=False)
        self.register_buffer("weight_scales", scales, persistent=False)
        self.rows_per_rank = list(rows_per_rank)
        self.row_offset = r0
        self.gather: Callable[[], tuple[torch.Tensor, torch.Tensor]] = self._no_side_car
        self.grad_sink: Callable[[torch.Tensor], None] = self._no_side_car
        self.source = RowShardSource()

    def _no_side_car(self, *_):
        raise RuntimeError(f"{self.qname}: row-sharded INT8 linear used before its side-car installed gather / "
                           "grad_sink")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, source={self.source.kind}")
