"""Atomic, self-verifying training checkpoints — one layout for the local, ddp and fsdp engines, resumable by any
of them at any world size.

Layout of ``<save-dir>/step_000010/``::

    model.safetensors              local / ddp: model.state_dict() — INT8 codes + scales, dense weights
    model_rank00000.safetensors    fsdp instead: each rank's rows of those tensors, and where they lie (.json;
    model_rank00000.json             :mod:`.pieces`)
    optimizer_rank00000.safetensors  each writing rank's share of the *single-device* optimizer state, keyed by
    optimizer_rank00000.json         parameter name, and where each cut tensor lies in the whole one
                                     (:mod:`.pieces`): one rank on one device; under ddp every owner its matrices
                                     (rank 0 the replicated dense state); under fsdp every rank its rows
    trainer_rank00000.json         each rank's RNG state (distributed engines)
    tokenizer/                     the tokenizer (so a checkpoint exports on its own)
    trainer.json                   format + version, step, RNG state, data position (a global sample index),
                                   scheduler, run arguments, model config, ``optimizer_shards`` / ``model_shards``
                                   (ranks that wrote pieces) and the manifest: sha256 + size of every file,
                                   name/dtype/shape of every tensor

Any engine reads any of these at any world size: each rank takes what the plan of *its* run gives it
(:func:`load_checkpoint` on one device; ``ShardedQGaLoreOptimizer`` the matrices it owns;
``RowShardedQGaLoreOptimizer.load_pieces`` its rows). Checkpoints written before the per-rank pieces (one
``optimizer.safetensors`` / ``.json``, or ddp's per-rank shards) load through the same reader; the deepspeed engine
keeps DeepSpeed's own layout, and ``--engine fsdp --optimizer adamw`` keeps torch AdamW's state in ``dcp/``
(``torch.distributed.checkpoint``, which reshards it) — the one optimizer state no other engine reads. Nothing of
ours is pickled. The pieces (:func:`write_state`, :func:`write_optimizer`, :func:`finalize_checkpoint`,
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
from safetensors.torch import save_file

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
    "model_files",
    "model_shard_files",
    "optimizer_files",
    "publish_checkpoint",
    "read_model_state",
    "read_record",
    "restore_rng_state",
    "save_checkpoint",
    "trainer_shard_file",
    "unflatten_state",
    "verify_checkpoint",
    "verify_files",
    "write_optimizer",
    "write_state",
]

CHECKPOINT_FORMAT = "qgalore_dist.checkpoint"
CHECKPOINT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_JSON_FILE = "optimizer.json"
TRAINER_FILE = "trainer.json"
TOKENIZER_DIR = "tokenizer"
OPTIM_STEM = "optimizer"
MODEL_STEM = "model"
MODEL_SHARDS_KEY = "model_shards"  # trainer.json: ranks that wrote model pieces (absent: one model.safetensors)
SHARDS_KEY = "optimizer_shards"  # trainer.json: number of per-rank optimizer shards (absent: one optimizer file)
DCP_DIR = "dcp"  # --engine fsdp --optimizer adamw: torch AdamW's state as row-sharded DTensors
FSDP_LAYOUT = "qgalore_dist.fsdp_checkpoint/2"  # trainer.json "fsdp_format" of an fsdp checkpoint this build reads
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after optimizer step ``step``: ``step_000010``."""
    return f"step_{step:06d}"


def optimizer_shard_files(rank: int) -> tuple[str, str]:
    """(tensor file, JSON file) of rank ``rank``'s optimizer pieces: ``optimizer_rank00001.safetensors`` / ``.json``."""
    return f"{OPTIM_STEM}_rank{rank:05d}.safetensors", f"{OPTIM_STEM}_rank{rank:05d}.json"


def model_shard_files(rank: int) -> tuple[str, str]:
    """(tensor file, JSON file) of rank ``rank``'s model pieces: ``model_rank00001.safetensors`` / ``.json``."""
    return f"{MODEL_STEM}_rank{rank:05d}.safetensors", f"{MODEL_STEM}_rank{rank:05d}.json"


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
    # a module-level recursion, not a closure calling itself: that would be a reference cycle keeping every tensor
    # (on a GPU: every host copy) alive until the next garbage collection
    return _encode(obj, prefix, tensors, set()), tensors


def _encode(x: Any, path: str, tensors: dict[str, torch.Tensor], seen_storage: set[int]) -> Any:
    """:func:`flatten_state`'s recursion: ``x`` at ``path`` as a JSON-able tree, its tensors added to ``tensors``."""
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
            return {k: _encode(v, f"{path}.{k}" if path else k, tensors, seen_storage) for k, v in x.items()}
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"state key {k!r} at {path or '<root>'!r}: only str and int keys are storable")
        return {_ITEMS: [[k, _encode(v, f"{path}.{k}" if path else str(k), tensors, seen_storage)]
                         for k, v in x.items()]}
    if isinstance(x, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors, seen_storage) for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, f"{path}.{i}", tensors, seen_storage) for i, v in enumerate(x)]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"state value at {path or '<root>'!r} has unsupported type {type(x).__name__}")


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


def write_optimizer(directory: Path, rank: int, state: Any, starts: Any = None) -> None:
    """Rank ``rank``'s optimizer pieces (``optimizer_rank<R>.safetensors`` / ``.json``): its share of the
    single-device state, ``starts`` saying where each cut tensor lies (None: every tensor whole) — the one
    optimizer layout of every engine but deepspeed (:mod:`.pieces`)."""
    from .pieces import tensor_starts, write_pieces

    tree, tensors = flatten_state(state)
    write_pieces(directory, OPTIM_STEM, rank, tree, tensors, tensor_starts(tree, starts or {}))


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
        write_optimizer(tmp, 0, optimizer_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        finalize_checkpoint(tmp, step, {**trainer_state, SHARDS_KEY: 1})
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
    fsdp = record.get("fsdp_format")
    if fsdp is not None and fsdp != FSDP_LAYOUT:
        raise CheckpointError(f"checkpoint {root} is in an earlier --engine fsdp layout ({fsdp}: optimizer state "
                              "under rank keys inside dcp/, resumable at its own world size only), which this "
                              "version no longer reads: resume it with the release that wrote it, or restart "
                              "from its export")
    shards = record.get(SHARDS_KEY)
    if shards is None:
        # the layout before per-rank pieces: one optimizer file; fsdp's torch AdamW keeps its state in dcp/
        optim_files = [] if fsdp is not None else [OPTIM_TENSORS_FILE]
    elif isinstance(shards, int) and not isinstance(shards, bool) and shards >= 1:
        optim_files = [f for r in range(shards) for f in optimizer_shard_files(r)]
    else:
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} has an invalid {SHARDS_KEY} ({shards!r})")
    if fsdp is not None and shards is None:
        optim_files.append(f"{DCP_DIR}/.metadata")
    model_shards = record.get(MODEL_SHARDS_KEY)
    if model_shards is not None and not (isinstance(model_shards, int) and not isinstance(model_shards, bool)
                                         and model_shards >= 1):
        raise CheckpointError(f"checkpoint {root}: {TRAINER_FILE} has an invalid {MODEL_SHARDS_KEY} "
                              f"({model_shards!r})")
    need = [f for pair in model_files(record) for f in pair if f is not None] + optim_files
    verify_files(root, manifest_files(root, record, lambda files: all(f in files for f in need)))
    return record


def load_model_state(model: "torch.nn.Module", state: Mapping[str, torch.Tensor], where: str,
                     assign: bool = False) -> None:
    """``model.load_state_dict(state, strict=True, assign=assign)`` after checking names and shapes, so a state of
    another model raises :class:`CheckpointError` naming the first difference instead of torch's multi-line error.
    ``where`` names the state in that message (e.g. ``"checkpoint runs/x/step_000010"``)."""
    own = model.state_dict()
    state = _with_aliases(model, state)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise CheckpointError(f"{where} does not match this model: {k} has shape {tuple(state[k].shape)}, the "
                                  f"model {tuple(v.shape)}")
    model.load_state_dict(state, strict=True, assign=assign)


def _with_aliases(model: "torch.nn.Module", state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus the names it lacks that are another name of a tensor it has (tied embeddings: an fsdp
    checkpoint stores each parameter once, ``model.state_dict()`` names it twice) and the buffers it lacks (an fsdp
    checkpoint stores parameters only; the buffers of the supported architectures are computed, never trained)."""
    out = dict(state)
    by_tensor: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(v), []).append(k)
    for names in by_tensor.values():
        have = [k for k in names if k in out]
        for k in names:
            if have and k not in out:
                out[k] = out[have[0]]
    own_buffers = dict(model.named_buffers())
    for k in set(model.state_dict()) - set(out):
        if k in own_buffers and not k.endswith(("_codes", "_scales")):  # INT8 weights are trained: never filled
            out[k] = own_buffers[k]
    return out


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


def model_files(record: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """(tensor file, JSON file or None) of the model in a verified checkpoint: every rank's pieces (fsdp), or one
    whole ``model.safetensors`` (local, ddp) — both read by :class:`.pieces.PieceReader`."""
    shards = record.get(MODEL_SHARDS_KEY)
    return [(MODEL_FILE, None)] if shards is None else [model_shard_files(r) for r in range(int(shards))]


def read_model_state(root: Path, record: Mapping[str, Any], device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """The whole model state of a verified checkpoint of any engine but deepspeed, keyed as ``model.state_dict()``
    names it (INT8 weights as ``<module>.weight_codes`` / ``_scales``): the model pieces joined."""
    from .pieces import PieceReader  # pieces reads this module's codec

    with PieceReader(root, files=model_files(record), device=str(device)) as reader:
        return {k: reader.full(k) for k in reader.keys()}


def optimizer_files(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(tensor file, JSON file) of every rank's optimizer pieces in a verified checkpoint (one file pair before
    per-rank pieces; none where the optimizer lives in ``dcp/``: fsdp's torch AdamW)."""
    shards = record.get(SHARDS_KEY)
    if shards is not None:
        return [optimizer_shard_files(r) for r in range(int(shards))]
    return [] if record.get("fsdp_format") is not None else [(OPTIM_TENSORS_FILE, OPTIM_JSON_FILE)]


def load_checkpoint(ckpt_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Verify (:func:`verify_checkpoint`) and read a checkpoint of any engine but deepspeed, at any world size;
    tensors land on ``device``. The optimizer state is the single-device one (every rank's pieces joined: each
    matrix from its owner, row pieces concatenated; keyed by parameter name), which loads into the single-device
    optimizer or a sharded one at any world size."""
    from .pieces import PieceReader, read_full_state  # pieces reads this module's codec

    root = Path(ckpt_dir)
    trainer = verify_checkpoint(root)
    files = optimizer_files(trainer)
    if not files:
        raise CheckpointError(f"checkpoint {root} holds --engine fsdp's torch AdamW state inside {DCP_DIR}/, which "
                              "resumes under --engine fsdp only")
    model_state = read_model_state(root, trainer, device)
    with PieceReader(root, files=files, device=str(device)) as reader:
        optimizer_state = read_full_state(reader)
    return Checkpoint(root, trainer, model_state, optimizer_state)
