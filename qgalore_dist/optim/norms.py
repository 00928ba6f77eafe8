"""The squared L2 norm every optimizer and engine here uses for clipping and the ``grad_norm`` metric, and the
clipping factor derived from it."""

from __future__ import annotations

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


def clip_coef(norm: float, max_norm: float) -> float:
    """The factor gradients are scaled by to clip their global ``norm`` to ``max_norm`` (1 when ``max_norm`` is
    0: clipping off)."""
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
