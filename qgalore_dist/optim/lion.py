"""Low-rank Lion: Lion's sign update in the projected space — a rule in one file (docs/design.md §3a).

For one [m, n] matrix (VLoRP-reshaped projection as for every rule), ``t`` the step count:

    R = project(G);   u = sign(β1·m + (1−β1)·R);   m ← β2·m + (1−β2)·R
    W ← W − lr · scale · project_back(u);   W ← W − lr·wd·W;   W ← SR-quantise(W)

One low-rank moment (half of low-rank AdamW's state), no bias correction (Lion has none). Everything else — refresh,
projection, VLoRP reshapes, the gate, keyed stochastic rounding, the back-projection of rows, and every placement
(local, replicated, row-sharded) — is :class:`~.lowrank_adamw.LowRankAdamW`'s: the update is element-wise, so any
rows of R normalise on their own, and the wire carries ``[u]`` like AdamW's ``[N]``. ``betas`` are Lion's
``(β1, β2)``; Lion wants a learning rate 3–10× smaller than AdamW's (its update has unit magnitude per element).
"""

from __future__ import annotations

import torch

from ..projection.projector import apply_rotation, rotation
from .lowrank_adamw import LowRankAdamW, MatrixState


class LowRankLion(LowRankAdamW):
    """The per-matrix low-rank Lion rule (module docstring)."""

    def init_state(self, *args, **kwargs) -> MatrixState:
        st = super().init_state(*args, **kwargs)
        st.exp_avg_sq = None  # one moment
        st.rule_name = "lion"
        return st

    def normalise(self, st: MatrixState, lowrank_grad: torch.Tensor, lr: float,
                  sums: tuple | None = None) -> tuple[torch.Tensor, float]:
        """``u = sign(β1·m + (1−β1)·R)`` for any rows of R whose moment ``st`` holds; advances ``st.step``."""
        b1, b2 = self.config.betas
        dt = torch.float64 if lowrank_grad.dtype == torch.float64 else torch.float32
        r = lowrank_grad.to(dt)
        m = st.exp_avg.to_float(dt)
        update = torch.sign(m * b1 + r * (1.0 - b1))
        st.exp_avg.from_float(m.mul_(b2).add_(r, alpha=1.0 - b2))
        st.step += 1
        return update, lr

    def _rotate_moments(self, st: MatrixState, old: torch.Tensor, new: torch.Tensor) -> None:
        """The one moment carried into the new basis (in the moment's own precision)."""
        dt = torch.float32 if st.exp_avg.quantized else st.exp_avg.data.dtype
        t = rotation(old.to(dt), new.to(dt), st.side)
        st.exp_avg.from_float(apply_rotation(st.exp_avg.to_float(dt), t, st.side))


__all__ = ["LowRankLion"]
