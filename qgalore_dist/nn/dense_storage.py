"""Dense parameters stored narrower than they are computed: bf16 storage, fp32 math on CPU.

The parameters that are not projected (embeddings, norms, lm_head, biases) are a large share of a small model and
1 GB of a LLaMA-7B in fp32 (two 32000×4096 tables). On a GPU the whole model computes in bf16 and nothing here is
needed. On CPU, bf16 matmuls run ~100× slower than fp32 (AVX2 has no bf16 dot product), so the model computes in
fp32 while these parameters *live* in bf16 and are upcast transiently where they are used:

* ``nn.Linear`` (an untied lm_head): :class:`UpcastLinear` saves the bf16 weight for backward, not an fp32 copy,
  and upcasts it a block of rows at a time inside forward and backward.
* ``nn.Embedding``: the lookup runs on the bf16 table (a gather, no math) and the rows are upcast after it.
* norms that multiply their weight into an fp32 tensor (the LLaMA/Mistral/Qwen ``*RMSNorm`` family) promote by
  themselves; ``nn.LayerNorm`` becomes :class:`UpcastLayerNorm`.
* biases of :class:`QGaLoreLinear` are cast in its forward already.

Any other module type holding a dense parameter is refused by name rather than failing inside a matmul later.
Gradients land in the storage dtype (bf16); the dense optimizer upcasts them and rounds the updated weight back
stochastically (:mod:`..quant.bf16`), so small updates are not lost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int8_linear import QGaLoreLinear


_CHUNK_ROWS = 4096  # weight rows upcast at a time: 4096 x 4096 fp32 = 64 MB for a LLaMA-7B lm_head


class _UpcastLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with a narrow-stored W [out, in] upcast to x's dtype ``_CHUNK_ROWS`` rows at a time, in forward
    and backward: a full fp32 copy of a 32000×4096 lm_head would be 0.5 GB at the moment backward starts."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        out = torch.cat([F.linear(x, weight[r:r + _CHUNK_ROWS].to(x.dtype))
                         for r in range(0, weight.shape[0], _CHUNK_ROWS)], dim=-1)
        return out if bias is None else out.add_(bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(go2.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.zeros_like(x2) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None  # in the storage dtype: the fp32 rows are transient
        for r in range(0, weight.shape[0], _CHUNK_ROWS):
            g = go2[:, r:r + _CHUNK_ROWS]
            if need_x:
                grad_x.addmm_(g, weight[r:r + _CHUNK_ROWS].to(go2.dtype))
            if need_w:
                grad_w[r:r + _CHUNK_ROWS] = g.mT @ x2
        grad_b = go2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need_b else None
        return None if grad_x is None else grad_x.reshape(x.shape).to(x.dtype), grad_w, grad_b


class UpcastLinear(nn.Linear):
    """``nn.Linear`` whose parameters may be stored narrower than the input (upcast per call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return super().forward(x)
        return _UpcastLinearFn.apply(x, self.weight, self.bias)


class UpcastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose affine parameters may be stored narrower than the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def _upcast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype)
    return hook


def _promotes_itself(module: nn.Module) -> bool:
    # the RMSNorm family of transformers multiplies ``weight * hidden.to(input_dtype)``: type promotion upcasts
    return type(module).__name__.endswith("RMSNorm")


def store_dense_params(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> list[str]:
    """Store every floating dense parameter of ``model`` in ``storage_dtype``, computing in ``compute_dtype``;
    in place. Returns the names of the parameters converted. Raises ``ValueError`` naming a module it cannot
    upcast. (INT8 weights are buffers and are not touched.)"""
    if storage_dtype == compute_dtype:
        return []
    if torch.finfo(storage_dtype).bits >= torch.finfo(compute_dtype).bits:
        raise ValueError(f"dense storage dtype {storage_dtype} must be narrower than the compute dtype "
                         f"{compute_dtype}")
    converted = []
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        if not own:
            continue
        if type(module) is nn.Linear:
            module.__class__ = UpcastLinear  # keeps the Parameter objects (so weight tying survives) and hooks
        elif type(module) is nn.LayerNorm:
            module.__class__ = UpcastLayerNorm
        elif isinstance(module, nn.Embedding):
            module.register_forward_hook(_upcast_output(compute_dtype))
        elif not (isinstance(module, (QGaLoreLinear, UpcastLinear, UpcastLayerNorm)) or _promotes_itself(module)):
            raise ValueError(f"cannot store the dense parameters of {mname or 'the model'} "
                             f"({type(module).__name__}) in {storage_dtype} while computing in {compute_dtype}: "
                             "supported are Linear, Embedding, LayerNorm and *RMSNorm modules")
        for n, p in own:
            if p.dtype != storage_dtype:
                p.data = p.data.to(storage_dtype)
            converted.append(f"{mname}.{n}" if mname else n)
    return converted
