"""``transformers.Trainer`` with :class:`~qgalore_dist.optim.QGaLoreOptimizer`: the two settings that must agree.

Trainer drives the optimizer itself — ``optimizer.step()`` once per ``gradient_accumulation_steps`` backward
passes, ``model.zero_grad()`` after it — and clips with ``clip_grad_norm_(model.parameters(), max_grad_norm)``
right before the step. Neither fits a layer-wise optimizer on its own:

* **clipping**: the projected gradients are consumed inside backward (projected into low-rank accumulators and
  freed), so ``model.parameters()`` carries only the dense gradients. Trainer's clip would scale the dense part by
  the dense-only norm and leave the projected part alone; with the optimizer clipping as well, the dense part would
  be clipped twice. The clip therefore belongs to the optimizer (``grad_clip``, by
  ``√(‖dense‖² + Σ‖low-rank‖²)``) and Trainer's ``max_grad_norm`` must be 0.
* **accumulation**: the optimizer must know the number of micro-batches per step. With ``grad_accum=1`` (and no
  clipping) it steps *inside* backward, which would turn Trainer's accumulation into extra steps — the optimizer
  raises on a second backward before ``step()``.

:func:`optimizer_for_trainer` builds the optimizer from the ``TrainingArguments`` and moves the clip into it. Note
that Trainer's logged ``grad_norm`` then is its own measurement over ``model.parameters()`` (dense gradients only);
``optimizer.last_step.grad_norm`` holds the global norm after ``optimizer.step()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import QGaLoreConfig
from ..nn.convert import DEFAULT_TARGET_MODULES
from ..optim import QGaLoreOptimizer

__all__ = ["check_trainer_args", "optimizer_for_trainer"]


def optimizer_for_trainer(model: nn.Module, config: QGaLoreConfig, training_args: Any, *,
                          dense_state_bits: int = 8, target_modules=DEFAULT_TARGET_MODULES,
                          stagger_refresh: bool = True) -> QGaLoreOptimizer:
    """A layer-wise :class:`QGaLoreOptimizer` for ``transformers.Trainer(args=training_args, optimizers=(opt, s))``.

    Takes ``grad_accum`` from ``training_args.gradient_accumulation_steps`` and the clip from
    ``training_args.max_grad_norm``, then sets ``training_args.max_grad_norm = 0`` so Trainer does not clip the
    dense gradients a second time by a partial norm (module docstring).
    """
    clip = float(getattr(training_args, "max_grad_norm", 0.0) or 0.0)
    opt = QGaLoreOptimizer(model, config, dense_state_bits=dense_state_bits, target_modules=target_modules,
                           stagger_refresh=stagger_refresh, layerwise=True,
                           grad_accum=int(training_args.gradient_accumulation_steps), grad_clip=clip)
    training_args.max_grad_norm = 0.0
    return opt


def check_trainer_args(training_args: Any, optimizer: QGaLoreOptimizer) -> None:
    """Raise ``ValueError`` if ``training_args`` would make Trainer clip by a partial norm or step more often than
    the optimizer expects (for optimizers built by hand rather than with :func:`optimizer_for_trainer`)."""
    if float(getattr(training_args, "max_grad_norm", 0.0) or 0.0) > 0:
        raise ValueError(f"TrainingArguments.max_grad_norm={training_args.max_grad_norm} would clip only the dense "
                         "gradients (the projected ones are consumed inside backward): set max_grad_norm=0 and pass "
                         "grad_clip to QGaLoreOptimizer")
    ga = int(training_args.gradient_accumulation_steps)
    if optimizer.in_backward and ga > 1:  # other mismatches are harmless: step() applies what was accumulated
        raise ValueError(f"TrainingArguments.gradient_accumulation_steps={ga} but the optimizer steps inside "
                         "backward (grad_accum=1, no clipping): build it with grad_accum="
                         f"{ga}")
