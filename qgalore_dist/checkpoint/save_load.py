"""Atomic, self-verifying training checkpoints.

Layout of ``<save-dir>/step_000010/``::

    model.safetensors      model.state_dict(): INT8 codes + scales of projected weights, dense weights
    optimizer.safetensors  every tensor of optimizer.state_dict(), under dotted keys
    optimizer.json         the rest of optimizer.state_dict() (numbers, strings, nesting), tensors as references
    tokenizer/             the tokenizer (so a checkpoint exports on its own)
    trainer.json           format + version, step, RNG states, data position, scheduler, run arguments,
                           model config, and the manifest: sha256 + size of every file, name/dtype/shape of
                           every tensor

A data-parallel (``ddp``) checkpoint keeps the layout with the optimizer sharded by rank: instead of
``optimizer.safetensors`` / ``optimizer.json`` it holds ``optimizer_rank00000.safetensors`` / ``.json`` ... one pair
per rank (each rank's owned matrices, keyed by parameter name; ``trainer.json`` records ``optimizer_shards``), and
``trainer_rank00000.json`` ... (each rank's RNG state). :func:`load_checkpoint` merges the shards, so such a checkpoint
also resumes on one device or at another world size. The pieces (:func:`write_state`, :func:`finalize_checkpoint`,
:func:`publish_checkpoint`) are public so an engine whose ranks write into one temporary directory can reuse them.

A checkpoint is written to ``<dir>.tmp-<pid>`` and renamed into place only when complete, so a crash never
leaves a half-written checkpoint under a real name and never damages an existing one. ``trainer.json`` is
written last; loading checks every hash and tensor shape against it, so a truncated, edited or mixed-up
checkpoint fails with one clear :class:`CheckpointError` instead of a mid-training surprise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "finalize_checkpoint",
    "build_manifest",
    "file_sha256",
    "flatten_state",
    "latest_checkpoint",
    "manifest_files",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_state",
    "optimizer_shard_files",
    "publish_checkpoint",
    "read_optimizer_shards",
    "read_record",
    "read_state",
    "restore_rng_state",
    "save_checkpoint",
    "trainer_shard_file",
    "unflatten_state",
    "verify_checkpoint",
    "verify_files",
    "write_state",
]

CHECKPOINT_FORMAT = "qgalore_dist.checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_JSON_FILE = "optimizer.json"
TRAINER_FILE = "trainer.json"
TOKENIZER_DIR = "tokenizer"
SHARDS_KEY = "optimizer_shards"  # trainer.json: number of per-rank optimizer shards (absent: one optimizer file)
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``: ``step_000010``."""
    return f"step_{step:06d}"


def optimizer_shard_files(rank: int) -> tuple[str, str]:
    """(tensor file, JSON file) of rank ``rank``'s optimizer shard: ``optimizer_rank00001.safetensors`` / ``.json``."""
    return f"optimizer_rank{rank:05d}.safetensors", f"optimizer_rank{rank:05d}.json"


def trainer_shard_file(rank: int) -> str:
    """Rank ``rank``'s own trainer state (its RNG): ``trainer_rank00001.json``."""
    return f"trainer_rank{rank:05d}.json"


# ------------------------------------------------------------------------------------------ nested state codec
_TENSOR, _ITEMS, _TUPLE = "__tensor__", "__dict_items__", "__tuple__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts / lists / tuples of tensors and plain values) into a JSON-able tree and a flat
    ``{dotted key: tensor}`` dict for safetensors. Tensors become ``{"__tensor__": key}`` in the tree.

    Dicts whose keys are not all plain strings (``torch.optim`` uses int parameter ids) are stored as
    ``{"__dict_items__": [[key, value], ...]}`` so int keys come back as ints. Tensors are made contiguous
    (safetensors refuses strided views) and tensors sharing storage are copied (safetensors refuses aliases).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            if path in tensors:
                raise ValueError(f"state key {path!r} occurs twice (mixed int/str keys that print alike)")
            t = x.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            ptr = t.untyped_storage().data_ptr() if t.numel() else 0
            if ptr and ptr in seen_storage:
                t = t.clone()
            elif ptr:
                seen_storage.add(ptr)
            tensors[path] = t.contiguous()
            return {_TENSOR: path}
        if isinstance(x, Mapping):
            keys = list(x.keys())
            plain = all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in keys)
            if plain:
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            for k in keys:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"state key {k!r} at {path or '<root>'!r}: only str and int keys are storable")
            return {_ITEMS: [[k, enc(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"state value at {path or '<root>'!r} has unsupported type {type(x).__name__}")

    return enc(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            key = tree[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"optimizer state refers to tensor {key!r}, which the tensor file lacks")
            return tensors[key]
        if set(tree) == {_ITEMS}:
            return {k: unflatten_state(v, tensors) for k, v in tree[_ITEMS]}
        if set(tree) == {_TUPLE}:
            return tuple(unflatten_state(v, tensors) for v in tree[_TUPLE])
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


# ------------------------------------------------------------------------------------------------- RNG states
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict[str, Any]:
    """Every global random state training may consume: torch CPU, every CUDA device, Python's ``random``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state()),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only where both sides have devices)."""
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_unb64(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -------------------------------------------------------------------------------------------------- manifest
def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_index(path: Path) -> dict[str, dict[str, Any]]:
    """Names, dtypes and shapes from a safetensors header (no tensor data read)."""
    out = {}
    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():
            sl = fh.get_slice(name)
            out[name] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
    return out


def build_manifest(root: Path) -> dict[str, Any]:
    """``{"files": {relative path: {sha256, bytes[, tensors]}}}`` of every file under ``root`` but ``trainer.json``
    (safetensors files also list their tensors' names, dtypes and shapes)."""
    files = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel == TRAINER_FILE:
            continue
        entry: dict[str, Any] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        if p.suffix == ".safetensors":
            entry["tensors"] = _tensor_index(p)
        files[rel] = entry
    return {"files": files}


def _fsync_tree(root: Path) -> None:
    """Flush file contents and directory entries, so the rename that publishes the checkpoint is durable."""
    for p in [*sorted(q for q in root.rglob("*") if q.is_file()), *sorted(q for q in root.rglob("*") if q.is_dir()),
              root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems do not support fsync on directories
            pass
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------------------ save
def write_state(directory: Path, state: Mapping[str, Any], tensors_file: str, json_file: str | None = None) -> None:
    """Write a nested state: its tensors to ``tensors_file`` (safetensors, dotted keys) and, when ``json_file`` is
    given, the rest of the tree (tensors as references) to ``json_file``; without it the state must be a flat
    ``{name: tensor}`` dict (a model state)."""
    tree, tensors = flatten_state(dict(state))
    save_file(tensors, str(directory / tensors_file), metadata={"format": CHECKPOINT_FORMAT})
    del tensors
    if json_file is not None:
        (directory / json_file).write_text(json.dumps(tree), encoding="utf-8")


def finalize_checkpoint(tmp: Path, step: int, trainer_state: Mapping[str, Any]) -> None:
    """Write ``trainer.json`` (format tag, ``step``, ``trainer_state`` and the manifest of every file already in
    ``tmp``) last, then flush everything to disk."""
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step),
              **dict(trainer_state), "manifest": build_manifest(tmp)}
    (tmp / TRAINER_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    _fsync_tree(tmp)


def publish_checkpoint(tmp: Path, final: Path, tag: str | int | None = None) -> None:
    """Rename the complete checkpoint ``tmp`` to ``final``; an existing ``final`` is replaced only now."""
    tag = os.getpid() if tag is None else tag
    if final.exists():
        # Swap: the old checkpoint moves aside only once the new one is complete, and is deleted last
        # (directories cannot be exchanged atomically; only a crash between these two renames leaves the
        # step under `.old-<pid>` / `.tmp-<pid>` names, both complete).
        old = final.parent / f"{final.name}.old-{tag}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(save_dir: str | os.PathLike[str], step: int, *, model_state: Mapping[str, torch.Tensor],
                    optimizer_state: Mapping[str, Any], trainer_state: Mapping[str, Any],
                    tokenizer: Any = None) -> Path:
    """Write ``<save_dir>/step_<step>/`` atomically and return its path.

    ``trainer_state`` is stored in ``trainer.json`` together with the format tag, ``step`` and the manifest.
    An existing checkpoint of the same step is replaced only after the new one is complete.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    final = save_dir / checkpoint_name(step)
    tmp = save_dir / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_state(tmp, model_state, MODEL_FILE)
        write_state(tmp, optimizer_state, OPTIM_TENSORS_FILE, OPTIM_JSON_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        finalize_checkpoint(tmp, step, trainer_state)
        publish_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------------------------------ load
def list_checkpoints(save_dir: str | os.PathLike[str], pattern: re.Pattern[str] = _STEP_RE
                     ) -> list[tuple[int, Path]]:
    """``(step, path)`` of every published checkpoint in ``save_dir`` (a directory whose whole name matches
    ``pattern``, group 1 the step — default ``step_N`` — with a ``trainer.json``), ascending. Temporary
    ``.tmp-<pid>`` / ``.old-<tag>`` directories of interrupted saves are ignored."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    out = []
    for p in save_dir.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and (p / TRAINER_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(save_dir: str | os.PathLike[str]) -> Path | None:
    found = list_checkpoints(save_dir)
    return found[-1][1] if found else None


def read_record(root: Path, what: str = "checkpoint") -> dict[str, Any]:
    """The parsed ``trainer.json`` of checkpoint directory ``root``; :class:`CheckpointError` when the directory or
    the file is missing or unreadable (``what`` completes "incomplete or not a ...")."""
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} does not exist or is not a directory")
    tfile = root / TRAINER_FILE
    if not tfile.is_file():
        raise CheckpointError(f"checkpoint {root} has no {TRAINER_FILE} (incomplete or not a {what})")
    try:
        record = json.loads(tfile.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} is unreadable ({exc})") from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} is not a checkpoint record")
    return record


def manifest_files(root: Path, record: Mapping[str, Any], required: Callable[[Mapping], bool] = bool
                   ) -> dict[str, Any]:
    """The manifest's ``files`` map of ``record``; :class:`CheckpointError` unless it is a dict for which
    ``required(files)`` holds (the engine's own must-have files)."""
    files = (record.get("manifest") or {}).get("files")
    if not isinstance(files, dict) or not required(files):
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} has no valid manifest")
    return files


def verify_files(root: Path, files: Mapping[str, Any]) -> None:
    """Every manifest entry's size, sha256 and (safetensors) tensor index against the files under ``root``."""
    for rel, entry in files.items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {root} is corrupted: {rel} is missing")
        if p.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint {root} is corrupted: {rel} has {p.stat().st_size} bytes, the "
                                  f"manifest says {entry.get('bytes')}")
        if file_sha256(p) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {root} is corrupted: {rel} does not match its sha256")
        if "tensors" in entry:
            try:
                index = _tensor_index(p)
            except Exception as exc:  # safetensors raises its own error types on malformed headers
                raise CheckpointError(f"checkpoint {root} is corrupted: {rel} is not readable ({exc})") from exc
            if index != entry["tensors"]:
                raise CheckpointError(f"checkpoint {root} is corrupted: tensors in {rel} differ from the manifest")


def verify_checkpoint(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check format, version, every file's size and sha256 and every tensor's name/dtype/shape against the
    manifest; return the parsed ``trainer.json``. Raises :class:`CheckpointError` naming the first problem."""
    root = Path(ckpt_dir)
    record = read_record(root)
    if record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} is not a {CHECKPOINT_FORMAT} record")
    if record.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {root}: format version {record.get('version')!r} is not supported "
                              f"(this build reads version {CHECKPOINT_VERSION})")
    shards = record.get(SHARDS_KEY)
    if shards is None:
        optim_files = [OPTIM_TENSORS_FILE]
    elif isinstance(shards, int) and not isinstance(shards, bool) and shards >= 1:
        optim_files = [f for r in range(shards) for f in optimizer_shard_files(r)]
    else:
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} has an invalid {SHARDS_KEY} ({shards!r})")
    verify_files(root, manifest_files(root, record,
                                      lambda files: all(f in files for f in (MODEL_FILE, *optim_files))))
    return record


def load_model_state(model: "torch.nn.Module", state: Mapping[str, torch.Tensor], where: str,
                     assign: bool = False) -> None:
    """``model.load_state_dict(state, strict=True, assign=assign)`` after checking names and shapes, so a state of
    another model raises :class:`CheckpointError` naming the first difference instead of torch's multi-line error.
    ``where`` names the state in that message (e.g. ``"checkpoint runs/x/step_000010"``)."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{where} does not match this model: {k} has shape {tuple(state[k].shape)}, the "
                                  f"model {tuple(v.shape)}")
    model.load_state_dict(state, strict=True, assign=assign)


@dataclass
class Checkpoint:
    """A verified checkpoint read into memory."""

    path: Path
    trainer: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.trainer["step"])

    @property
    def tokenizer_dir(self) -> Path | None:
        p = self.path / TOKENIZER_DIR
        return p if p.is_dir() else None


def read_state(root: Path, tensors_file: str, json_file: str, device: str | torch.device = "cpu") -> Any:
    """Inverse of :func:`write_state` (with a JSON file) for a verified checkpoint directory ``root``."""
    tensors = load_file(str(root / tensors_file), device=str(device))
    try:
        tree = json.loads((root / json_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {root}: {json_file} is unreadable ({exc})") from exc
    return unflatten_state(tree, tensors)


def read_optimizer_shards(root: Path, shards: int, device: str | torch.device = "cpu") -> list[Any]:
    """Every rank's optimizer shard of a data-parallel checkpoint (verified), in rank order."""
    return [read_state(root, *optimizer_shard_files(r), device=device) for r in range(shards)]


def load_checkpoint(ckpt_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Verify (:func:`verify_checkpoint`) and read a checkpoint; tensors land on ``device``.

    The optimizer shards of a data-parallel checkpoint are merged into one state (each matrix from its owner,
    keyed by parameter name), which loads into the single-device optimizer or a sharded one at any world size."""
    root = Path(ckpt_dir)
    trainer = verify_checkpoint(root)
    dev = str(device)
    model_state = load_file(str(root / MODEL_FILE), device=dev)
    shards = trainer.get(SHARDS_KEY)
    if shards is None:
        optimizer_state = read_state(root, OPTIM_TENSORS_FILE, OPTIM_JSON_FILE, device=dev)
    else:
        from ..parallel.sharded_optimizer import merge_state_dicts  # deferred: only sharded checkpoints need it

        try:
            optimizer_state = merge_state_dicts(read_optimizer_shards(root, shards, device=dev))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {root}: optimizer shards do not merge ({exc})") from exc
    return Checkpoint(root, trainer, model_state, optimizer_state)
