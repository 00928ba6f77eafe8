"""Export to a plain ``transformers`` directory: every INT8 weight dequantised into an ordinary ``nn.Linear`` weight.

The result loads with ``AutoModelForCausalLM.from_pretrained`` (no qgalore_dist needed) and computes the same
logits as the INT8 model up to the export dtype's rounding (fp32: ~1e-5; bf16, the default: bf16's relative step
2⁻⁸ on every weight, a few 1e-2 on logits of a small model). Works from a live model or from a checkpoint::

    python -m qgalore_dist.checkpoint.export runs/demo/step_000200 exported/ [--dtype float32]

**Streaming.** Tensors are dequantised and written one at a time into safetensors shards of at most
``max_shard_bytes`` (2 GB) — ``model.safetensors`` when one shard suffices, else ``model-00001-of-0000K.safetensors``
plus ``model.safetensors.index.json``, the layout ``save_pretrained`` writes — so the export costs the resident
model plus one shard, never a second full-precision model.

**Nothing lost.** An export never deletes what it did not write. It records what it wrote in
``qgalore_export.json``; a later export into the same directory replaces exactly those files. A non-empty target
that is not an earlier export is refused — before training, for ``--export`` — and so is any checkpoint directory
(one holding ``trainer.json``, inside one, the run's ``--save-dir`` or a directory holding it). Files get the
normal mode (``0666 & ~umask``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import UsageError
from ..nn.int8_linear import QGaLoreLinear
from ..nn.layout import int8_layout, to_transformers_layout
from ..quant.int8 import dequantize_rows
from .pieces import PieceReader
from .save_load import MODEL_FILE, TRAINER_FILE, CheckpointError, model_files, verify_checkpoint

__all__ = ["DequantizedTensors", "EXPORT_MARKER", "MAX_SHARD_BYTES", "check_export_target", "dequantized_state_dict",
           "export_checkpoint", "export_model", "export_state", "export_tensors", "iter_dequantized", "main",
           "quantized_modules"]

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}
EXPORT_MARKER = "qgalore_export.json"
EXPORT_FORMAT = "qgalore_dist.export/1"
MAX_SHARD_BYTES = 2_000_000_000  # transformers' own default shard size ("2GB"); also under 32-bit tools' limits
INDEX_FILE = "model.safetensors.index.json"


def quantized_modules(model: nn.Module) -> dict[str, int]:
    """``{module name: weight group size}`` of every :class:`QGaLoreLinear` — what a checkpoint must record to be
    dequantised without building the INT8 model."""
    return {n: m.group_size for n, m in model.named_modules() if isinstance(m, QGaLoreLinear)}


class DequantizedTensors(Iterator[tuple[str, torch.Tensor]]):
    """What :func:`iter_dequantized` returns: its ``(name, tensor)`` pairs, plus ``int8_modules``, the names of the
    modules whose weights it dequantised — matrices in the INT8 model's layout ([out, in], one per expert), which
    :func:`export_tensors` puts back into the transformers layout."""

    def __init__(self, pairs: Iterator[tuple[str, torch.Tensor]], int8_modules: Iterable[str]):
        self._pairs = pairs
        self.int8_modules = frozenset(int8_modules)

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._pairs)


def iter_dequantized(state: Mapping[str, torch.Tensor], quantized: Mapping[str, int],
                     dtype: torch.dtype = torch.float32) -> DequantizedTensors:
    """``state``'s tensors in order, each ``<name>.weight_codes`` / ``<name>.weight_scales`` pair of a quantised
    module yielded once as the float ``<name>.weight`` [m, n] (codes × scales) at the codes' position; floating
    tensors cast to ``dtype``, others kept. Lazy: one dequantised matrix exists at a time. Names and layout are the
    INT8 model's (a GPT-2 ``Conv1D`` as [out, in], MoE experts one matrix each): ``int8_modules`` of the result
    lists the quantised modules for :func:`export_tensors`."""

    def pairs() -> Iterator[tuple[str, torch.Tensor]]:
        for name in quantized:
            if f"{name}.weight_codes" not in state or f"{name}.weight_scales" not in state:
                raise CheckpointError(f"state has no INT8 weight for quantised module {name!r}")
        for k, v in state.items():
            if k.endswith(".weight_scales"):
                if k[:-len(".weight_scales")] not in quantized:
                    raise CheckpointError(f"state holds INT8 tensor {k!r} of a module not listed as quantised")
                continue
            if k.endswith(".weight_codes"):
                name = k[:-len(".weight_codes")]
                if name not in quantized:
                    raise CheckpointError(f"state holds INT8 tensor {k!r} of a module not listed as quantised")
                yield f"{name}.weight", dequantize_rows(v, state[f"{name}.weight_scales"], quantized[name], dtype)
            else:
                yield k, (v.to(dtype) if v.is_floating_point() else v)

    return DequantizedTensors(pairs(), quantized)


def dequantized_state_dict(state: Mapping[str, torch.Tensor], quantized: Mapping[str, int],
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """:func:`iter_dequantized`, all at once."""
    return dict(iter_dequantized(state, quantized, dtype))


# ------------------------------------------------------------------------------------------------ the target
def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it."""
    return a == b or b in a.parents


def _earlier_export(out_dir: Path) -> dict | None:
    """The marker of an earlier export in ``out_dir`` (None when there is none, or it is not ours)."""
    try:
        rec = json.loads((out_dir / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(rec, dict) and rec.get("format") == EXPORT_FORMAT and isinstance(rec.get("files"), list):
        return rec
    return None


def check_export_target(out_dir: str | os.PathLike[str], *, save_dir: str | os.PathLike[str] | None = None,
                        flag: str = "--export") -> None:
    """Raise :class:`UsageError` unless ``out_dir`` is a safe export target: absent, an empty directory or an
    earlier export; never a checkpoint, inside one, ``save_dir`` or a directory around it."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out_dir}: exists and is not a directory")
    if save_dir is not None:
        sd = Path(save_dir).expanduser().resolve()
        if _inside(out, sd) or _inside(sd, out):
            raise UsageError(f"{flag} {out_dir}: the checkpoint directory --save-dir {save_dir} "
                             f"{'is or contains' if _inside(out, sd) else 'lies inside'} it; export elsewhere")
    for p in (out, *out.parents):
        if (p / TRAINER_FILE).is_file():
            raise UsageError(f"{flag} {out_dir}: {p} is a checkpoint; export elsewhere")
    if out.is_dir() and _earlier_export(out) is None:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise UsageError(f"{flag} {out_dir}: the directory is not empty and is not an earlier export (it holds "
                             f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); an export never "
                             "deletes what it did not write: choose an empty or new directory")


# ------------------------------------------------------------------------------------------------- the writer
def _pid_alive(tag: str) -> bool:
    """Whether the process whose pid names a temporary directory still runs (this host)."""
    try:
        os.kill(int(tag), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _mode_bits(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _reference(config: PretrainedConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The state a ``transformers`` model of ``config`` expects (name → shape, from a meta-device build: no
    storage) and the parameters that alias another when the config ties them (``lm_head.weight``), which
    ``save_pretrained`` leaves out and ``from_pretrained`` ties back."""
    from ..models import build_model

    model = build_model(copy.deepcopy(config), meta=True)  # from_config writes its dtype into the config
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = getattr(model, "_tied_weights_keys", None) or () if getattr(text, "tie_word_embeddings", False) else ()
    return shapes, set(keys.keys() if isinstance(keys, dict) else keys)


def _checked(tensors: Iterable[tuple[str, torch.Tensor]], shapes: Mapping[str, tuple[int, ...]], tied: set[str],
             what: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors``, each checked against the model's names and shapes as it passes; every name but the tied ones
    seen at the end."""
    seen = set()
    for name, t in tensors:
        if name not in shapes:
            raise CheckpointError(f"{what} does not match this model: unexpected tensor {name!r}")
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{what} does not match this model: {name} has shape {tuple(t.shape)}, the "
                                  f"model {shapes[name]}")
        seen.add(name)
        yield name, t
    missing = sorted(set(shapes) - seen - tied)
    if missing:
        raise CheckpointError(f"{what} does not match this model: missing {missing[:3]}")


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], tmp: Path, max_shard_bytes: int,
                  skip: set[str]) -> list[str]:
    """Write ``tensors`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its
    own); names them like ``save_pretrained`` and writes the index when there is more than one. Returns the file
    names written."""
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    cur: dict[str, torch.Tensor] = {}
    cur_bytes = total = 0

    def flush() -> None:
        nonlocal cur, cur_bytes
        if cur:
            save_file(cur, str(tmp / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append(list(cur))
            cur, cur_bytes = {}, 0

    for name, t in tensors:
        if name in skip:
            continue
        if name in weight_map or name in cur:
            raise CheckpointError(f"tensor {name!r} occurs twice in the exported state")
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            flush()
        cur[name] = t
        weight_map[name] = len(shards)
        cur_bytes += nbytes
        total += nbytes
    flush()
    if len(shards) <= 1:
        names = [MODEL_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, final in enumerate(names):
        if (tmp / f"shard-{i:05d}.safetensors").exists():
            os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
    written = list(names) if shards else []
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: names[i] for n, i in weight_map.items()}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        written.append(INDEX_FILE)
    return written


def _publish_into(tmp: Path, out_dir: Path, source: str, dtype: torch.dtype) -> None:
    """Move the files of ``tmp`` into ``out_dir``. The marker first lists old ∪ new files (so a crash midway
    leaves every file of ours claimed), then the new files replace the old, the old ones not rewritten go, and
    the marker is rewritten with the new list."""
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, _mode_bits(True))
    new = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    old = (_earlier_export(out_dir) or {}).get("files", [])

    def marker(files: list[str]) -> None:
        rec = {"format": EXPORT_FORMAT, "source": source, "dtype": str(dtype).removeprefix("torch."),
               "files": sorted(files)}
        part = out_dir / f".{EXPORT_MARKER}.part"
        part.write_text(json.dumps(rec, indent=1), encoding="utf-8")
        os.chmod(part, _mode_bits(False))
        os.replace(part, out_dir / EXPORT_MARKER)

    marker(sorted(set(old) | set(new)))
    for rel in new:
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(dst.parent, _mode_bits(True))
        os.chmod(tmp / rel, _mode_bits(False))
        os.replace(tmp / rel, dst)
    for rel in set(old) - set(new):
        p = out_dir / rel
        if _inside(p.resolve(), out_dir.resolve()) and p.is_file():
            p.unlink()
    marker(new)


def export_tensors(tensors: Iterable[tuple[str, torch.Tensor]], config: PretrainedConfig,
                   out_dir: str | os.PathLike[str], tokenizer: Any = None, *, dtype: torch.dtype = torch.bfloat16,
                   max_shard_bytes: int = MAX_SHARD_BYTES, source: str = "") -> Path:
    """Write a ``transformers`` directory from ``(name, float tensor)`` pairs in the model's naming (consumed
    lazily, written shard by shard), ``config`` and the tokenizer; the pairs should already be in ``dtype``.
    Pairs from :func:`iter_dequantized` are put back into the transformers layout first
    (:func:`~qgalore_dist.nn.layout.to_transformers_layout`: an INT8 ``Conv1D`` weight transposed to [in, out],
    the INT8 expert matrices of a 3-D parameter stacked into [E, out, in]), so the export loads in plain
    transformers. ``out_dir`` must pass :func:`check_export_target` (re-checked here)."""
    out_dir = Path(out_dir).expanduser()
    check_export_target(out_dir)
    config = copy.deepcopy(config)
    config.use_cache = True  # training turns the KV cache off; an exported model is for inference
    config.dtype = dtype  # what from_pretrained(dtype="auto") loads in
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.export-tmp-*"):  # left by an interrupted export
        tag = stale.name.rpartition("-")[2]
        if tag == str(os.getpid()) or not _pid_alive(tag):  # not one another live export is writing
            shutil.rmtree(stale, ignore_errors=True)
    shapes, tied = _reference(config)
    int8 = getattr(tensors, "int8_modules", frozenset())
    if int8:  # INT8 matrices in the INT8 model's layout: where each lives in transformers' (a meta build)
        from ..models import build_model

        layout = int8_layout(build_model(copy.deepcopy(config), meta=True))
        tensors = to_transformers_layout(tensors, {k: s for k, s in layout.items() if k.rpartition(".")[0] in int8})
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_shards(_checked(tensors, shapes, tied, f"the exported state (for a {config.model_type} model of this "
                                                "config)"), tmp, max_shard_bytes, tied)
        config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _publish_into(tmp, out_dir, source, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def export_state(state: Mapping[str, torch.Tensor], config: PretrainedConfig, quantized: Mapping[str, int],
                 out_dir: str | os.PathLike[str], tokenizer: Any = None, dtype: torch.dtype = torch.bfloat16,
                 *, max_shard_bytes: int = MAX_SHARD_BYTES, source: str = "") -> Path:
    """Export a model state that may hold INT8 weights (dequantised one matrix at a time)."""
    return export_tensors(iter_dequantized(state, quantized, dtype), config, out_dir, tokenizer, dtype=dtype,
                          max_shard_bytes=max_shard_bytes, source=source)


_PEFT_PREFIX = "base_model.model."


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state under the plain transformers names. A peft LoRA model (``--method lora``) gives its base
    with every adapter merged in — ``W + scaling · B @ A`` by peft's own ``get_delta_weight`` — computed beside the
    model, which keeps its adapters (training may go on)."""
    state = model.state_dict()
    if not any(".lora_" in k for k in state):
        return state
    deltas = {name: m.get_delta_weight(m.active_adapters[0]) for name, m in model.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith(".base_layer") and leaf == "weight" and module[:-len(".base_layer")] in deltas:
            delta = deltas[module[:-len(".base_layer")]]
            value = value.to(torch.float32) + delta.to(torch.float32)  # the export casts to --export-dtype
        out[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return out


def merge_lora_stream(pairs: Iterable[tuple[str, Any]], model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` pairs of a peft LoRA ``model``'s parameters, streamed in ``named_parameters`` order (an
    engine gathering one tensor at a time; ``None`` values on ranks that receive nothing pass through), renamed to
    the plain transformers names with every adapter merged in — ``W + scaling · B @ A``, the same operations as
    peft's ``get_delta_weight`` in :func:`_plain_state`, so sharded engines export what one process would. A base
    weight is held until its adapter's two matrices have arrived (one matrix and its small adapter at a time).
    Pairs of a model without adapters pass through unchanged."""
    layers = {name.removeprefix("module."): m for name, m in model.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    if not layers:
        yield from pairs
        return
    # decided from the module types, which every rank has (a refusal on rank 0 alone would leave the others in
    # the stream's gathers)
    int8 = [n for n, m in layers.items() if not isinstance(getattr(m.base_layer, "weight", None), torch.Tensor)
            or not m.base_layer.weight.is_floating_point()]
    if int8:
        raise ValueError(f"{int8[0]}: a LoRA adapter on an INT8 base weight cannot be merged for export")
    pending: dict[str, dict[str, Any]] = {}

    def plain(key: str) -> str:
        return key.removeprefix("module.").removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")

    for key, value in pairs:
        k = key.removeprefix("module.")
        module, _, leaf = k.rpartition(".")
        if module.endswith(".base_layer") and leaf == "weight" and module[:-len(".base_layer")] in layers:
            owner, slot = module[:-len(".base_layer")], "base"
        elif ".lora_A." in k or ".lora_B." in k:
            owner, slot = k.split(".lora_A." if ".lora_A." in k else ".lora_B.")[0], k.split(".lora_")[1][0]
            if owner not in layers or len(layers[owner].active_adapters) != 1 or \
                    not k.endswith(f".{layers[owner].active_adapters[0]}.weight"):
                raise ValueError(f"{key}: only one active LoRA adapter per layer can be merged for export")
        elif ".lora_" in k:
            raise ValueError(f"{key}: this kind of adapter parameter cannot be merged for export")
        else:
            yield plain(key), value
            continue
        entry = pending.setdefault(owner, {})
        entry[slot] = value
        if len(entry) < 3:
            continue
        del pending[owner]
        base, a, b = entry["base"], entry["A"], entry["B"]
        if base is None:
            yield plain(f"{owner}.base_layer.weight"), None
            continue
        layer = layers[owner]
        dtype = b.dtype
        cast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)  # peft's CPU cast, and back
        if cast:
            a, b = a.float(), b.float()
        delta = b @ a
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        delta.mul_(layer.scaling[layer.active_adapters[0]])
        if cast:
            delta = delta.to(dtype)
        yield plain(f"{owner}.base_layer.weight"), base.to(torch.float32) + delta.to(torch.float32)
    if pending:
        raise ValueError(f"LoRA layers without all of base weight, lora_A and lora_B: {sorted(pending)[:3]}")


def export_model(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None,
                 dtype: torch.dtype = torch.bfloat16, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export a live (possibly INT8, possibly LoRA-adapted) ``transformers`` model; the model itself is left
    unchanged."""
    return export_state(_plain_state(model), model.config, quantized_modules(model), out_dir, tokenizer, dtype,
                        max_shard_bytes=max_shard_bytes, source="live model")


class _MappedState(Mapping[str, torch.Tensor]):
    """A checkpoint's model (:class:`.pieces.PieceReader`: one ``model.safetensors`` or every rank's pieces) as a
    read-only mapping, each tensor read (joined from the memory maps) when asked for."""

    def __init__(self, reader):
        self._r = reader
        self._keys = reader.keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._r.full(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def export_checkpoint(ckpt_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      dtype: torch.dtype = torch.bfloat16, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Export a training checkpoint directory (verified first) with the tokenizer it carries; its model file is
    read tensor by tensor."""
    root = Path(ckpt_dir)
    record = verify_checkpoint(root)
    try:
        cfg_dict = dict(record["model_config"])
        quantized = dict(record["quantized_modules"])
        config = CONFIG_MAPPING[cfg_dict["model_type"]].from_dict(cfg_dict)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {root}: trainer.json lacks a usable model config ({exc})") from exc
    tokenizer = None
    if (root / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    with PieceReader(root, files=model_files(record)) as reader:
        return export_state(_MappedState(reader), config, quantized, out_dir, tokenizer, dtype,
                            max_shard_bytes=max_shard_bytes, source=str(root))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qgalore_dist.checkpoint.export",
                                     description="Export a qgalore_dist checkpoint as a plain dequantised "
                                                 "transformers model directory (+ tokenizer).")
    parser.add_argument("checkpoint", help="checkpoint directory (e.g. runs/x/step_000200)")
    parser.add_argument("out_dir", help="output directory: new, empty, or an earlier export (whose files it "
                                        "replaces; nothing else is ever deleted)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16",
                        help="dtype of the exported weights (default bfloat16)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9,
                        help="largest safetensors shard, in GB (default 2)")
    args = parser.parse_args(argv)
    try:
        if not args.max_shard_gb > 0:
            raise UsageError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
        out = export_checkpoint(args.checkpoint, args.out_dir, EXPORT_DTYPES[args.dtype],
                                max_shard_bytes=int(args.max_shard_gb * 1e9))
    except (CheckpointError, UsageError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()
