"""The interface every training engine implements (see :class:`Engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["Engine", "ResumePoint"]


class ResumePoint:
    """What a checkpoint hands back to the loop: the step it was taken after and the trainer state dict
    (scheduler, data position, RNG, tokens seen — see ``loop._trainer_state``)."""

    def __init__(self, step: int, trainer: dict[str, Any]) -> None:
        self.step = step
        self.trainer = trainer


class Engine:
    """One way of running the training step (local, ddp, fsdp, deepspeed).

    Attributes: ``name`` (the ``--engine`` value), ``rank``, ``world_size``, ``device``. Every method is called by
    every rank at the same point of the loop unless its docstring says otherwise.
    """

    name = "?"
    rank = 0
    world_size = 1
    device: torch.device
    #: ``prepare`` takes a :class:`~qgalore_dist.nn.materialize.PendingModel` (meta device) and materialises only
    #: this rank's rows; otherwise it gets the whole materialised model
    sharded_start = False

    @classmethod
    def from_args(cls, args) -> "Engine":
        raise NotImplementedError

    @property
    def is_main(self) -> bool:
        """Whether this process writes metrics, logs and shared checkpoint files."""
        return self.rank == 0

    # --- model and step --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer]
                ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place/wrap ``model`` and build its optimizer; returns what the loop calls forward / schedules on. An
        engine with ``sharded_start`` may get a ``PendingModel`` instead (see there)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> float | None:
        """Optimizer step at the accumulation boundary; returns the pre-clip global gradient norm (or None)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    #: whether :meth:`skip_step` can drop a step whose loss was not finite (the loop stops the run otherwise)
    can_skip_steps = True

    def skip_step(self, loss: torch.Tensor | None = None) -> None:
        """Drop the step in progress — its loss (``loss``: this rank's, of the micro-batch where the check failed)
        was not finite on some rank, so that and the remaining micro-batches were not run backward — with no
        update applied: the gradients accumulated so far are discarded."""
        self.zero_grad()

    def mean_over_ranks(self, value: float) -> float:
        """Average a scalar (loss, evaluation loss) over ranks; every rank gets the result."""
        return value

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sum of a few scalars over ranks (fp64); every rank gets the result."""
        return list(values)

    def step_metrics(self) -> dict[str, Any]:
        """Extra fields for this step's metrics line (e.g. ``comm_bytes``); called once after each ``step``."""
        return {}

    def memory_bytes(self) -> dict[str, int] | None:
        """This rank's resident weights + optimizer-state bytes by kind, when the optimizer accounts for them."""
        fn = getattr(getattr(self, "optimizer", None), "memory_bytes", None)
        return fn() if fn is not None else None

    def _agree(self, error: str | None, exc_type: type[Exception], what: str) -> None:
        """Collective: raise ``exc_type`` on every rank when ``error`` is set on any (one process: when set)."""
        if error is not None:
            raise exc_type(error)

    # --- checkpoints -----------------------------------------------------------------------------------------
    def list_checkpoints(self, save_dir: str | Path) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints under ``save_dir``, oldest first."""
        raise NotImplementedError

    def verify_checkpoint(self, path: Path) -> dict[str, Any]:
        """Check a checkpoint before anything is built (hashes, shape of the run); returns its trainer record
        (at least ``optimizer_kind`` and ``tokenizer_fingerprint``). Raises ``CheckpointError``."""
        raise NotImplementedError

    def save_checkpoint(self, save_dir: str | Path, step: int, trainer_state: dict[str, Any],
                        tokenizer: Any) -> Path:
        """Write the checkpoint of ``step`` atomically; returns its directory (the same on every rank)."""
        raise NotImplementedError

    def load_checkpoint(self, path: Path) -> ResumePoint:
        """Restore model and optimizer state from ``path``; returns the step and trainer state."""
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir: str | Path, tokenizer: Any, dtype: torch.dtype) -> Path | None:
        """Write a plain dequantised transformers model in ``dtype`` (main rank; others return None)."""
        from ...checkpoint.export import export_model

        return export_model(model, out_dir, tokenizer, dtype) if self.is_main else None

    def close(self) -> None:
        """Leave the process group (if any); called once when training ends or fails."""
