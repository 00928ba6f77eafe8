"""The squared L2 norm every optimizer and engine here uses for clipping and the ``grad_norm`` metric, and the
clipping factor derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK = 1 << 22  # elements summed at a time (32 MB of fp64)


def squared_norm(t: torch.Tensor) -> float:
    """``Σ t²`` accumulated in fp64 (any shape / float dtype), as a Python float.

    Tensors up to 4 M elements are summed in one pass (bit-identical to ``t.double().pow(2).sum()``, which the
    engines' parity tests rely on); larger ones in 4 M-element chunks, because the one-pass form materialises two
    fp64 copies — 2.1 GB for the gradient of a LLaMA-7B embedding, the single largest transient of a 7B step.
    """
    if t.numel() <= _CHUNK:
        return float(t.double().pow(2).sum())
    flat = t.reshape(-1)
    return float(sum(flat[i:i + _CHUNK].double().pow(2).sum() for i in range(0, flat.numel(), _CHUNK)))


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured, the same on every engine and rank: the global gradient norm before
    clipping (``√(‖dense‖² + Σ‖R‖²)``, the norm of what the optimizer consumes) and the factor the gradients were
    scaled by (1 without clipping). ``optimizer.step()`` returns the closure's loss, like ``torch.optim``; this
    is in ``optimizer.last_step``."""

    grad_norm: float | None = None
    clip_coef: float = 1.0
    # a non-finite global norm: nothing was applied (every rank sees the same norm, so every rank skips);
    # skipped_matrices: updates inside backward (grad_accum=1) left out because that matrix's gradient was not finite
    skipped: bool = False
    skipped_matrices: int = 0


def closure_loss(closure) -> object:
    """``torch.optim``'s closure protocol: re-evaluate the model with gradients enabled and return its loss (None
    without a closure) — what every optimizer's ``step(closure)`` here returns."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def clip_coef(norm: float, max_norm: float) -> float:
    """The factor gradients are scaled by to clip their global ``norm`` to ``max_norm`` (1 when ``max_norm`` is
    0: clipping off)."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
