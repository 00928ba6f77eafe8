"""AdamW for the dense (non-projected) parameters: embeddings, norms, lm_head, biases.

Same rule and ordering as galore-torch's AdamW (bias-corrected step size, decoupled decay applied after the
update) so the float reference mode matches it; moments fp32 or 8-bit blockwise (:mod:`..quant.state8`).
Parameters may be stored in a narrower dtype than the compute dtype (bf16 storage, fp32 math on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..quant.bf16 import SALT_DENSE_SR, stochastic_round_bf16
from ..quant.fused import fused_dense_adamw8_
from ..quant.rng import stream_key
from ..quant.state8 import Blockwise8bit


@dataclass
class DenseState:
    exp_avg: Blockwise8bit
    exp_avg_sq: Blockwise8bit
    step: int = 0

    def nbytes(self) -> int:
        return self.exp_avg.nbytes() + self.exp_avg_sq.nbytes()

    def state_dict(self) -> dict:
        tensors = {f"exp_avg.{k}": v for k, v in self.exp_avg.state_tensors().items()}
        tensors.update({f"exp_avg_sq.{k}": v for k, v in self.exp_avg_sq.state_tensors().items()})
        return {"tensors": tensors, "meta": {"step": self.step}}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["meta"]["step"])
        t = d["tensors"]
        self.exp_avg.load_state_tensors({k[8:]: v for k, v in t.items() if k.startswith("exp_avg.")})
        self.exp_avg_sq.load_state_tensors({k[11:]: v for k, v in t.items() if k.startswith("exp_avg_sq.")})


def dense_sr_key(config, st: DenseState, name: str, dtype: torch.dtype) -> tuple[int, int] | None:
    """The stochastic-rounding key of a dense parameter's next step (``config``: a :class:`..config.
    QGaLoreConfig`): a bf16-stored weight is rounded stochastically, keyed by (seed, step, name), so updates below
    half a bf16 ulp still move it on average and every engine and a resumed run draw the same numbers; any other
    dtype (or ``stochastic_round=False``) rounds to nearest (None)."""
    if dtype != torch.bfloat16 or not config.stochastic_round:
        return None
    return stream_key(config.seed, st.step + 1, name, SALT_DENSE_SR)


def init_dense_state(p: torch.Tensor, state_bits: int = 32, block: int = 256, min_numel: int = 4096) -> DenseState:
    shape = tuple(p.shape)
    fdt = torch.float64 if p.dtype == torch.float64 else torch.float32
    return DenseState(Blockwise8bit(shape, True, block, min_numel, p.device, bits=state_bits, float_dtype=fdt),
                      Blockwise8bit(shape, False, block, min_numel, p.device, bits=state_bits, float_dtype=fdt))


def dense_adamw_step(p: torch.Tensor, grad: torch.Tensor, st: DenseState, lr: float, betas: tuple[float, float],
                     eps: float, weight_decay: float, fused: bool = False, sr_key: tuple[int, int] | None = None,
                     chunk_elems: int = 1 << 22, index_offset: int = 0,
                     store_moment: Callable[[Blockwise8bit, torch.Tensor, int], None] | None = None) -> None:
    """In-place AdamW step of parameter ``p`` (any shape) with gradient ``grad`` (same shape).

    ``fused``: with 8-bit moments and a non-fp64 parameter, one compiled kernel (:func:`..quant.fused.
    fused_dense_adamw8_`) instead of ~40 eager passes over the parameter — equal up to fp32 rounding (a moment code
    may differ by one step), so every rank / engine that must agree with another has to pass the same flag.

    ``sr_key``: a bf16-stored ``p`` is rounded stochastically with this key (:func:`..quant.bf16.
    stochastic_round_bf16`) instead of to nearest, so updates below half an ulp are not lost. ``index_offset``: the
    global element index of ``p``'s first element (a shard of a larger parameter draws that parameter's numbers).

    ``store_moment(state, values, r0)``: how a chunk's new moment values (rows ``r0…`` of the [rows, cols] layout)
    are stored — default ``state.from_float(values)``; a placement whose 8-bit blocks are split over ranks stores
    them and keeps what it must re-encode once the blocks' scales are agreed (DeepSpeed's flat partitions).

    The parameter is stepped ``chunk_elems`` elements (whole rows of the [rows, cols] layout) at a time: the math is
    element-wise and the 8-bit blocks lie inside rows, so the result is the same as one pass, but the fp32
    temporaries stay ~16 MB instead of 4-5× the parameter (a LLaMA-7B embedding is 131 M elements: 2.6 GB).
    """
    b1, b2 = betas
    st.step += 1
    step_size = lr * math.sqrt(1.0 - b2 ** st.step) / (1.0 - b1 ** st.step)
    rows, cols = st.exp_avg._rows_cols()
    if not p.data.is_contiguous():
        raise ValueError("dense_adamw_step needs a contiguous parameter")
    p2 = p.data.view(rows, cols)
    g2 = grad.reshape(rows, cols)
    use_fused = (fused and store_moment is None and st.exp_avg.quantized and st.exp_avg_sq.quantized
                 and p.dtype != torch.float64 and st.exp_avg.block == st.exp_avg_sq.block)
    chunk = max(1, rows if rows * cols <= chunk_elems else chunk_elems // cols)  # 0 rows: an empty shard
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        pc, gc = p2[r0:r1], g2[r0:r1]
        m8 = st.exp_avg if (r0, r1) == (0, rows) else st.exp_avg.rows(r0, r1)
        v8 = st.exp_avg_sq if (r0, r1) == (0, rows) else st.exp_avg_sq.rows(r0, r1)

        def store(w: torch.Tensor, pc=pc, r0=r0) -> None:
            if sr_key is not None and pc.dtype == torch.bfloat16:
                pc.copy_(stochastic_round_bf16(w.reshape(pc.shape).float(), sr_key, index_offset + r0 * cols))
            else:
                pc.copy_(w.reshape(pc.shape))

        if use_fused:
            fused_dense_adamw8_(pc, gc, m8, v8, step_size, -lr * weight_decay, b1, b2, eps, store=store)
            continue
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = gc.to(compute)
        m = m8.to_float(compute).reshape(g.shape).mul_(b1).add_(g, alpha=1.0 - b1)
        v = v8.to_float(compute).reshape(g.shape).mul_(b2).addcmul_(g, g, value=1.0 - b2)
        w = pc.to(compute)
        w.add_(m / v.sqrt().add_(eps), alpha=-step_size)  # galore-torch's op order: bit-equal in float mode
        if weight_decay > 0:
            w.add_(w, alpha=-lr * weight_decay)
        store(w)
        if store_moment is None:
            m8.from_float(m)
            v8.from_float(v)
        else:
            store_moment(m8, m, r0)
            store_moment(v8, v, r0)
