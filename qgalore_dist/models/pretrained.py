"""Load a local Hugging Face model directory (safetensors) straight into INT8, one tensor at a time.

``AutoModelForCausalLM.from_pretrained`` followed by ``quantize_model`` holds the whole float model first (27 GB of
fp32 for a 7B model before its first INT8 byte). Here the model is built on the meta device and every tensor is
read from the memory-mapped files on its own: a targeted linear's rows go through ``quantize_rows`` with round to
nearest (a pretrained weight is a value to keep, not an update whose expectation matters; no stochastic stream)
and are dropped before the next matrix, so the float transient is one matrix. This is the file-backed
:class:`~qgalore_dist.nn.materialize.ParamSource` of :func:`~qgalore_dist.nn.materialize.materialize`, the same
loop a fresh keyed-random model goes through.

Only safetensors are read: a pickle checkpoint (``pytorch_model.bin``, ``*.pt``) runs code when loaded, so it is
refused with the one line that converts it on a trusted machine. Every error is a one-line
:class:`~qgalore_dist.errors.ModelSpecError` naming the file (and tensor).

:func:`pretrained_eval_loss` evaluates the *unquantised* checkpoint the same streaming way (each module's weights
exist only during its own forward), so a run can print the original model's held-out loss next to the INT8 one's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ModelSpecError
from ..nn.convert import DEFAULT_TARGET_MODULES
from ..nn.layout import StoredAs, int8_layout
from ..nn.materialize import RowRange, materialize
from .arch import LEGACY_EXPERT_FILES, init_non_persistent_buffers
from .build import build_model, rebuild_rotary_buffers, resolve_model_config

__all__ = [
    "SafetensorsCheckpoint",
    "SafetensorsSource",
    "load_quantized_pretrained",
    "pretrained_eval_loss",
    "pretrained_source",
    "safetensors_files",
    "streamed_float_model",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# a per-expert file tensor, in transformers >= 5 module names: <...>.experts.<e>.<part>.weight
_PER_EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<part>[^.]+)\.weight")
# file names that hold pickled tensors (torch.save): refused, never opened
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "pytorch_model.bin.index.json")


def _convert_hint(directory: Path) -> str:
    return (f"convert them on a trusted machine: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{directory}').save_pretrained('OUT_DIR', safe_serialization=True)\" "
            f"(then copy config.json, the tokenizer and OUT_DIR/*.safetensors*)")


def _read_index(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelSpecError(f"cannot read {index} ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"malformed JSON in {index} (line {exc.lineno}: {exc.msg})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelSpecError(f"{index} has no 'weight_map' object of tensor name -> shard file")
    for tensor, shard in weight_map.items():
        # shard names are plain file names next to the index; anything else could point outside the directory
        if Path(shard).name != shard:
            raise ModelSpecError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a file name in {directory}")
    return weight_map


def _discover(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """(weight files in shard order, the index's weight_map or None for a single file); see `safetensors_files`."""
    if not directory.is_dir():
        raise ModelSpecError(f"pretrained model directory {directory} does not exist")
    if (directory / INDEX_FILE).is_file():
        weight_map = _read_index(directory)
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise ModelSpecError(f"{directory / INDEX_FILE} has an empty weight_map")
        for shard in shards:
            if not (directory / shard).is_file():
                first = next(t for t, s in weight_map.items() if s == shard)
                raise ModelSpecError(f"{directory / INDEX_FILE} names shard {shard} (tensor {first!r} ...), "
                                     f"which is missing from {directory}")
        return [directory / s for s in shards], weight_map
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    pickles = sorted({p.name for g in _PICKLE_GLOBS for p in directory.glob(g)})
    if pickles:
        raise ModelSpecError(f"{directory} holds only pickle checkpoints ({', '.join(pickles)}), which qgalore_dist "
                             f"never loads (unpickling runs code); {_convert_hint(directory)}")
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    extra = f" (found {', '.join(others)}: name it {SINGLE_FILE} or add {INDEX_FILE})" if others else ""
    raise ModelSpecError(f"{directory} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}{extra}")


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors weight files of a model directory, in shard order.

    ``model.safetensors.index.json`` (sharded: the files its ``weight_map`` names, each of which must exist) wins
    over a single ``model.safetensors``. A directory holding only pickle checkpoints (``pytorch_model.bin``,
    ``*.bin``, ``*.pt``, ``*.pth``) is refused (never unpickled) with the command that converts them; no weights at
    all is refused too. Raises :class:`ModelSpecError` (one line, naming the file).
    """
    return _discover(Path(directory).expanduser())[0]


@contextmanager
def _opened(path: Path) -> Iterator:
    """``safe_open`` (memory-mapped), with a corrupt file reported as one line naming it. Leaving the block
    unmaps the file, so the pages of one file are released before the next is opened."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ModelSpecError(f"cannot read safetensors file {path} ({str(exc).splitlines()[0]})") from exc
    with handle as f:
        yield f


class SafetensorsCheckpoint:
    """The tensors of a local model directory: where each lives, its shape, and reads of one tensor (or of a row
    range of it) at a time.

    Construction reads only the files' headers (each file opened and closed in turn). Every :meth:`read` opens
    the one file holding the tensor and closes it before returning: no two files are ever mapped at once, and a
    read copies out just the requested rows.

    Tensors are named as transformers >= 5 names them. Files that hold MoE experts one tensor per expert (the hub's
    Mixtral / Qwen2-MoE checkpoints, and what ``save_pretrained`` writes) also answer to the 3-D names
    (``...mlp.experts.gate_up_proj`` [E, 2·I, H]) and renamed modules (Mixtral's ``block_sparse_moe``) they are
    loaded as (:data:`~qgalore_dist.models.arch.LEGACY_EXPERT_FILES`): such a tensor is assembled from its per-expert
    tensors on read, and :meth:`read_expert` reads one expert's rows without the others.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self.files, weight_map = _discover(self.directory)
        sharded = weight_map is not None
        self.index: Path | None = self.directory / INDEX_FILE if sharded else None
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        claimed = {t: self.directory / s for t, s in (weight_map or {}).items()}
        for path in self.files:
            with _opened(path) as f:
                for name in f.keys():
                    if sharded and claimed.get(name) != path:
                        continue  # the index decides which copy counts (as transformers does)
                    self._where[name] = path
                    self._shape[name] = tuple(f.get_slice(name).get_shape())
        # tensors the index puts in a shard that does not hold them: remembered to name the shard on use
        self._absent = {t: p for t, p in claimed.items() if t not in self._where}
        self._renamed, self._fused = self._legacy_names()

    def _legacy_names(self) -> tuple[dict[str, str], dict[str, list[list[str]]]]:
        """``({transformers >= 5 name: file tensor}, {3-D expert name: per expert e, the file tensors whose rows
        it concatenates})`` of per-expert files (only names the files do not hold themselves)."""
        renamed: dict[str, str] = {}
        found: dict[str, dict[int, list[str]]] = {}
        for fmt in LEGACY_EXPERT_FILES.values():
            by_part = {parts[0]: (param, parts) for param, parts in fmt.parts.items()}
            new_name = {old: new for new, old in fmt.renames}
            for file_name in self._where:
                name = file_name
                for old, new in new_name.items():
                    name = name.replace(old, new)
                m = _PER_EXPERT.fullmatch(name)
                if m:
                    if m["part"] in by_part:  # the first file tensor of an expert matrix names the others
                        param, parts = by_part[m["part"]]
                        pieces = [file_name.replace(f".{parts[0]}.weight", f".{p}.weight") for p in parts]
                        if all(p in self._where for p in pieces):
                            found.setdefault(f"{m['experts']}.{param}", {})[int(m["e"])] = pieces
                elif name != file_name and name not in self._where:
                    renamed[name] = file_name
        fused = {n: [got[e] for e in range(len(got))] for n, got in found.items()
                 if n not in self._where and sorted(got) == list(range(len(got)))}
        return renamed, fused

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._renamed or name in self._fused

    @property
    def tensor_names(self) -> list[str]:
        return list(self._where)

    def _missing(self, name: str) -> ModelSpecError:
        if name in self._absent:
            return ModelSpecError(f"tensor {name!r} is missing from shard {self._absent[name]} "
                                  f"(where {self.index} puts it)")
        where = self.index if self.index is not None else self.files[0]
        return ModelSpecError(f"tensor {name!r} is missing from {where}")

    def _file_of(self, name: str) -> Path:
        if name in self._fused:
            return self._where[self._fused[name][0][0]]
        return self._where[self._renamed.get(name, name)]

    def shape(self, name: str) -> tuple[int, ...]:
        name = self._renamed.get(name, name)
        if name in self._fused:
            first = [self._shape[p] for p in self._fused[name][0]]
            return (len(self._fused[name]), sum(s[0] for s in first), first[0][1])
        if name not in self._where:
            raise self._missing(name)
        return self._shape[name]

    def check(self, expected: Mapping[str, Sequence[int]]) -> None:
        """Every ``name -> shape`` of ``expected`` is present with that shape (before anything is allocated)."""
        for name, shape in expected.items():
            have = self.shape(name)
            if have != tuple(shape):
                raise ModelSpecError(f"tensor {name!r} in {self._file_of(name)} has shape {list(have)}, the config "
                                     f"expects {list(shape)}")

    def _slice(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        """File tensor ``name``, whole or ``[index]`` (only that part copied out of the mapped file)."""
        path = self._where[name]
        with _opened(path) as f:
            try:
                return f.get_tensor(name) if index is None else f.get_slice(name)[index]
            except SafetensorError as exc:
                raise ModelSpecError(f"cannot read tensor {name!r} from {path} ({str(exc).splitlines()[0]})") from exc

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """Tensor ``name`` (its file shape, e.g. [m, n]) or its rows ``[r0, r1)`` ([r1 - r0, n]), in ``dtype``
        (default: the file's) on ``device``. Only the requested rows are copied out of the mapped file (a 3-D expert
        tensor of per-expert files: rows are experts, each assembled from its file tensors)."""
        shape = self.shape(name)
        name = self._renamed.get(name, name)
        if rows is not None and not 0 <= rows[0] <= rows[1] <= shape[0]:
            raise ValueError(f"{name}: rows [{rows[0]}, {rows[1]}) outside its {shape[0]} rows")
        if name in self._fused:
            r0, r1 = rows if rows is not None else (0, shape[0])
            per_expert = [self.read_expert(name, e, dtype=dtype) for e in range(r0, r1)]
            t = torch.stack(per_expert) if per_expert else \
                self._slice(self._fused[name][0][0], (slice(0, 0),)).reshape(0, *shape[1:])
        else:
            t = self._slice(name, None if rows is None else (slice(rows[0], rows[1]),))
        return t.to(device=device, dtype=dtype or t.dtype)

    def read_expert(self, name: str, expert: int, rows: tuple[int, int] | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Expert ``expert``'s matrix of the 3-D tensor ``name`` ([E, m, n]) -> [m, n], or its rows ``[r0, r1)``
        ([r1 - r0, n]); per-expert files: the rows of its file tensors that fall in the range, concatenated."""
        e_count, m, _ = self.shape(name)
        name = self._renamed.get(name, name)
        r0, r1 = rows if rows is not None else (0, m)
        if not (0 <= expert < e_count and 0 <= r0 <= r1 <= m):
            raise ValueError(f"{name}: expert {expert}, rows [{r0}, {r1}) outside [{e_count}, {m}, ...]")
        if name not in self._fused:
            t = self._slice(name, (slice(expert, expert + 1), slice(r0, r1)))[0]
        else:
            parts, pieces, offset = self._fused[name][expert], [], 0
            for part in parts:  # the file tensors' rows that fall in [r0, r1)
                k = self._shape[part][0]
                lo, hi = max(r0, offset), min(r1, offset + k)
                if lo < hi:
                    pieces.append(self._slice(part, (slice(lo - offset, hi - offset),)))
                offset += k
            t = torch.cat(pieces) if pieces else self._slice(parts[0], (slice(0, 0),))
        return t.to(device=device, dtype=dtype or t.dtype)

    def read_matrix(self, stored: StoredAs, rows: tuple[int, int], dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``[r0, r1)`` of a projected matrix as the INT8 model holds it ([out, in]) from where the transformers
        layout stores it (:class:`~qgalore_dist.nn.layout.StoredAs`): an expert's slice, or the columns of a
        ``Conv1D`` weight [in, out] transposed -> [r1 - r0, in]."""
        if stored.expert is not None:
            return self.read_expert(stored.name, stored.expert, rows, dtype, device)
        if stored.transposed:
            cols = self.shape(stored.name)[1]
            if not 0 <= rows[0] <= rows[1] <= cols:
                raise ValueError(f"{stored.name}: rows [{rows[0]}, {rows[1]}) outside its {cols} output features")
            t = self._slice(self._renamed.get(stored.name, stored.name), (slice(None), slice(rows[0], rows[1])))
            return t.t().contiguous().to(device=device, dtype=dtype or t.dtype)
        return self.read(stored.name, rows, dtype, device)


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` of parameters shared under several names (tied ``lm_head.weight`` ->
    ``model.embed_tokens.weight``): checkpoints store a tied tensor once, under its first name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _expected_tensors(model: nn.Module, aliases: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """What the checkpoint must hold: parameters and persistent buffers (a meta state dict), less the aliases."""
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in aliases}


def _own_tensors(module: nn.Module) -> tuple[list[str], list[str]]:
    """Names of ``module``'s own parameters and own persistent buffers (not its children's)."""
    params = [n for n, _ in module.named_parameters(recurse=False)]
    buffers = [n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    return params, buffers


class SafetensorsSource:
    """A :class:`~qgalore_dist.nn.materialize.ParamSource` reading a :class:`SafetensorsCheckpoint`.

    Targeted weights are read as the requested rows in the file's dtype and rounded to nearest (key ``None``);
    every other tensor as its requested rows, cast to the dtype its destination was allocated in. Tied aliases
    are never read (the fill writes a shared tensor once, under its first name). ``layout``
    (:func:`~qgalore_dist.nn.layout.int8_layout` of the model before conversion) says where a converted matrix
    lives: a GPT-2 ``Conv1D`` weight's columns (read transposed), one expert of a 3-D experts tensor.
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, aliases: Mapping[str, str],
                 layout: Mapping[str, StoredAs] | None = None):
        self.checkpoint = checkpoint
        self.aliases = dict(aliases)
        self.layout = dict(layout or {})

    def matrix_rows(self, qname: str, shape: tuple[int, int], rows: tuple[int, int],
                    device: torch.device | str) -> tuple[torch.Tensor, None]:
        stored = self.layout.get(qname)
        if stored is None:
            return self.checkpoint.read(qname, rows=rows, device=device), None
        return self.checkpoint.read_matrix(stored, rows, device=device), None

    def dense_rows(self, name: str, module: nn.Module, shape: tuple[int, ...], rows: tuple[int, int],
                   dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if not shape:
            return self.checkpoint.read(name, dtype=dtype, device=device)
        return self.checkpoint.read(name, rows=rows, dtype=dtype, device=device)


def _open_pretrained(directory: str | Path,
                     config: PretrainedConfig | None) -> tuple[SafetensorsCheckpoint, PretrainedConfig]:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ModelSpecError(f"pretrained model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelSpecError(f"pretrained model directory {directory} has no config.json")
    checkpoint = SafetensorsCheckpoint(directory)
    own = resolve_model_config(directory)  # never a vocab override: the embeddings in the files decide
    if config is None:
        return checkpoint, own
    if config.vocab_size != own.vocab_size:
        raise ModelSpecError(f"config vocab_size {config.vocab_size} differs from {directory / 'config.json'}'s "
                             f"{own.vocab_size}: a pretrained model keeps its vocabulary (use its tokenizer)")
    return checkpoint, config


def load_quantized_pretrained(
    directory: str | Path,
    config: PretrainedConfig | None = None,
    *,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    group_size: int = 256,
    device: torch.device | str = "cpu",
    dense_dtype: torch.dtype = torch.float32,
    quantize: bool = True,
    rows: RowRange | None = None,
) -> PreTrainedModel:
    """Build the causal LM of ``directory`` on the meta device and fill it from its safetensors, tensor by tensor.

    ``config`` defaults to the directory's ``config.json`` (a given one must have its vocabulary). Every expected
    tensor's presence and shape is checked against the file headers before anything is allocated.

    With ``quantize`` each targeted linear (weight [m, n]) becomes a ``QGaLoreLinear`` holding
    ``quantize_rows(W, group_size, 8, key=None)``: codes int8 [m, n], scales fp32 [m, ceil(n / group_size)],
    rounded to nearest; ``rows(qname, m) -> (r0, r1)`` reads only rows ``[r0, r1)`` of each (a row shard, see
    :func:`~qgalore_dist.nn.materialize.materialize`). Dense parameters (embeddings, norms, lm_head, biases) are
    stored in ``dense_dtype``. Without ``quantize`` (float modes) every parameter is loaded in ``dense_dtype``
    into the meta-built model the same way: one float copy of the model, never two. Tied embeddings end up tied;
    rotary buffers are rebuilt. Returns the model on ``device`` (train mode, as built).
    """
    checkpoint, config = _open_pretrained(directory, config)
    # quantized: built like a fresh INT8 model (materialize_quantized's callers); float: in its dtype, as
    # from_pretrained(dtype=...) would record it in the config
    model = build_model(config, meta=True) if quantize else build_model(config, dtype=dense_dtype, meta=True)
    materialize(model, pretrained_source(checkpoint, model), tuple(target_modules), group_size, device,
                dense_dtype, quantize=quantize, rows=rows)
    return model


def pretrained_source(checkpoint: SafetensorsCheckpoint | str | Path, model: nn.Module) -> SafetensorsSource:
    """The source that fills ``model`` (built on the meta device from the checkpoint's config, before any INT8
    skeleton) from ``checkpoint``, once every tensor it expects was checked present with its shape."""
    if not isinstance(checkpoint, SafetensorsCheckpoint):
        checkpoint = SafetensorsCheckpoint(checkpoint)
    aliases = _tied_aliases(model)
    checkpoint.check(_expected_tensors(model, aliases))
    return SafetensorsSource(checkpoint, aliases, int8_layout(model))


def streamed_float_model(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> PreTrainedModel:
    """The original (unquantised) model of ``directory`` in ``dtype``, for inference, that never holds itself.

    Built on the meta device; each module owning parameters / persistent buffers loads them from the mapped files
    in a forward pre-hook and puts its meta tensors back in a forward hook, so at most one module's float weights
    exist at a time (a tied ``lm_head`` reads the embedding's tensor again). Use it under ``torch.no_grad()``:
    the released weights cannot take gradients. Only modules that use their own weights inside their own forward
    work (true of LLaMA / Mistral / Qwen2); another module touching them sees meta tensors and fails loudly.
    """
    checkpoint, config = _open_pretrained(directory, None)
    model = build_model(config, dtype=dtype, meta=True)
    aliases = _tied_aliases(model)
    checkpoint.check(_expected_tensors(model, aliases))
    rebuild_rotary_buffers(model, device)  # small, and no checkpoint holds them: materialised once, for good
    for module in model.modules():  # the other non-persistent buffers (Gemma's embed_scale): the model's own rule
        for b, t in module._buffers.items():
            if t is not None and t.is_meta and b in module._non_persistent_buffers_set:
                module._buffers[b] = torch.empty_like(t, device=device)
    init_non_persistent_buffers(model)
    for name, module in model.named_modules():
        params, buffers = _own_tensors(module)
        if params or buffers:
            _StreamHooks(checkpoint, aliases, name, module, params, buffers, dtype, device).install()
    model.eval()
    return model


class _StreamHooks:
    """Load one module's own tensors before its forward, restore their meta placeholders after it."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, aliases: Mapping[str, str], name: str, module: nn.Module,
                 params: list[str], buffers: list[str], dtype: torch.dtype, device: torch.device | str):
        prefix = f"{name}." if name else ""
        self.checkpoint, self.module, self.dtype, self.device = checkpoint, module, dtype, device
        self.params = {p: aliases.get(prefix + p, prefix + p) for p in params}
        self.buffers = {b: prefix + b for b in buffers}
        self.meta_params = {p: module._parameters[p] for p in params}
        self.meta_buffers = {b: module._buffers[b] for b in buffers}

    def install(self) -> None:
        self.module.register_forward_pre_hook(self._load)
        self.module.register_forward_hook(self._release)

    def _load(self, module: nn.Module, args) -> None:
        for p, key in self.params.items():
            module._parameters[p] = nn.Parameter(self.checkpoint.read(key, dtype=self.dtype, device=self.device),
                                                 requires_grad=False)
        for b, key in self.buffers.items():
            module._buffers[b] = self.checkpoint.read(key, dtype=self.meta_buffers[b].dtype, device=self.device)

    def _release(self, module: nn.Module, args, output) -> None:
        # the shared meta objects go back (a tied lm_head and embedding share one again): storage is freed
        module._parameters.update(self.meta_params)
        module._buffers.update(self.meta_buffers)


def pretrained_eval_loss(
    directory: str | Path,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> float:
    """Held-out loss of the original (unquantised) checkpoint in ``directory``, without ever holding it.

    ``batches``: ``(input_ids, labels)`` pairs, each int64 [batch, seq] (labels -100 where ignored; shifted
    inside, as transformers does). Returns the mean over batches of ``model(input_ids, labels=labels).loss`` of a
    :func:`streamed_float_model` in ``dtype`` on ``device``.
    """
    model = streamed_float_model(directory, dtype=dtype, device=device)
    losses: list[float] = []
    with torch.no_grad():
        for input_ids, labels in batches:
            out = model(input_ids.to(device), labels=labels.to(device), use_cache=False)
            losses.append(float(out.loss))
    if not losses:
        raise ValueError("pretrained_eval_loss: no batches")
    return sum(losses) / len(losses)
