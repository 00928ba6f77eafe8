"""Checkpoints: atomic, self-verifying save / load of training state, and export to plain transformers models."""

from .export import dequantized_state_dict, export_checkpoint, export_model, export_state, quantized_modules
from .save_load import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "dequantized_state_dict",
    "export_checkpoint",
    "export_model",
    "export_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "quantized_modules",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]
