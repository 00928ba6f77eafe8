"""Learning-rate schedule: linear warm-up, then cosine / linear decay to ``min_lr_ratio`` (or constant).

The schedule is a pure function of the optimizer step, applied through ``torch.optim.lr_scheduler.LambdaLR`` on
the optimizer's ``param_groups`` — so it works unchanged for every optimizer here (Q-GaLore, torch AdamW, the
8-bit dense AdamW) and resumes exactly from the scheduler's ``state_dict``.
"""

from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> float:
    """Factor applied to the base learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step already moves the weights,
    unlike a ramp starting at 0). Then, over the remaining ``max_steps - warmup_steps`` steps, ``cosine`` and
    ``linear`` decay from 1 to ``min_lr_ratio``; ``constant`` stays at 1. Steps past ``max_steps`` keep the final
    value (a resumed run with a larger ``max_steps`` does not jump back up).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r} is invalid: allowed: {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                    schedule: str = "cosine", min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over every param group of ``optimizer`` with :func:`lr_multiplier`.

    A ``functools.partial`` (not a lambda) so the scheduler stays picklable; its ``state_dict`` holds only plain
    numbers (``last_epoch``, ``base_lrs`` ...), which the checkpoint stores as JSON.
    """
    fn = functools.partial(lr_multiplier, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule,
                           min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


__all__ = ["SCHEDULES", "build_scheduler", "lr_multiplier"]
