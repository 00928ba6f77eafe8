"""The DeepSpeed side-car (docs/design.md §3 "DeepSpeed integration"): what runs *beside* a ZeRO engine.

DeepSpeed ZeRO hands a client optimizer one flat 1-D fp32 slice per rank, so no projected-gradient optimizer can
run *as* DeepSpeed's optimizer. Instead the work is split:

* **dense parameters** (embeddings, norms, ``lm_head``, biases) are DeepSpeed's: ZeRO partitions, reduces and
  steps them. Its client optimizer is :class:`FlatDenseAdamW` — qgalore_dist's dense AdamW rule
  (:func:`~qgalore_dist.optim.dense_adamw.dense_adamw_step`, fp32 or 8-bit blockwise moments) applied element-wise
  to whatever flat slice ZeRO gives it. Nothing is JIT-compiled (DeepSpeed's ``"optimizer": {"type": "AdamW"}``
  would build ``fused_adam`` / ``cpu_adam``), and its math is the single-device reference's dense rule.
* **projected matrices** (INT8 codes + scales, buffers DeepSpeed never sees) are the side-car's:
  :class:`SidecarQGaLoreOptimizer` is the data-parallel :class:`~.sharded_optimizer.ShardedQGaLoreOptimizer`
  restricted to the projected matrices (ZeRO-1/2: replicated INT8, owner-only SVD, moments by owner, both comm
  modes), with its step split in two so DeepSpeed's step can sit between the halves.

One optimizer step (the engine, :mod:`qgalore_dist.train.engines.deepspeed`, orders it; every rank)::

    sidecar.begin_step()               # reduce low-rank (or full) gradients to owners; Σ‖R‖² of owned matrices
    ds_engine.step()                   # ZeRO reduces dense grads, calls FlatDenseAdamW.step(), which calls
                                       #   sidecar.shared_norm(Σ‖dense slice‖²): one all-reduce of both parts
                                       #   -> global norm -> clip coef; then scales its slice's gradient, steps it
    sidecar.finish_step(coef)          # owners normalise, broadcast; every rank applies to its replica

so the clipping norm is ``√(Σ‖R‖² + ‖dense‖²)`` — the single-device reference's definition — over DeepSpeed's
dense gradients and the projected ones, with DeepSpeed's own ``gradient_clipping`` set to 0 (it would clip the
dense side alone). ZeRO partitions are disjoint across ranks, so the sum of the ranks' slice norms is the dense
norm (padding is zero). All traffic of both halves goes through the side-car's :class:`Collectives` (its own
process group), and is counted there.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..optim.dense_adamw import DenseState, dense_adamw_step, init_dense_state
from ..optim.norms import StepResult, closure_loss, squared_norm
from .collectives import Collectives
from .sharded_optimizer import ShardedQGaLoreOptimizer

__all__ = ["FlatDenseAdamW", "SidecarQGaLoreOptimizer"]


class SidecarQGaLoreOptimizer(ShardedQGaLoreOptimizer):
    """:class:`ShardedQGaLoreOptimizer` over the projected matrices only (the dense parameters are DeepSpeed's).
    The engine drives the optimizer's own halves (:meth:`begin_step`, :meth:`shared_norm` with DeepSpeed's dense
    norm², :meth:`finish_step`) around DeepSpeed's step.

    Constructed before ``deepspeed.initialize`` (the start-up agreement check hashes the dense parameters' names and
    shapes too, which ZeRO-3 would have partitioned by then); after construction it holds no dense state.
    ``step()`` stays usable (the same halves, no dense norm) for a world without DeepSpeed.
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, collectives: Collectives, **kw):
        super().__init__(model, config, collectives, **kw)
        # dense parameters are stepped by DeepSpeed: drop the (small, dense-sized) state the base class allocated
        self.dense_named = []
        self.dense_state = {}
        self.param_groups[:] = [g for g in self.param_groups if g.get("kind") != "dense"]

    # --- weights in checkpoints (DeepSpeed's module file holds rank 0's copy too; these are keyed by name) ------
    def weight_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """INT8 codes + scales of the matrices this rank owns (every matrix is in exactly one rank's file)."""
        return {n: dict(zip(("codes", "scales"), self._weight_tensors(n))) for n in sorted(self.owned)}

    @torch.no_grad()
    def load_weight_state(self, state: dict) -> None:
        """Restore the owned matrices' codes + scales (the replicas follow from DeepSpeed's module state; a
        mismatch would be caught and repaired by the next replica check)."""
        missing = sorted(self.owned - set(state))
        if missing:
            raise ValueError(f"weights missing for owned matrices {missing[:3]}")
        for n in sorted(self.owned):
            for t, key in zip(self._weight_tensors(n), ("codes", "scales")):
                src = state[n][key]
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"{n}.{key} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
                t.copy_(src)


class FlatDenseAdamW(torch.optim.Optimizer):
    """DeepSpeed's client optimizer for the dense parameters: :func:`dense_adamw_step` on each (flat) tensor.

    Element-wise, so ZeRO's flat partitions are fine; with ``state_bits=8`` the moments are 8-bit blockwise over
    the flat slice (blocks then differ from the single-device reference's per-tensor blocks; ``state_bits=32`` is
    the reference's fp32 rule exactly).

    ``norm_fn(local_sq) -> (norm, coef)`` is called once per ``step()`` with Σ‖g‖² of this rank's gradients
    (float64) and must return the *global* pre-clip norm and the clipping factor (it is collective: the engine's
    all-reduce over the side-car's group). Without it the norm is local and nothing is clipped. ``last_step`` and
    ``calls`` record what happened (the engine checks one call per optimizer step).

    State is kept per tensor object (ZeRO-3 swaps a sub-group's flat tensor into ``param_groups`` around each call)
    and saved in ``param_groups`` order, like ``torch.optim``'s.
    """

    FORMAT = "qgalore_dist.flat_dense_adamw/1"

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, state_bits: int = 32, block: int = 256, min_numel: int = 4096,
                 norm_fn: Callable[[float], tuple[float, float]] | None = None):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits={state_bits!r} is invalid: allowed: 8 or 32")
        super().__init__(list(params), {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.state_bits, self.block, self.min_numel = state_bits, block, min_numel
        self.norm_fn = norm_fn
        self.dense: dict[int, DenseState] = {}
        self.last_step = StepResult()
        self.calls = 0

    def _state(self, p: torch.Tensor) -> DenseState:
        st = self.dense.get(id(p))
        if st is None:
            st = self.dense[id(p)] = init_dense_state(p, self.state_bits, self.block, self.min_numel)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        live = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        local_sq = sum(squared_norm(p.grad) for _, p in live)
        if self.norm_fn is not None:
            norm, coef = self.norm_fn(local_sq)
        else:
            norm, coef = math.sqrt(local_sq), 1.0
        self.last_step = StepResult(norm, coef)
        self.calls += 1
        for group, p in live:
            g = p.grad if coef == 1.0 else p.grad * coef
            dense_adamw_step(p, g, self._state(p), group["lr"], group["betas"], group["eps"], group["weight_decay"])
        return loss

    def state_nbytes(self) -> int:
        """Exact bytes of the moments held (every tensor stepped so far)."""
        return sum(st.nbytes() for st in self.dense.values())

    def state_dict(self):  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"]]
        return {"format": self.FORMAT, "state_bits": self.state_bits,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
                                 for g in self.param_groups],
                "state": [self.dense[id(p)].state_dict() if id(p) in self.dense else None for p in params]}

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        if not isinstance(state_dict, dict) or state_dict.get("format") != self.FORMAT:
            raise ValueError(f"not a {self.FORMAT} optimizer state")
        if state_dict["state_bits"] != self.state_bits:
            raise ValueError(f"dense optimizer state has {state_dict['state_bits']}-bit moments, this run "
                             f"{self.state_bits}-bit")
        params = [p for g in self.param_groups for p in g["params"]]
        saved = state_dict["state"]
        if len(saved) != len(params):
            raise ValueError(f"dense optimizer state holds {len(saved)} tensors, this run {len(params)}")
        self.dense = {}
        for p, sd in zip(params, saved):
            if sd is not None:
                self._state(p).load_state_dict(sd)
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in sg.items() if k not in ("params", "n")})
