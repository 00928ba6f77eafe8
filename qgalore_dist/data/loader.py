"""Token streams (tokenize once, cache, memory-map), token shards, the validation split and `TokenBatcher`.

A data *source* is one of: ``None`` / ``"default"`` / ``"shakespeare"`` (the embedded corpus), a text file,
a JSONL file (one ``{"text": ...}`` record per line), a folder of those, or pre-tokenized shards — ``.bin``
(raw uint16/uint32 token ids) with a JSON sidecar ``<name>.bin.json`` or ``<name>.json`` giving
``{"dtype": "uint16"}``, or ``.safetensors`` holding a 1-D integer ``tokens`` tensor — alone or in a folder.
Text is tokenized once; the stream is cached as a ``.bin`` shard under ``<cache>/tokens/`` keyed by the
content hash of the files and the tokenizer, and memory-mapped afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from qgalore_dist.data.corpus import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    DataError,
    cache_root,
    default_corpus_files,
    files_fingerprint,
    iter_documents,
    split_large_document,
)
from qgalore_dist.data.tokenizer import tokenizer_fingerprint

__all__ = [
    "TokenStream",
    "TokenBatcher",
    "load_tokens",
    "write_token_shard",
    "read_token_shard",
    "split_point",
]

SHARD_SUFFIXES = (".bin", ".safetensors")
_DEFAULT_NAMES = ("default", "shakespeare")
_ALLOWED_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Bump when tokenization of text (separators, batching) changes, so stale token caches are not reused.
_STREAM_VERSION = "stream-v1"
_ENCODE_BATCH = 64  # documents per tokenizer call: parallel inside `tokenizers`, bounded memory


@dataclass
class TokenStream:
    """A 1-D token stream made of one or more memory-mapped pieces, read as if concatenated.

    ``pieces``: 1-D integer arrays (uint16/uint32 `np.memmap` from shards and caches), never copied whole.
    ``vocab_size``: from a shard sidecar or the tokenizer, when known (the model's embedding must cover it).
    """

    pieces: list[np.ndarray]
    vocab_size: int | None = None
    source: str = ""
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # _offsets[i] is the global index of pieces[i][0]; the last entry is the total length.
        self._offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.pieces], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a fresh array (may span pieces). Shape ``[stop - start]``."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"slice [{start}, {stop}) outside token stream of length {len(self)}")
        if start == stop:
            return np.empty(0, dtype=self.pieces[0].dtype if self.pieces else np.uint32)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        out, pos, i = [], start, first
        while pos < stop:
            base = int(self._offsets[i])
            end = min(stop, int(self._offsets[i + 1]))
            out.append(np.asarray(self.pieces[i][pos - base : end - base]))
            pos, i = end, i + 1
        return np.concatenate(out) if len(out) != 1 else out[0].copy()

    @classmethod
    def from_array(
        cls, tokens: np.ndarray | torch.Tensor | Sequence[int], vocab_size: int | None = None
    ) -> "TokenStream":
        """Wrap an in-memory 1-D token array (tests, or streams built elsewhere)."""
        arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if arr.ndim != 1:
            raise DataError(f"token array must be 1-D, got shape {tuple(arr.shape)}")
        return cls([arr], vocab_size=vocab_size, source="<array>")


# ----------------------------------------------------------------------------------------------- shards


def _sidecar_candidates(path: Path) -> list[Path]:
    return [path.with_name(path.name + ".json"), path.with_suffix(".json")]


def write_token_shard(
    path: str | os.PathLike[str],
    tokens: np.ndarray | torch.Tensor | Sequence[int],
    *,
    dtype: str | None = None,
    vocab_size: int | None = None,
) -> Path:
    """Write a 1-D token array as a shard: ``.bin`` (+ ``<name>.bin.json`` sidecar) or ``.safetensors``.

    ``dtype`` defaults to uint16 when every id (and ``vocab_size``) fits, else uint32. Writes are atomic
    (temp file + rename), so concurrent writers of the same shard never expose a partial file.
    """
    path = Path(path)
    arr = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise DataError(f"{path}: token ids must lie in [0, 2^32)")
    if dtype is None:
        top = max(int(arr.max()) + 1 if arr.size else 0, vocab_size or 0)
        dtype = "uint16" if top <= 2**16 else "uint32"
    if dtype not in _ALLOWED_DTYPES:
        raise DataError(f"{path}: shard dtype must be one of {sorted(_ALLOWED_DTYPES)}, got {dtype!r}")
    np_dtype = _ALLOWED_DTYPES[dtype]
    if arr.size and int(arr.max()) > np.iinfo(np_dtype).max:
        raise DataError(f"{path}: token id {int(arr.max())} does not fit {dtype}")
    arr = arr.astype(np_dtype, copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)

    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {"vocab_size": str(vocab_size)} if vocab_size is not None else None
        tmp = _tmp_name(path)
        save_file({"tokens": np.ascontiguousarray(arr)}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    elif path.suffix == ".bin":
        sidecar = {"dtype": dtype, "num_tokens": int(arr.size)}
        if vocab_size is not None:
            sidecar["vocab_size"] = int(vocab_size)
        # Sidecar first: a reader that sees the .bin always finds its sidecar.
        _atomic_write_bytes(path.with_name(path.name + ".json"), json.dumps(sidecar).encode())
        _atomic_write_bytes(path, arr.tobytes())
    else:
        raise DataError(f"{path}: shard files must end in .bin or .safetensors")
    return path


def _tmp_name(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_token_shard(path: str | os.PathLike[str]) -> TokenStream:
    """Memory-map one shard (``.bin`` + sidecar, or ``.safetensors``) as a `TokenStream`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard does not exist")
    if path.suffix == ".bin":
        return _read_bin(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    raise DataError(f"{path}: not a token shard (.bin or .safetensors)")


def _read_bin(path: Path) -> TokenStream:
    sidecar = next((p for p in _sidecar_candidates(path) if p.is_file()), None)
    if sidecar is None:
        raise DataError(f"{path}: missing JSON sidecar ({path.name}.json) giving the token dtype")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{sidecar}: unreadable shard sidecar ({exc})") from exc
    dtype = meta.get("dtype") if isinstance(meta, dict) else None
    if dtype not in _ALLOWED_DTYPES:
        raise DataError(f"{sidecar}: sidecar 'dtype' must be one of {sorted(_ALLOWED_DTYPES)}, got {dtype!r}")
    for key in ("num_tokens", "vocab_size"):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{sidecar}: sidecar {key!r} must be a positive integer, got {value!r}")
    itemsize = np.dtype(_ALLOWED_DTYPES[dtype]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise DataError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
    count = size // itemsize
    if "num_tokens" in meta and int(meta["num_tokens"]) != count:
        raise DataError(f"{path}: holds {count} tokens but its sidecar says {meta['num_tokens']}")
    if count == 0:
        raise DataError(f"{path}: shard is empty")
    arr = np.memmap(path, dtype=_ALLOWED_DTYPES[dtype], mode="r", shape=(count,))
    return _shard_stream(path, arr, meta.get("vocab_size"))


def _declares_vocab(path: Path) -> bool:
    """Whether a shard states its vocab_size (sidecar / safetensors metadata) rather than it being counted."""
    if path.suffix == ".bin":
        side = next((p for p in _sidecar_candidates(path) if p.is_file()), None)
        try:
            meta = json.loads(side.read_text(encoding="utf-8")) if side is not None else None
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(meta, dict) and meta.get("vocab_size") is not None
    try:
        with path.open("rb") as handle:
            n = int.from_bytes(handle.read(8), "little")
            return "vocab_size" in (json.loads(handle.read(n)).get("__metadata__") or {})
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        return False


def _shard_stream(path: Path, arr: np.ndarray, vocab: Any) -> TokenStream:
    """A shard's stream whose ``vocab_size`` covers every id it holds: the sidecar's / metadata's value, checked
    against the shard's largest id (an id past the model's vocabulary would otherwise fail mid-forward)."""
    top = _shard_max_id(path, arr)
    if vocab is not None and top >= int(vocab):
        raise DataError(f"{path}: holds token id {top} but its vocab_size is {int(vocab)}")
    return TokenStream([arr], vocab_size=int(vocab) if vocab is not None else top + 1, source=str(path))


def _shard_max_id(path: Path, arr: np.ndarray) -> int:
    """The largest token id of a shard: one vectorised pass over the memory map (GB/s), cached under
    ``<cache>/shard_stats/`` by the shard's path, size and modification time. A signed shard's smallest id is
    checked in the same pass (a negative id would index the embedding from its end)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    cache = cache_root() / "shard_stats" / f"{key}.json"
    signed = np.issubdtype(arr.dtype, np.signedinteger)
    try:
        stats = json.loads(cache.read_text())
        if not signed or int(stats["min_id"]) >= 0:
            return int(stats["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    chunks = range(0, len(arr), 1 << 26)  # bounded chunks of the map
    top = max(int(arr[i:i + (1 << 26)].max()) for i in chunks)
    low = min(int(arr[i:i + (1 << 26)].min()) for i in chunks) if signed else 0
    if low < 0:
        first = next(i + int(np.argmax(arr[i:i + (1 << 26)] < 0)) for i in chunks if arr[i:i + (1 << 26)].min() < 0)
        raise DataError(f"{path}: holds negative token id {int(arr[first])} (at position {first}); token ids must "
                        "be >= 0")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(cache, json.dumps({"path": str(path), "max_id": top, "min_id": low}).encode())
    except OSError:
        pass  # a read-only cache costs a recount next time, nothing else
    return top


# safetensors dtype codes of the integer types a token tensor may use.
_SAFETENSORS_INT = {"U8": np.uint8, "U16": np.uint16, "U32": np.uint32, "I16": np.int16, "I32": np.int32,
                    "I64": np.int64, "U64": np.uint64}


def _read_safetensors(path: Path) -> TokenStream:
    # Parse the header ourselves (8-byte little-endian length + JSON) and memory-map the `tokens` bytes:
    # the safetensors library's numpy loader copies the tensor into RAM, which multi-GB shards cannot afford.
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_len <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {header_len} impossible for a {size}-byte file")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise DataError(f"{path}: unreadable safetensors file ({exc})") from exc
    if not isinstance(header, dict) or "tokens" not in header:
        names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
        raise DataError(f"{path}: safetensors shard has no 'tokens' tensor (has {names})")
    info = header["tokens"]
    if not isinstance(info, dict):
        raise DataError(f"{path}: malformed safetensors header: 'tokens' is not a tensor entry")
    raw_dtype, shape = info.get("dtype"), info.get("shape", [])
    dtype = _SAFETENSORS_INT.get(raw_dtype) if isinstance(raw_dtype, str) else None
    if dtype is None or not isinstance(shape, list) or len(shape) != 1:
        raise DataError(f"{path}: 'tokens' must be a 1-D integer tensor, got {raw_dtype} {shape}")
    offsets = info.get("data_offsets")
    count = shape[0]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)
            and _is_count(count)):
        raise DataError(f"{path}: malformed safetensors header: 'tokens' needs a shape [n] and data_offsets "
                        f"[begin, end] of non-negative integers, got {shape} and {offsets}")
    begin, end = offsets
    if end - begin != count * np.dtype(dtype).itemsize or 8 + header_len + end > size:
        raise DataError(f"{path}: 'tokens' offsets {begin}..{end} do not match its shape or the file size")
    if count == 0:
        raise DataError(f"{path}: shard is empty")
    meta = header.get("__metadata__") or {}
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if vocab is not None:
        try:
            vocab = int(vocab)  # safetensors metadata values are strings
        except (TypeError, ValueError):
            vocab = -1
        if vocab < 1:
            raise DataError(f"{path}: metadata 'vocab_size' must be a positive integer, got "
                            f"{meta.get('vocab_size')!r}")
    arr = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=(count,))
    return _shard_stream(path, arr, vocab)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------------------------- text


def _encode_docs(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The Rust tokenizer directly: no "sequence longer than model_max_length" warnings, no tensors.
        return [enc.ids for enc in backend.encode_batch(docs, add_special_tokens=False)]
    return tokenizer(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _tokenize_to_shard(
    files: list[Path], tokenizer: PreTrainedTokenizerBase, target: Path, text_field: str, gutenberg: bool
) -> int:
    """Tokenize ``files`` into the ``.bin`` shard ``target`` (+ sidecar); returns the token count."""
    vocab = len(tokenizer)
    np_dtype = np.uint16 if vocab <= 2**16 else np.uint32
    # Documents are separated by EOS so the model learns document boundaries (GPT-2 convention).
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    sep_ids = [] if sep is None else [int(sep)]
    tmp = _tmp_name(target)
    count = 0
    # (text, ends_document): a large document arrives in pieces and only its last piece gets the separator.
    batch: list[tuple[str, bool]] = []
    with tmp.open("wb") as out:

        def flush() -> None:
            nonlocal count
            encoded = _encode_docs([text for text, _ in batch], tokenizer)
            for ids, (_, ends_doc) in zip(encoded, batch):
                arr = np.asarray(ids + sep_ids if ends_doc else ids, dtype=np_dtype)
                out.write(arr.tobytes())
                count += arr.size
            batch.clear()

        for doc in iter_documents(files, text_field=text_field, gutenberg=gutenberg):
            pieces = list(split_large_document(doc))
            batch.extend((piece, i == len(pieces) - 1) for i, piece in enumerate(pieces))
            if len(batch) >= _ENCODE_BATCH:
                flush()
        if batch:
            flush()
    if count == 0:
        tmp.unlink(missing_ok=True)
        where = files[0] if len(files) == 1 else files[0].parent
        raise DataError(f"{where}: no text found to tokenize")
    sidecar = {"dtype": np.dtype(np_dtype).name, "num_tokens": count, "vocab_size": vocab}
    # Sidecar first, then the data: a reader that finds the .bin always finds a matching sidecar.
    _atomic_write_bytes(target.with_name(target.name + ".json"), json.dumps(sidecar).encode())
    os.replace(tmp, target)
    return count


def _classify(path: Path) -> tuple[list[Path], list[Path]]:
    """Split a file or folder into (text/JSONL files, shard files), sorted; ignores sidecars and hidden files."""
    if path.is_file():
        candidates = [path]
    else:
        candidates = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    texts, shards = [], []
    for p in candidates:
        suffix = p.suffix.lower()
        if suffix in SHARD_SUFFIXES:
            shards.append(p)
        elif suffix in TEXT_SUFFIXES + JSONL_SUFFIXES and (suffix or path.is_file()):
            # Suffix-less files only when named directly: in a folder they are LICENSE, Makefile, ...
            texts.append(p)
        elif path.is_file():
            raise DataError(
                f"{p}: unsupported file type {p.suffix!r} "
                "(text: .txt/.text/.md, JSONL: .jsonl, shards: .bin + .json sidecar, .safetensors)"
            )
        # Inside a folder other files (sidecars, READMEs as .json, ...) are skipped.
    return texts, shards


def load_tokens(
    source: str | os.PathLike[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    text_field: str = "text",
) -> TokenStream:
    """Resolve ``source`` to a memory-mapped `TokenStream` (see module docstring for accepted sources).

    Text sources need ``tokenizer``; they are tokenized on first use and cached under ``<cache>/tokens/``
    keyed by the files' content hash and the tokenizer's fingerprint. Shards need no tokenizer; when one is
    given, a shard whose sidecar ``vocab_size`` exceeds it is rejected. Raises `DataError` on a missing path,
    an empty source, an unreadable format or a folder mixing text and shards.
    """
    if source is None or str(source) in _DEFAULT_NAMES:
        files, shards, gutenberg, label = default_corpus_files(), [], True, "shakespeare"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{path}: data path does not exist")
        files, shards = _classify(path)
        gutenberg, label = False, str(path)
        if files and shards:
            raise DataError(f"{path}: folder mixes text/JSONL files and token shards; use one kind")
        if not files and not shards:
            raise DataError(f"{path}: no text (.txt/.md), JSONL (.jsonl) or shard (.bin/.safetensors) files found")

    if shards:
        streams = [read_token_shard(p) for p in shards]
        declared = {s.vocab_size for s, p in zip(streams, shards) if _declares_vocab(p)}
        if len(declared) > 1:
            raise DataError(f"{label}: shards disagree on vocab_size ({sorted(declared)})")
        # the declared vocabulary, else the largest id any shard holds + 1
        vocab = declared.pop() if declared else max(s.vocab_size for s in streams)
        if tokenizer is not None and vocab is not None and vocab > len(tokenizer):
            raise DataError(f"{label}: shards need a vocabulary of {vocab} tokens (declared, or largest id + 1) > "
                            f"the tokenizer's {len(tokenizer)}")
        pieces = [piece for s in streams for piece in s.pieces]
        return TokenStream(pieces, vocab_size=vocab, source=label)

    if tokenizer is None:
        raise DataError(f"{label}: text data needs a tokenizer")
    key_src = json.dumps(
        {
            "version": _STREAM_VERSION,
            "files": files_fingerprint(files, content=True),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "field": text_field,
            "gutenberg": gutenberg,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    target = cache_root(cache_dir) / "tokens" / f"{key}.bin"
    if not (target.is_file() and target.with_name(target.name + ".json").is_file()):
        target.parent.mkdir(parents=True, exist_ok=True)
        _tokenize_to_shard(files, tokenizer, target, text_field, gutenberg)
    stream = read_token_shard(target)
    stream.source = label
    stream.vocab_size = len(tokenizer)
    return stream


# ----------------------------------------------------------------------------------------------- batching


def split_point(n_tokens: int, seq_len: int, val_fraction: float = 0.01, min_val_windows: int = 4) -> int:
    """Index where the held-out tail starts: train is ``[0, split)``, validation ``[split, n_tokens)``.

    The tail holds ``max(ceil(val_fraction * n_tokens), min_val_windows * seq_len + 1)`` tokens (enough
    for ``min_val_windows`` full windows), or nothing when ``val_fraction == 0``. Raises `DataError` when
    fewer than one training window (``seq_len + 1`` tokens) would remain.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(math.ceil(val_fraction * n_tokens), min_val_windows * seq_len + 1)
    split = n_tokens - n_val
    if split < seq_len + 1:
        raise DataError(
            f"token stream of {n_tokens} tokens is too short for seq_len {seq_len} with a "
            f"{n_val}-token validation tail (need at least {n_val + seq_len + 1})"
        )
    return split


class TokenBatcher:
    """Deterministic, resumable, data-parallel batches of fixed-length windows from a `TokenStream`.

    The training part of the stream (everything before the validation tail, see `split_point`) is cut into
    ``n_windows = (n_train - 1) // seq_len`` windows of ``seq_len + 1`` tokens at stride ``seq_len``
    (neighbours share one token: the last label of one is the first input of the next). Each epoch visits
    the windows in a fresh permutation drawn from a `torch.Generator` seeded by ``(seed, epoch)``; epochs
    follow each other seamlessly, so a batch may straddle an epoch boundary and nothing is dropped.

    Every step consumes one *global* batch of ``micro_batch * world_size`` windows; rank ``k`` gets rows
    ``[k * micro_batch, (k + 1) * micro_batch)`` of it. So N ranks with micro batch b see exactly the rows one
    device sees with batch N·b, and the position (``epoch``, ``cursor``) is the same on every rank.

    Yields ``(input_ids, labels)``, both int64 of shape ``[micro_batch, seq_len]`` with
    ``labels[:, t] == input_ids[:, t + 1]`` inside the window: labels are *already shifted*. Compute
    ``cross_entropy(logits.flatten(0, 1), labels.flatten())`` directly; do not pass them as ``labels=`` to a
    transformers model, which would shift them a second time.
    """

    def __init__(
        self,
        stream: TokenStream | np.ndarray | torch.Tensor,
        seq_len: int,
        micro_batch: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        val_fraction: float = 0.01,
        min_val_windows: int = 4,
    ) -> None:
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len and micro_batch must be positive, got {seq_len}, {micro_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.stream = stream if isinstance(stream, TokenStream) else TokenStream.from_array(stream)
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.n_train_tokens = split_point(len(self.stream), seq_len, val_fraction, min_val_windows)
        self.n_windows = (self.n_train_tokens - 1) // seq_len
        self.epoch = 0
        self.cursor = 0  # windows of the current epoch already consumed (globally, by all ranks together)
        self._perm_cache: dict[int, torch.Tensor] = {}

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        """Windows consumed per step across all ranks: ``micro_batch * world_size``."""
        return self.micro_batch * self.world_size

    @property
    def n_val_tokens(self) -> int:
        return len(self.stream) - self.n_train_tokens

    @property
    def tokens_per_step(self) -> int:
        """Training tokens (inputs) consumed per step by all ranks together."""
        return self.global_batch * self.seq_len

    # -- order -------------------------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        """Window order of ``epoch``: a permutation of ``range(n_windows)``, shape ``[n_windows]``."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            perm = torch.randperm(self.n_windows, generator=gen)
            # Keep at most two epochs: a batch never spans more than the current and the next few.
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k >= epoch - 1}
            self._perm_cache[epoch] = perm
        return perm

    def _window_ids(self, first: int, count: int) -> list[int]:
        """Window indices at global positions ``first .. first+count-1`` counted from the current epoch start."""
        ids = []
        for pos in range(first, first + count):
            epoch, offset = divmod(pos, self.n_windows)
            ids.append(int(self._perm(self.epoch + epoch)[offset]))
        return ids

    def _gather(self, window_ids: Sequence[int], seq_len: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack windows starting at ``base + i * seq_len``; returns inputs and labels, ``[len(ids), seq_len]``."""
        if not window_ids:
            empty = torch.empty(0, seq_len, dtype=torch.long)
            return empty, empty.clone()
        rows = np.stack([self.stream.slice(base + i * seq_len, base + i * seq_len + seq_len + 1) for i in window_ids])
        tokens = torch.from_numpy(rows.astype(np.int64))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    # -- training batches --------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(input_ids, labels)``, each ``[micro_batch, seq_len]`` int64; advances the position."""
        ids = self._window_ids(self.cursor + self.rank * self.micro_batch, self.micro_batch)
        batch = self._gather(ids, self.seq_len, base=0)
        epochs, self.cursor = divmod(self.cursor + self.global_batch, self.n_windows)
        self.epoch += epochs
        return batch

    def step_batches(self, grad_accum: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This rank's ``grad_accum`` micro-batches of the next optimizer step, and the number of loss tokens of
        the whole step over every rank (here every label counts: ``grad_accum × global_batch × seq_len``). The
        loop divides each rank's summed token loss by it, the same rule as the fine-tuning batcher's."""
        return [self.next_batch() for _ in range(grad_accum)], grad_accum * self.global_batch * self.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Data position (global, identical on every rank) plus what must match for it to be meaningful."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. The world size / micro batch may differ (the cursor counts windows), but the
        token stream and ``seq_len`` must be the same, or the cursor would point at different data."""
        if state["seq_len"] != self.seq_len or state["n_windows"] != self.n_windows:
            raise ValueError(
                f"data state is for seq_len {state['seq_len']} / {state['n_windows']} windows, this batcher has "
                f"seq_len {self.seq_len} / {self.n_windows} windows: the data or seq_len changed"
            )
        if not 0 <= state["cursor"] < self.n_windows or state["epoch"] < 0:
            raise ValueError(f"data state position epoch {state['epoch']} cursor {state['cursor']} out of range")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._perm_cache.clear()

    # -- validation --------------------------------------------------------------------------------
    def n_val_windows(self, seq_len: int | None = None) -> int:
        """Full validation windows of ``seq_len + 1`` tokens (stride ``seq_len``) in the held-out tail."""
        seq_len = seq_len or self.seq_len
        return max(0, (self.n_val_tokens - 1) // seq_len)

    def val_batches(
        self, batch: int, seq_len: int | None = None, *, shard: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic pass over the held-out tail, in stream order: ``(input_ids, labels)`` of shape
        ``[<= batch, seq_len]`` (the last batch may be short). Never touches the training position.

        ``shard=False``: every rank sees every window. ``shard=True``: global batches of ``batch * world_size``
        windows are split by rank like training batches; only full global batches are used, so every rank
        yields the same number of equally sized batches (safe for collectives in lockstep).
        """
        seq_len = seq_len or self.seq_len
        total = self.n_val_windows(seq_len)
        if shard:
            step = batch * self.world_size
            for start in range(0, total - step + 1, step):
                first = start + self.rank * batch
                yield self._gather(range(first, first + batch), seq_len, base=self.n_train_tokens)
        else:
            for start in range(0, total, batch):
                yield self._gather(range(start, min(start + batch, total)), seq_len, base=self.n_train_tokens)

    @classmethod
    def from_source(
        cls,
        source: str | os.PathLike[str] | None,
        tokenizer: PreTrainedTokenizerBase | None,
        seq_len: int,
        micro_batch: int,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        text_field: str = "text",
        **kwargs: Any,
    ) -> "TokenBatcher":
        """`load_tokens` then construct; ``kwargs`` go to the constructor (world_size, rank, seed, ...)."""
        stream = load_tokens(source, tokenizer, cache_dir=cache_dir, text_field=text_field)
        return cls(stream, seq_len, micro_batch, **kwargs)
