"""``QGaLoreOptimizer``: a ``torch.optim.Optimizer`` for one process, over a whole model.

It drives the per-matrix rule (:class:`LowRankAdamW`, or :class:`ProjFactor` with ``config.optimizer="projfactor"``)
for every projected matrix and :func:`dense_adamw_step` for everything else. Works with ``torch.optim.lr_scheduler``
and ``transformers.Trainer(optimizers=(opt, sched))``: the learning rate is read from ``param_groups`` at every step.
With Trainer, clip in the optimizer (``grad_clip``) and set ``TrainingArguments(max_grad_norm=0)``: Trainer's own
clipping sees only the dense gradients (the projected ones are consumed inside backward), so it would clip by a
partial norm — :func:`qgalore_dist.train.hf_trainer.optimizer_for_trainer` sets both up from the TrainingArguments.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES, find_target_linears
from ..nn.int8_linear import QGaLoreLinear
from ..projection.vlorp import resolve_granularity
from ..quant.int8 import Int8Weight
from .dense_adamw import DenseState, dense_adamw_step, dense_sr_key, init_dense_state
from .lowrank_adamw import LowRankAdamW, MatrixState, effective_rank
from .norms import StepResult, clip_coef, closure_loss, squared_norm
from .rules import make_rule


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


class QGaLoreBase:
    """What every placement of the Q-GaLore optimizer shares (local :class:`QGaLoreOptimizer`, replicated
    :class:`~qgalore_dist.parallel.sharded_optimizer.ShardedQGaLoreOptimizer`, row-sharded
    :class:`~qgalore_dist.parallel.row_sharded.RowShardedQGaLoreOptimizer`): the ``param_groups`` by ``kind``
    ("projected" / "dense"), the per-matrix rule at the projected group's current lr / weight decay, wall time per
    phase (``phase_times``) — and **the step's orchestration, written once** for every placement and engine:

    ``step(closure)`` = closure → :meth:`begin_step` → :meth:`shared_norm` → :meth:`finish_step`, where

    * ``begin_step`` closes the accumulation window (the placement's ``_begin``: refreshes, projection, the
      reductions its layout needs) and keeps this rank's *shares* of the squared global norm;
    * ``shared_norm`` sums the shares over ranks (one all-reduce; none on one process), adding any norm² stepped
      elsewhere (DeepSpeed's dense partition: its client optimizer calls this from inside DeepSpeed's step), and
      gives the global norm and the clipping factor — the same on every rank;
    * ``finish_step`` skips the whole step on a non-finite norm (every rank alike: the placement's ``_skip``) or
      applies it with the clipping factor (``_apply``); the :class:`StepResult` is the same on every engine.

    A placement implements ``_begin`` / ``_apply`` / ``_skip`` / ``_after_step`` and holds no rule math.
    """

    rule: LowRankAdamW
    phase_times: dict[str, float]
    grad_clip: float = 0.0
    collectives = None  # a placement across ranks sets its Collectives: the norm shares are summed over them
    last_step: StepResult = StepResult()
    _open: tuple | None = None  # (norm² shares, placement payload) between begin_step and finish_step
    _norm: float | None = None  # set by shared_norm
    _skipped_in_backward = 0  # local in-backward updates left out since the last step (non-finite gradient)

    # --- the step: one orchestration for every placement --------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, **window):
        """One optimizer step (collective across ranks). ``window``: what the placement's ``_begin`` takes (the
        row-sharded placement: ``grads``). Returns the closure's loss (None without one), like ``torch.optim``;
        the global pre-clip norm and the clipping factor are in :attr:`last_step`."""
        loss = closure_loss(closure)
        self.begin_step(**window)
        self.shared_norm()
        self.finish_step()
        return loss

    @torch.no_grad()
    def begin_step(self, **window) -> float:
        """First half (collective): the placement closes the window. Returns this rank's share of the norm²."""
        if self._open is not None:
            raise RuntimeError("begin_step() called twice without finish_step()")
        shares, payload = self._begin(**window)
        self._open, self._norm = (list(shares), payload), None
        return sum(shares)

    def shared_norm(self, extra_sq: float = 0.0) -> tuple[float, float]:
        """Collective, between the halves: Σ over ranks of this rank's shares (``extra_sq`` — norm² of parameters
        stepped elsewhere — added to the last share). Returns (global norm, clipping factor at ``grad_clip``)."""
        if self._open is None:
            raise RuntimeError("shared_norm() without begin_step()")
        shares = list(self._open[0])
        shares[-1] += float(extra_sq)
        if self.collectives is not None:
            v = torch.tensor(shares, dtype=torch.float64, device=self.collectives.device)
            self.collectives.all_reduce([v])
            shares = [float(x) for x in v]
        self._norm = sum(shares) ** 0.5
        return self._norm, clip_coef(self._norm, self.grad_clip)

    @torch.no_grad()
    def finish_step(self, coef: float | None = None) -> StepResult:
        """Second half (collective): nothing applied on a non-finite norm (equal on every rank, so every rank
        skips), else the update with clipping factor ``coef`` (default: from ``grad_clip``)."""
        if self._open is None or self._norm is None:
            raise RuntimeError("finish_step() without begin_step() and shared_norm()")
        (_, payload), norm = self._open, self._norm
        self._open = self._norm = None
        skipped_matrices, self._skipped_in_backward = self._skipped_in_backward, 0
        if not math.isfinite(norm):
            self._skip(payload)
            self.last_step = StepResult(norm, 1.0, skipped=True, skipped_matrices=skipped_matrices)
        else:
            coef = clip_coef(norm, self.grad_clip) if coef is None else float(coef)
            self._apply(payload, coef)
            self.last_step = StepResult(norm, coef, skipped_matrices=skipped_matrices)
        self._after_step()
        return self.last_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._open = self._norm = None  # a step abandoned between its halves (an error) leaves nothing open
        super().zero_grad(set_to_none)

    def _begin(self, **window) -> tuple[list[float], object]:
        raise NotImplementedError

    def _apply(self, payload, coef: float) -> None:
        raise NotImplementedError

    def _skip(self, payload) -> None:
        """A skipped step: drop the window (every placement that holds it clears it)."""
        self.zero_grad()

    def _after_step(self) -> None:
        """Book-keeping after a step, applied or skipped (byte counters, replica checks)."""

    def _step_dense(self, name: str, p: torch.Tensor, grad: torch.Tensor, index_offset: int = 0) -> None:
        """One dense parameter's AdamW step — every placement's, with the same kernel choice and the bf16 rounding
        stream keyed by global element index (``index_offset``: where a shard starts), so N ranks reproduce one."""
        dg = self._group("dense")
        st = self.dense_state[name]
        self._timed("optimizer", dense_adamw_step, p, grad, st, dg["lr"], self.config.betas, self.config.eps,
                    dg["weight_decay"], fused=self.config.fused, sr_key=dense_sr_key(self.config, st, name, p.dtype),
                    index_offset=index_offset)

    # --- groups -------------------------------------------------------------------------------------------
    @staticmethod
    def _param_groups(config: QGaLoreConfig, dense: list, projected: list, dense_lr: float | None,
                      dense_weight_decay: float | None) -> list[dict]:
        """The ``param_groups`` of every Q-GaLore optimizer: the dense parameters (their own lr / weight decay,
        if given) and the projected tensors, each group tagged with its ``kind``."""
        groups = []
        if dense:
            groups.append({"params": dense, "kind": "dense", "lr": config.lr if dense_lr is None else dense_lr,
                           "weight_decay": config.weight_decay if dense_weight_decay is None else dense_weight_decay})
        groups.append({"params": projected, "kind": "projected", "lr": config.lr, "weight_decay": config.weight_decay})
        return groups

    def _load_dense_and_groups(self, sd: dict) -> None:
        """The dense parameters' AdamW state and the groups' hyperparameters from a state dict (every placement's)."""
        for n, st in self.dense_state.items():
            if n not in sd["dense"]:
                raise ValueError(f"optimizer state has no entry for dense parameter {n}")
            st.load_state_dict(sd["dense"][n])
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "kind")})

    def _group(self, kind: str) -> dict:
        for g in self.param_groups:
            if g.get("kind") == kind:
                return g
        raise KeyError(kind)

    def _rule(self) -> tuple[LowRankAdamW, float]:
        """The rule with the projected group's current lr / weight decay (schedulers edit param_groups)."""
        pg = self._group("projected")
        lr, wd = pg["lr"], pg["weight_decay"]
        rule = self.rule
        if wd != rule.config.weight_decay:
            rule = self.rule = type(rule)(rule.config.replace(weight_decay=wd))
        return rule, lr

    def _timed(self, phase: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.phase_times[phase] += time.perf_counter() - t0
        return out


_APPLY_CHUNK = 1 << 22  # weight elements re-quantised per block in _apply (matrices above this are split by rows)


class QGaLoreOptimizer(QGaLoreBase, torch.optim.Optimizer):
    """Q-GaLore AdamW for the targeted matrices, AdamW (fp32 or 8-bit state) for the rest.

    Args:
        model: the (prepared) model.
        config: projected-matrix settings; ``config.lr`` / ``config.weight_decay`` are the defaults of both groups.
        dense_state_bits: 32 or 8 — dense AdamW moments.
        target_modules: which linears are projected.
        stagger_refresh: spread later refreshes of different matrices over the interval (all refresh at step 0),
            so few SVDs fall on one step.
        layerwise: consume each projected gradient inside backward: project it into a low-rank accumulator and
            free it, so the full-model gradient never exists. A due refresh uses the gradient of the *first*
            micro-batch of the accumulation window (the only full gradient ever held, one matrix at a time).
            With ``grad_accum == 1`` and no clipping, the whole step runs inside backward and no accumulator exists.
        grad_accum: micro-batches per optimizer step (only decides whether in-backward stepping is possible; the
            caller scales each micro-batch loss by ``1 / grad_accum`` as usual).
        grad_clip: max global norm (0 = off). The norm is ``√(‖dense grads‖² + Σ‖low-rank grads‖²)`` — the norm of
            what the optimizer consumes, the same in every engine (the full gradient never exists in layer-wise
            mode, so its norm cannot be used).

    ``step(closure)`` returns the closure's loss (None without one), like ``torch.optim``; the global norm
    (before clipping, measured whether clipping or not) and the clipping factor are in :attr:`last_step`.
    """

    def __init__(self, model: nn.Module, config: QGaLoreConfig, *, dense_state_bits: int = 32,
                 target_modules=DEFAULT_TARGET_MODULES, stagger_refresh: bool = False,
                 dense_lr: float | None = None, dense_weight_decay: float | None = None,
                 layerwise: bool = False, grad_accum: int = 1, grad_clip: float = 0.0):
        if dense_state_bits not in (8, 32):
            raise ValueError(f"dense_state_bits={dense_state_bits!r} is invalid: allowed: 8 or 32")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum!r} is invalid: must be a positive integer")
        if grad_clip < 0:
            raise ValueError(f"grad_clip={grad_clip!r} is invalid: must be >= 0 (0 = off)")
        self.config = config
        self.rule = make_rule(config)
        self.matrices = collect_projected(model, config, target_modules)
        projected_ids = {id(pm.tensor()) for pm in self.matrices}
        self.dense_named = [(n, p) for n, p in model.named_parameters()
                            if p.requires_grad and id(p) not in projected_ids]
        groups = self._param_groups(config, [p for _, p in self.dense_named], [pm.tensor() for pm in self.matrices],
                                    dense_lr, dense_weight_decay)
        super().__init__(groups, {"lr": config.lr, "weight_decay": config.weight_decay})

        # VLoRP granularity per matrix: an error, or c=1 with one warning (granularity_fallback), where c does not fit
        self.granularity = resolve_granularity({pm.name: pm.shape for pm in self.matrices}, config.granularity,
                                               config.rank, config.proj_type, config.granularity_fallback)
        clamped = [f"{pm.name} {pm.shape}" for pm in self.matrices  # c != 1 never clamps: the rank must fit
                   if self.granularity[pm.name] == 1.0 and effective_rank(pm.shape, config.rank) < config.rank]
        if clamped:
            warnings.warn(f"rank {config.rank} exceeds min(m, n) of {len(clamped)} matrices; clamped for: "
                          + ", ".join(clamped), stacklevel=2)
        gap = config.update_proj_gap
        self.mstate: dict[str, MatrixState] = {}
        for i, pm in enumerate(self.matrices):
            offset = (i * gap) // len(self.matrices) if stagger_refresh else 0
            self.mstate[pm.name] = self._init_matrix_state(pm, offset)
        self.dense_state: dict[str, DenseState] = {
            n: init_dense_state(p, dense_state_bits, config.state_block_size, config.state_min_numel)
            for n, p in self.dense_named}
        self.dense_state_bits = dense_state_bits
        self.grad_accum = grad_accum
        self.grad_clip = float(grad_clip)
        self.layerwise = layerwise
        self.accum: dict[str, torch.Tensor] = {}  # low-rank gradients of the current window
        self.phase_times = {"svd": 0.0, "projection": 0.0, "optimizer": 0.0, "requantize": 0.0}
        self._hooks = []
        # the whole step runs inside backward: nothing has to wait for the accumulation boundary or a global norm
        self.in_backward = layerwise and grad_accum == 1 and self.grad_clip == 0
        self._consumed_sq = 0.0  # Σ‖consumed gradient‖² of in-backward steps, reported by the next step()
        self._skipped_in_backward = 0  # in-backward updates left out since step(): non-finite gradient
        self.last_step = StepResult()
        self._stepped_in_backward: set[str] = set()  # matrices already stepped inside backward since step()
        if layerwise:
            for pm in self.matrices:
                self._install_sink(pm)
        if self.in_backward:  # dense gradients too (a 7B model's embedding + head gradients are 1 GB in fp32)
            for n, p in self.dense_named:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, n=n: self._dense_in_backward(n, p)))

    def _init_matrix_state(self, pm: ProjectedMatrix, refresh_offset: int) -> MatrixState:
        """Fresh state of one projected matrix (a distributed engine overrides this to allocate moments only for
        the matrices its rank owns)."""
        t = pm.tensor()
        return self.rule.init_state(pm.name, pm.shape, t.device, refresh_offset,
                                    t.dtype if t.is_floating_point() else torch.float32,
                                    granularity=self.granularity[pm.name])


    def _project_into_window(self, pm: ProjectedMatrix, grad: torch.Tensor) -> torch.Tensor:
        """Refresh (first micro-batch of the window only) and project one gradient; returns R."""
        st = self.mstate[pm.name]
        if pm.name not in self.accum and self.rule.needs_refresh(st):
            self._timed("svd", self.rule.refresh, st, grad)
        return self._timed("projection", self.rule.project, st, grad)

    def _apply_matrix(self, pm: ProjectedMatrix, lowrank_grad: torch.Tensor, rule: LowRankAdamW, lr: float
                      ) -> None:
        st = self.mstate[pm.name]
        n, step_size = self._timed("optimizer", rule.normalise, st, lowrank_grad, lr)
        self._apply_rows_blocked(pm, n, step_size, rule, lr)

    def _apply_rows_blocked(self, pm: ProjectedMatrix, n: torch.Tensor, step_size: float, rule: LowRankAdamW,
                            lr: float) -> None:
        """``rule.apply_rows`` on the whole matrix — or, for INT8 matrices above ``_APPLY_CHUNK`` elements, a block
        of rows at a time, as a row-sharded engine does (same keyed rounding by global index): the fp32 update and
        the requantisation temporaries of a 11008×4096 LLaMA-7B MLP matrix are ~0.4 GB at once, ~25 MB per block.
        A block's matmul may round its last bit differently from the whole matrix's, so every engine that must
        reproduce this optimizer bit for bit applies its updates through here too."""
        st = self.mstate[pm.name]
        w = pm.weight()
        rows, cols = pm.shape
        if not (pm.quantized and rows * cols > _APPLY_CHUNK and st.granularity == 1.0 and st.basis is not None
                and type(rule) is LowRankAdamW):
            self._timed("requantize", rule.apply_rows, st, w, n, step_size, lr)
            return
        chunk = max(1, _APPLY_CHUNK // cols)
        # the float basis once for all blocks: left, each block takes its rows of P; right, every block the whole Q
        basis = st.basis_float(torch.float64 if n.dtype == torch.float64 else torch.float32)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            block = Int8Weight(w.codes[r0:r1], w.scales[r0:r1], w.group_size)
            self._timed("requantize", rule.apply_rows, st, block, n, step_size, lr, r0,
                        basis[r0:r1] if st.side == "left" else basis)

    # --- layer-wise: gradients consumed inside backward -----------------------------------------------------
    def _install_sink(self, pm: ProjectedMatrix) -> None:
        if pm.quantized:
            pm.module.weight_grad_sink = lambda g, pm=pm: self._consume(pm, g)
        else:
            def hook(p, pm=pm):
                g, p.grad = p.grad, None
                self._consume(pm, g)
            self._hooks.append(pm.module.weight.register_post_accumulate_grad_hook(hook))

    @torch.no_grad()
    def _dense_in_backward(self, name: str, p: torch.Tensor) -> None:
        self._consumed_sq += squared_norm(p.grad)
        self._step_dense(name, p, p.grad)
        p.grad = None

    @torch.no_grad()
    def _consume(self, pm: ProjectedMatrix, grad: torch.Tensor) -> None:
        if self.in_backward:
            if pm.name in self._stepped_in_backward:
                # a second backward before step(): with grad_accum=1 each backward already applied an update, so
                # accumulation (e.g. Trainer's gradient_accumulation_steps) would silently become extra steps
                raise RuntimeError(f"{pm.name}: a second backward pass before optimizer.step(), but the optimizer was "
                                   "built with grad_accum=1 (it steps inside backward); pass grad_accum=<micro-batches "
                                   "per step>")
            self._stepped_in_backward.add(pm.name)
        r = self._project_into_window(pm, grad)
        if self.in_backward:
            sq = squared_norm(r)
            self._consumed_sq += sq
            if not math.isfinite(sq):  # this matrix's update alone is left out (the others may already be applied)
                self._skipped_in_backward += 1
                return
            rule, lr = self._rule()
            self._apply_matrix(pm, r, rule, lr)  # the whole step inside backward: no accumulator
            return
        acc = self.accum.get(pm.name)
        if acc is None:
            self.accum[pm.name] = r
        else:
            acc.add_(r)

    # --- the step (orchestrated by QGaLoreBase.step): the local placement's halves --------------------------
    def _begin(self) -> tuple[list[float], object]:
        """Project what backward accumulated (full gradients; layer-wise: already projected). The norm² share is
        everything this step consumes — in-backward updates included (they are applied already)."""
        rule, lr = self._rule()
        self._stepped_in_backward.clear()
        if not self.layerwise:  # full gradients were accumulated by backward: project them now
            for pm in self.matrices:
                g = pm.grad()
                if g is not None:
                    self.accum[pm.name] = self._project_into_window(pm, g)
                    pm.clear_grad()
        dense = [(n, p) for n, p in self.dense_named if p.grad is not None]
        sq = self._consumed_sq + sum(squared_norm(r) for r in self.accum.values())
        sq += sum(squared_norm(p.grad) for _, p in dense)
        self._consumed_sq = 0.0
        return [sq], (dense, rule, lr)

    def _apply(self, payload, coef: float) -> None:
        dense, rule, lr = payload
        for pm in self.matrices:
            r = self.accum.pop(pm.name, None)
            if r is not None:
                self._apply_matrix(pm, r.mul_(coef) if coef < 1.0 else r, rule, lr)
        for n, p in dense:
            self._step_dense(n, p, p.grad if coef == 1.0 else p.grad * coef)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._open = self._norm = None
        self.accum.clear()
        self._consumed_sq = 0.0
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

    def _matrix_state_bytes(self, pm: ProjectedMatrix) -> dict[str, int]:
        """Projector and moment bytes this process holds for one matrix (engines that shard state override)."""
        return self.mstate[pm.name].state_bytes()

    def memory_bytes(self) -> dict[str, int]:
        """Exact resident bytes: projected weights, projectors, low-rank moments, dense weights, dense moments."""
        out = {"projected_weights": 0, "projectors": 0, "lowrank_moments": 0, "dense_weights": 0,
               "dense_moments": 0}
        for pm in self.matrices:
            out["projected_weights"] += pm.weight_bytes()
            sb = self._matrix_state_bytes(pm)
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
        self._load_dense_and_groups(state_dict)
