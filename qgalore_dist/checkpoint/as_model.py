"""One of our training checkpoints used as a model directory (``--model runs/x/step_000200``): fine-tune from your
own run without exporting first.

The checkpoint's model (``model.safetensors``, or an fsdp run's row pieces of it) holds INT8 codes + scales of the
projected matrices and the dense tensors; ``trainer.json`` the model config and which modules are INT8. It is read
through the same streaming path as a Hugging Face directory (:func:`~qgalore_dist.nn.materialize.materialize` with a
file-backed source): a module the new run also trains in INT8 takes the stored codes and scales as they are (no
re-quantisation); one the new run keeps in float (another ``--optimizer`` or ``--target-modules``) gets the
dequantised weight; a float weight the new run targets is quantised to nearest, as from a Hugging Face directory.
Optimizer state, step and data position are *not* taken — that is ``--resume``.

Readable: the checkpoints of the local, ddp and fsdp engines (one ``model.safetensors``, or every fsdp rank's row
pieces of it: :mod:`.pieces`). DeepSpeed checkpoints (``global_stepN``) are refused with the command that turns
them into a model directory (``--export``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import ModelSpecError
from ..models.build import config_from_dict
from ..models.pretrained import SafetensorsCheckpoint, SafetensorsSource, _expected_tensors, _tied_aliases
from ..nn.layout import prepare_int8_layout
from ..nn.materialize import ParamSource
from ..quant.int8 import dequantize_rows
from .pieces import PieceReader
from .save_load import MODEL_SHARDS_KEY, TOKENIZER_DIR, TRAINER_FILE, CheckpointError, model_files, verify_checkpoint

__all__ = ["Int8CheckpointTensors", "checkpoint_model_config", "checkpoint_model_record", "checkpoint_source",
           "checkpoint_tokenizer_dir", "is_checkpoint"]


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint directory of ours (any engine): it holds ``trainer.json``."""
    return (Path(path).expanduser() / TRAINER_FILE).is_file()


def checkpoint_model_record(root: str | Path) -> dict:
    """The verified ``trainer.json`` of a checkpoint to use as a model (every file's hash checked once);
    :class:`ModelSpecError` for a damaged checkpoint or a layout that cannot be read as a model."""
    root = Path(root).expanduser()
    try:
        return verify_checkpoint(root)
    except CheckpointError as exc:
        if (root / "qgalore_rank0.safetensors").is_file() or root.name.startswith("global_step"):
            raise ModelSpecError(f"--model {root}: a checkpoint of --engine deepspeed cannot be read as a model "
                                 "yet; export it first (--export) and pass the export") from exc
        raise ModelSpecError(f"--model {root}: {exc}") from exc


def checkpoint_model_config(root: str | Path, record: Mapping | None = None) -> PretrainedConfig:
    """The model config a checkpoint was trained with (from its verified ``trainer.json``; ``record`` when the
    caller already has it)."""
    root = Path(root).expanduser()
    record = checkpoint_model_record(root) if record is None else record
    try:
        data = dict(record["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelSpecError(f"--model {root}: trainer.json lacks a usable model config ({exc})") from exc
    # the checks a config file gets (transformers' strict validation errors become one line naming the file)
    return config_from_dict(str(root), root / TRAINER_FILE, data)


def checkpoint_tokenizer_dir(root: str | Path) -> Path | None:
    p = Path(root).expanduser() / TOKENIZER_DIR
    return p if p.is_dir() else None


class Int8CheckpointTensors(SafetensorsCheckpoint):
    """The tensors of a checkpoint's ``model.safetensors`` under the float model's names: an INT8 module's
    ``<name>.weight`` [m, n] is its codes × scales (rows on request), its codes and scales are also readable as
    they are (:meth:`int8`)."""

    def __init__(self, root: str | Path, quantized: Mapping[str, int], record: Mapping | None = None):
        self.quantized = {f"{n}.weight": int(g) for n, g in quantized.items()}
        self._pieces = None
        if record is None or record.get(MODEL_SHARDS_KEY) is None:
            super().__init__(root)
            return
        # an fsdp checkpoint: every rank's rows of each tensor (:mod:`.pieces`), read through the same interface
        self._pieces = PieceReader(Path(root).expanduser(), files=model_files(record))
        self.directory = Path(root).expanduser()
        self.files, self.index, self._absent = [], None, {}
        self._where = {k: self.directory / model_files(record)[0][0] for k in self._pieces.keys()}
        self._shape = {k: self._pieces.shape(k) for k in self._pieces.keys()}
        self._renamed, self._fused = self._legacy_names()

    def _slice(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        if self._pieces is None:
            return super()._slice(name, index)
        if index is None:
            return self._pieces.full(name)
        lo, hi, _ = index[0].indices(self._shape[name][0])
        return self._pieces.rows(name, lo, hi - lo)[(slice(None), *index[1:])]

    def __contains__(self, name: str) -> bool:
        return name in self.quantized or super().__contains__(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return super().shape(f"{name}_codes" if name in self.quantized else name)

    def int8(self, name: str, rows: tuple[int, int] | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [k, n] int8 and scales [k, ceil(n / g)] fp32 of ``name``'s rows ``[r0, r1)`` (all without rows)."""
        return (super().read(f"{name}_codes", rows=rows, device=device),
                super().read(f"{name}_scales", rows=rows, device=device))

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
        if name not in self.quantized:
            return super().read(name, rows=rows, dtype=dtype, device=device)
        codes, scales = self.int8(name, rows, device)
        return dequantize_rows(codes, scales, self.quantized[name], dtype or torch.float32)


class _Int8CheckpointSource(SafetensorsSource):
    """:class:`SafetensorsSource` over :class:`Int8CheckpointTensors`, handing stored INT8 rows over as they are
    when the group size is the run's."""

    checkpoint: Int8CheckpointTensors

    def int8_rows(self, qname: str, rows: tuple[int, int], group_size: int, device):
        if self.checkpoint.quantized.get(qname) != group_size:
            return None  # stored in float, or with other groups: quantised to nearest from the float rows
        return self.checkpoint.int8(qname, rows, device)


def checkpoint_source(root: str | Path, record: Mapping, model: nn.Module) -> ParamSource:
    """The source that fills ``model`` (built on the meta device from the checkpoint's config, before any INT8
    skeleton) from checkpoint ``root`` (``record``: its verified trainer.json), every tensor checked first."""
    root = Path(root).expanduser()
    saved_targets = (record.get("args") or {}).get("target_modules")
    if saved_targets:  # the checkpoint stores GPT-2 Conv1D / MoE experts in the layout its run trained them in
        prepare_int8_layout(model, tuple(t.strip() for t in str(saved_targets).split(",") if t.strip()))
    tensors = Int8CheckpointTensors(root, record.get("quantized_modules") or {}, record)
    aliases = _tied_aliases(model)
    try:
        tensors.check(_expected_tensors(model, aliases))
    except ModelSpecError as exc:
        raise ModelSpecError(f"--model {root}: {exc}") from exc
    return _Int8CheckpointSource(tensors, aliases)
