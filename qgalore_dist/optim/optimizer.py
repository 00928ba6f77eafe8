"""``QGaLoreOptimizer``: a ``torch.optim.Optimizer`` for one process, over a whole model.

It drives the per-matrix rule (:class:`LowRankAdamW`) for every projected matrix and :func:`dense_adamw_step`
for everything else. Works with ``torch.optim.lr_scheduler`` and ``transformers.Trainer(optimizers=(opt, sched))``:
the learning rate is read from ``param_groups`` at every step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES, find_target_linears
from ..nn.int8_linear import QGaLoreLinear
from ..quant.int8 import Int8Weight
from .dense_adamw import DenseState, dense_adamw_step, init_dense_state
from .lowrank_adamw import LowRankAdamW, MatrixState, effective_rank


@dataclass
class ProjectedMatrix:
    """Where one projected matrix's weight and gradient live: an INT8 :class:`QGaLoreLinear` or, in the float
    reference mode, an ordinary ``nn.Linear`` weight Parameter."""

    name: str
    module: nn.Module

    @property
    def quantized(self) -> bool:
        return isinstance(self.module, QGaLoreLinear)

    @property
    def shape(self) -> tuple[int, int]:
        t = self.module.weight_codes if self.quantized else self.module.weight
        return int(t.shape[0]), int(t.shape[1])

    def tensor(self) -> torch.Tensor:
        """The tensor registered in ``param_groups`` (the int8 codes buffer, or the float Parameter)."""
        return self.module.weight_codes if self.quantized else self.module.weight

    def weight(self) -> Int8Weight | torch.Tensor:
        return self.module.int8_weight if self.quantized else self.module.weight

    def grad(self) -> torch.Tensor | None:
        return self.module.weight_grad if self.quantized else self.module.weight.grad

    def clear_grad(self) -> None:
        if self.quantized:
            self.module.weight_grad = None
        else:
            self.module.weight.grad = None

    def weight_bytes(self) -> int:
        if self.quantized:
            return self.module.int8_weight.nbytes()
        w = self.module.weight
        return w.numel() * w.element_size()


def collect_projected(model: nn.Module, config: QGaLoreConfig, target_modules=DEFAULT_TARGET_MODULES
                      ) -> list[ProjectedMatrix]:
    """The model's projected matrices in model order, named ``<module>.weight``."""
    found = find_target_linears(model, target_modules)
    out = []
    for name, mod in found.items():
        if config.quantize and isinstance(mod, nn.Linear):
            raise ValueError(f"{name} is a float nn.Linear but quantize=True: prepare the model with "
                             "qgalore_dist.nn.quantize_model first (or set quantize=False for the float mode)")
        if not config.quantize and isinstance(mod, QGaLoreLinear):
            raise ValueError(f"{name} holds an INT8 weight but quantize=False (float reference mode)")
        out.append(ProjectedMatrix(f"{name}.weight", mod))
    if not out:
        raise ValueError(f"target_modules={list(target_modules)!r} matched no linear layer of the model")
    return out


class QGaLoreOptimizer(torch.optim.Optimizer):
    """Q-GaLore AdamW for the targeted matrices, AdamW (fp32 or 8-bit state) for the rest.

    Args:
        model: the (prepared) model.
        config: projected-matrix settings; ``config.lr`` / ``config.weight_decay`` are the defaults of both groups.
        dense_state_bits: 32 or 8 — dense AdamW moments.
        target_modules: which linears are projected.
        stagger_refresh: spread later refreshes of different matrices over the interval (all refresh at step 0).
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, *, dense_state_bits: int = 32,
                 target_modules=DEFAULT_TARGET_MODULES, stagger_refresh: bool = False,
                 dense_lr: float | None = None, dense_weight_decay: float | None = None):
        if dense_state_bits not in (8, 32):
            raise ValueError(f"dense_state_bits={dense_state_bits!r} is invalid: allowed: 8 or 32")
        self.config = config
        self.rule = LowRankAdamW(config)
        self.matrices = collect_projected(model, config, target_modules)
        projected_ids = {id(pm.tensor()) for pm in self.matrices}
        self.dense_named = [(n, p) for n, p in model.named_parameters()
                            if p.requires_grad and id(p) not in projected_ids]
        groups = []
        if self.dense_named:
            groups.append({"params": [p for _, p in self.dense_named], "kind": "dense",
                           "lr": config.lr if dense_lr is None else dense_lr,
                           "weight_decay": config.weight_decay if dense_weight_decay is None else dense_weight_decay})
        groups.append({"params": [pm.tensor() for pm in self.matrices], "kind": "projected", "lr": config.lr,
                       "weight_decay": config.weight_decay})
        super().__init__(groups, {"lr": config.lr, "weight_decay": config.weight_decay})

        clamped = [f"{pm.name} {pm.shape}" for pm in self.matrices
                   if effective_rank(pm.shape, config.rank) < config.rank]
        if clamped:
            warnings.warn(f"rank {config.rank} exceeds min(m, n) of {len(clamped)} matrices; clamped for: "
                          + ", ".join(clamped), stacklevel=2)
        gap = config.update_proj_gap
        self.mstate: dict[str, MatrixState] = {}
        for i, pm in enumerate(self.matrices):
            offset = (i * gap) // len(self.matrices) if stagger_refresh else 0
            t = pm.tensor()
            self.mstate[pm.name] = self.rule.init_state(pm.name, pm.shape, t.device, offset,
                                                        t.dtype if t.is_floating_point() else torch.float32)
        self.dense_state: dict[str, DenseState] = {
            n: init_dense_state(p, dense_state_bits, config.state_block_size, config.state_min_numel)
            for n, p in self.dense_named}
        self.dense_state_bits = dense_state_bits

    # --- groups ---------------------------------------------------------------------------------------------
    def _group(self, kind: str) -> dict:
        for g in self.param_groups:
            if g.get("kind") == kind:
                return g
        raise KeyError(kind)

    # --- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pg = self._group("projected")
        lr, wd = pg["lr"], pg["weight_decay"]
        rule = self.rule
        if wd != rule.config.weight_decay or lr != rule.config.lr:
            rule = LowRankAdamW(rule.config.replace(weight_decay=wd, lr=lr))
        for pm in self.matrices:
            g = pm.grad()
            if g is None:
                continue
            rule.step(self.mstate[pm.name], pm.weight(), g, lr)
        if self.dense_named:
            dg = self._group("dense")
            for n, p in self.dense_named:
                if p.grad is not None:
                    dense_adamw_step(p, p.grad, self.dense_state[n], dg["lr"], self.config.betas, self.config.eps,
                                     dg["weight_decay"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for pm in self.matrices:
            pm.clear_grad()
        for _, p in self.dense_named:
            p.grad = None

    # --- accounting -----------------------------------------------------------------------------------------
    @property
    def svd_count(self) -> int:
        """Subspace refreshes (SVDs) computed so far."""
        return sum(st.gate.count for st in self.mstate.values())

    def refresh_log(self) -> list:
        return sorted((r for st in self.mstate.values() for r in st.history), key=lambda r: (r.step, r.name))

    def memory_bytes(self) -> dict[str, int]:
        """Exact resident bytes: projected weights, projectors, low-rank moments, dense weights, dense moments."""
        out = {"projected_weights": 0, "projectors": 0, "lowrank_moments": 0, "dense_weights": 0,
               "dense_moments": 0}
        for pm in self.matrices:
            out["projected_weights"] += pm.weight_bytes()
            sb = self.mstate[pm.name].state_bytes()
            out["projectors"] += sb["projector"]
            out["lowrank_moments"] += sb["moments"]
        for n, p in self.dense_named:
            out["dense_weights"] += p.numel() * p.element_size()
            out["dense_moments"] += self.dense_state[n].nbytes()
        out["total"] = sum(out.values())
        return out

    # --- checkpointing (keyed by parameter name, so it survives resharding) ---------------------------------
    def state_dict(self) -> dict:
        return {
            "format": "qgalore_dist.optimizer/1",
            "config": self.config.to_dict(),
            "dense_state_bits": self.dense_state_bits,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "projected": {n: st.state_dict() for n, st in self.mstate.items()},
            "dense": {n: st.state_dict() for n, st in self.dense_state.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("format") != "qgalore_dist.optimizer/1":
            raise ValueError("not a qgalore_dist optimizer state (missing format tag 'qgalore_dist.optimizer/1')")
        missing = sorted(set(self.mstate) - set(state_dict["projected"]))
        extra = sorted(set(state_dict["projected"]) - set(self.mstate))
        if missing or extra:
            raise ValueError(f"optimizer state does not match the model: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}")
        for n, st in self.mstate.items():
            st.load_state_dict(state_dict["projected"][n], self.config.proj_group_size)
        for n, st in self.dense_state.items():
            if n not in state_dict["dense"]:
                raise ValueError(f"optimizer state has no entry for dense parameter {n}")
            st.load_state_dict(state_dict["dense"][n])
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "kind")})
