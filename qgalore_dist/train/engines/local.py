"""The single-device engine: one process, one device, no communication (``--engine local``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...checkpoint.save_load import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    verify_checkpoint,
)
from .base import Engine, ResumePoint

__all__ = ["LocalEngine"]


class LocalEngine(Engine):
    """One process, one device: prepares model + optimizer and runs backward / step. No communication.

    A distributed engine keeps these methods and adds what moves between ranks (gradient reduction, owner
    broadcasts, sharded state); the loop only ever talks to the engine.
    """

    name = "local"
    world_size = 1
    rank = 0

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_args(cls, args) -> "LocalEngine":
        from ..loop import resolve_device

        return cls(resolve_device(args.device))

    def prepare(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.model = model.to(self.device)
        self.optimizer = make_opt(self.model)
        return self.model, self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Optimizer step at the accumulation boundary; returns the pre-clip global gradient norm (or None)."""
        self.optimizer.step()
        return self.optimizer.last_step.grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- state ---------------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], where: str) -> None:
        """Load a checkpoint's model and optimizer state; a mismatch raises :class:`CheckpointError`."""
        load_model_state(self.model, model_state, f"checkpoint {where}")
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {where}: optimizer state does not fit this run ({exc})") from exc

    # --- checkpoint files (qgalore_dist.checkpoint: one directory step_NNNNNN/, safetensors + JSON) -----------
    def list_checkpoints(self, save_dir: str | Path) -> list[tuple[int, Path]]:
        return list_checkpoints(save_dir)

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        return verify_checkpoint(path)

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                        tokenizer: Any) -> Path:
        return save_checkpoint(save_dir, step, model_state=self.model_state(),
                               optimizer_state=self.optimizer_state(), trainer_state=trainer_state,
                               tokenizer=tokenizer)

    def load_checkpoint(self, path: Path) -> ResumePoint:
        ckpt = load_checkpoint(path)
        self.load_state(ckpt.model_state, ckpt.optimizer_state, str(path))
        return ResumePoint(ckpt.step, ckpt.trainer)
