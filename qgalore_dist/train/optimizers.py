"""The optimizers ``--optimizer`` names: Q-GaLore / GaLore (:class:`~qgalore_dist.optim.QGaLoreOptimizer`),
torch AdamW and the 8-bit dense AdamW baseline. Every one's ``step(closure)`` returns the closure's loss, like
``torch.optim``, and leaves the pre-clip global gradient norm in ``last_step`` (:class:`~..optim.norms.StepResult`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..errors import UsageError
from ..optim import QGaLoreOptimizer
from ..optim.dense_adamw import dense_adamw_step, init_dense_state
from ..optim.norms import StepResult, clip_coef, closure_loss, squared_norm
from .args import INT8_OPTIMIZERS, LOWRANK_OPTIMIZERS, TrainArgs

__all__ = ["ADAM_EPS", "WEIGHT_GROUP_SIZE", "DenseAdamW8bit", "TorchAdamW", "make_optimizer", "qgalore_config"]

# Adam epsilon of every optimizer here: GaLore's / Q-GaLore's default, so baselines compare at equal settings.
ADAM_EPS = 1e-6
WEIGHT_GROUP_SIZE = 256  # INT8 weight group (docs/design.md §5 reference setting)


def _global_norm(grads: Iterable[torch.Tensor]) -> float:
    """√(Σ‖g‖²), accumulated in float64: the same definition QGaLoreOptimizer clips by."""
    return math.sqrt(sum(squared_norm(g) for g in grads))


class TorchAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step()`` clips with ``clip_grad_norm_`` (when ``grad_clip > 0``) and keeps
    the global gradient norm before clipping in ``last_step`` — the same contract as :class:`QGaLoreOptimizer`."""

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, grad_clip: float = 0.0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_clip = float(grad_clip)
        self.last_step = StepResult()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = closure_loss(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            if self.grad_clip > 0:  # DTensor gradients (FSDP2) too: clip_grad_norm_ reduces over the mesh
                total = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
            else:
                total = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
            if not math.isfinite(total):  # a non-finite gradient: skip the step (clip_grad_norm_ made them NaN)
                self.zero_grad(set_to_none=True)
                self.last_step = StepResult(total, 1.0, skipped=True)
                return loss
            self.last_step = StepResult(total, clip_coef(total, self.grad_clip))
        else:
            self.last_step = StepResult()
        super().step()
        return loss


class DenseAdamW8bit(torch.optim.Optimizer):
    """AdamW over every parameter with 8-bit blockwise moments (:mod:`qgalore_dist.optim.dense_adamw`).

    The ``adamw8bit`` baseline: what Q-GaLore's dense side does, applied to the whole float model. State is keyed
    by parameter name, like :class:`QGaLoreOptimizer`'s. ``step()`` clips by the global norm when
    ``grad_clip > 0`` and returns the norm before clipping.
    """

    FORMAT = "qgalore_dist.dense_adamw8bit/1"

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, grad_clip: float = 0.0, state_bits: int = 8) -> None:
        named = [(n, p) for n, p in named_params if p.requires_grad]
        super().__init__([p for _, p in named], {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.grad_clip = float(grad_clip)
        self.state_bits = state_bits
        self._names = {id(p): n for n, p in named}
        self.dense_state = {n: init_dense_state(p, state_bits) for n, p in named}
        self.last_step = StepResult()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = closure_loss(closure)
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_step = StepResult()
        if not live:
            return loss
        norm = _global_norm(p.grad for p in live)
        if not math.isfinite(norm):  # a non-finite gradient: skip the step
            self.zero_grad(set_to_none=True)
            self.last_step = StepResult(norm, 1.0, skipped=True)
            return loss
        coef = clip_coef(norm, self.grad_clip)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if coef == 1.0 else p.grad * coef
                dense_adamw_step(p, g, self.dense_state[self._names[id(p)]], group["lr"], group["betas"],
                                 group["eps"], group["weight_decay"])
        self.last_step = StepResult(norm, coef)
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"format": self.FORMAT, "state_bits": self.state_bits,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                "params": {n: st.state_dict() for n, st in self.dense_state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if state_dict.get("format") != self.FORMAT:
            raise ValueError(f"not a {self.FORMAT} optimizer state")
        if state_dict.get("state_bits") != self.state_bits:
            raise ValueError(f"optimizer state has {state_dict.get('state_bits')}-bit moments, this run "
                             f"{self.state_bits}-bit")
        saved = state_dict["params"]
        missing, extra = sorted(set(self.dense_state) - set(saved)), sorted(set(saved) - set(self.dense_state))
        if missing or extra:
            raise ValueError(f"optimizer state does not match the model: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}")
        for n, st in self.dense_state.items():
            st.load_state_dict(saved[n])
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in sg.items() if k != "params"})


def qgalore_config(args: TrainArgs) -> QGaLoreConfig:
    """The projected-matrix settings of ``--optimizer qgalore|galore`` (galore: float reference mode)."""
    try:
        return QGaLoreConfig(
            rank=args.rank, update_proj_gap=args.update_proj_gap, scale=args.scale, projection=args.projection,
            quantize=args.optimizer in INT8_OPTIMIZERS, granularity=args.granularity,
            optimizer="projfactor" if args.optimizer == "projfactor" else "adamw",
            weight_group_size=WEIGHT_GROUP_SIZE, lr=args.lr,
            betas=(args.beta1, args.beta2), eps=ADAM_EPS, weight_decay=args.weight_decay, gate=not args.no_gate,
            max_proj_gap=args.proj_gap_cap if args.proj_gap_cap is not None else max(5000, args.update_proj_gap),
            seed=args.seed)
    except ValueError as exc:
        raise UsageError(f"invalid optimizer setting: {exc}") from exc


def make_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """The optimizer ``--optimizer`` names, over ``model`` (already INT8-converted for ``qgalore``).

    Every returned optimizer keeps the global gradient norm before clipping in ``last_step`` after ``step()``.
    """
    betas = (args.beta1, args.beta2)
    if args.optimizer in LOWRANK_OPTIMIZERS:
        try:
            # layer-wise: each projected gradient is consumed inside backward, so the full-model gradient never
            # exists; the 8-bit dense state is Q-GaLore's, the fp32 one GaLore's reference.
            return QGaLoreOptimizer(model, qgalore_config(args), dense_state_bits=8 if args.optimizer in INT8_OPTIMIZERS
                                    else 32, target_modules=tuple(args.target_module_list), stagger_refresh=True,
                                    layerwise=True, grad_accum=args.grad_accum, grad_clip=args.grad_clip)
        except ValueError as exc:
            raise UsageError(f"cannot build the {args.optimizer} optimizer: {exc}") from exc
    if args.optimizer == "adamw":
        # trainable parameters only: --method lora freezes the base
        return TorchAdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=betas, eps=ADAM_EPS,
                          weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip)
    if args.optimizer == "adamw8bit":
        return DenseAdamW8bit(model.named_parameters(), lr=args.lr, betas=betas, eps=ADAM_EPS,
                              weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    raise UsageError(f"--optimizer {args.optimizer!r} is unknown")
