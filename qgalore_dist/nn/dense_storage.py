"""Dense parameters stored narrower than they are computed: bf16 storage, fp32 math on CPU.

The parameters that are not projected (embeddings, norms, lm_head, biases) are a large share of a small model and
1 GB of a LLaMA-7B in fp32 (two 32000×4096 tables). On a GPU the whole model computes in bf16 and nothing here is
needed. On CPU, bf16 matmuls run ~100× slower than fp32 (AVX2 has no bf16 dot product), so the model computes in
fp32 while these parameters *live* in bf16 and are upcast transiently where they are used:

* ``nn.Linear`` (an untied lm_head): :class:`UpcastLinear` saves the bf16 weight for backward, not an fp32 copy,
  and upcasts it a block of rows at a time inside forward and backward.
* ``nn.Embedding``: :class:`UpcastEmbedding` looks rows up in the bf16 table (a gather, no math), upcasts them,
  and sums the weight gradient per token in fp32 before rounding it to bf16 once.
* norms that multiply their weight into an fp32 tensor (the LLaMA/Mistral/Qwen ``*RMSNorm`` family) promote by
  themselves; ``nn.LayerNorm`` becomes :class:`UpcastLayerNorm`.
* biases of :class:`QGaLoreLinear` are cast in its forward already.

Any other module type holding a dense parameter is refused by name rather than failing inside a matmul later.
Gradients land in the storage dtype (bf16), each computed in fp32 and rounded once per backward (several
micro-batches of one accumulation window add up in ``.grad`` in bf16); the dense optimizer upcasts them and rounds
the updated weight back stochastically (:mod:`..quant.bf16`), so small updates are not lost.
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
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for r in range(0, weight.shape[0], _CHUNK_ROWS):
            out[..., r:r + _CHUNK_ROWS] = F.linear(x, weight[r:r + _CHUNK_ROWS].to(x.dtype))
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


class _UpcastEmbeddingFn(torch.autograd.Function):
    """Row lookup in a narrow-stored table [V, D], rows upcast to ``dtype``; the weight gradient is summed in fp32.

    The plain route (upcast after ``F.embedding``) sends a bf16 gradient into ``embedding_dense_backward``, which
    adds every position's row into a bf16 accumulator: the row of a frequent token loses ~3-5% at a few thousand
    tokens per micro-batch, and a sum of many same-sign contributions stops growing altogether. Here the rows
    are summed per distinct token in fp32 (a [distinct tokens, D] temporary) and rounded to bf16 once."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, dtype):  # noqa: D401 - autograd signature
        ctx.save_for_backward(ids)
        ctx.padding_idx = padding_idx
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        return F.embedding(ids, weight, padding_idx).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        shape, wdtype, device = ctx.weight_meta
        uniq, inv = ids.reshape(-1).unique(return_inverse=True)
        go = grad_out.reshape(-1, shape[1])
        acc = torch.zeros(uniq.numel(), shape[1], dtype=torch.promote_types(go.dtype, torch.float32),
                          device=device).index_add_(0, inv, go.to(torch.promote_types(go.dtype, torch.float32)))
        if ctx.padding_idx is not None:
            acc[uniq == ctx.padding_idx] = 0
        grad = torch.zeros(shape, dtype=wdtype, device=device)
        grad[uniq] = acc.to(wdtype)
        return None, grad, None, None


class UpcastEmbedding(nn.Embedding):
    """``nn.Embedding`` with a narrow-stored table: output in ``compute_dtype``, fp32 gradient accumulation."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == self.compute_dtype:
            return super().forward(ids)
        return _UpcastEmbeddingFn.apply(ids, self.weight, self.padding_idx, self.compute_dtype)


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


def _promotes_itself(module: nn.Module) -> bool:
    # the RMSNorm family of transformers mostly multiplies ``weight * hidden.to(input_dtype)``, which type
    # promotion upcasts; some variants cast the input down to the weight's dtype instead — store_dense_params
    # runs each one once on a probe input to tell
    return type(module).__name__.endswith("RMSNorm")


@torch.no_grad()
def _check_output_dtype(name: str, module: nn.Module, compute_dtype: torch.dtype) -> None:
    w = module.weight
    out = module(torch.zeros(1, w.shape[-1], dtype=compute_dtype, device=w.device))
    if out.dtype != compute_dtype:
        raise ValueError(f"{name} ({type(module).__name__}) computes in {out.dtype} once its weight is stored in "
                         f"{w.dtype}, not in {compute_dtype}: its dense parameters cannot be stored narrower")


def store_dense_params(model: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> list[str]:
    """Store every floating dense parameter of ``model`` in ``storage_dtype``, computing in ``compute_dtype``;
    in place. Returns the names of the parameters converted. Raises ``ValueError`` naming a module it cannot
    upcast. (INT8 weights are buffers and are not touched.)"""
    if storage_dtype == compute_dtype:
        return []
    if torch.finfo(storage_dtype).bits >= torch.finfo(compute_dtype).bits:
        raise ValueError(f"dense storage dtype {storage_dtype} must be narrower than the compute dtype "
                         f"{compute_dtype}")
    converted, seen = [], set()
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        if not own:
            continue
        if type(module) is nn.Linear:
            module.__class__ = UpcastLinear  # keeps the Parameter objects (so weight tying survives) and hooks
        elif type(module) is nn.LayerNorm:
            module.__class__ = UpcastLayerNorm
        elif type(module) is nn.Embedding:
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                raise ValueError(f"cannot store {mname} in {storage_dtype}: max_norm, scale_grad_by_freq and sparse "
                                 "embeddings are not supported")
            module.__class__ = UpcastEmbedding
            module.compute_dtype = compute_dtype
        elif not (isinstance(module, (QGaLoreLinear, UpcastLinear, UpcastLayerNorm, UpcastEmbedding))
                  or _promotes_itself(module)):
            raise ValueError(f"cannot store the dense parameters of {mname or 'the model'} "
                             f"({type(module).__name__}) in {storage_dtype} while computing in {compute_dtype}: "
                             "supported are Linear, Embedding, LayerNorm and *RMSNorm modules")
        for n, p in own:
            if p.dtype != storage_dtype:
                p.data = p.data.to(storage_dtype)
            if id(p) not in seen:  # a tied weight is listed once, under its first name
                seen.add(id(p))
                converted.append(f"{mname}.{n}" if mname else n)
        if _promotes_itself(module):
            _check_output_dtype(mname, module, compute_dtype)
    return converted
