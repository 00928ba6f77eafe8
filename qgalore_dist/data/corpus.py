"""Text corpora: the embedded Shakespeare default, local text / JSONL files and folders; the cache directory.

Everything here yields *documents* (strings); tokenization and token caching live in `tokenizer` / `loader`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

from ..errors import DataError

__all__ = [
    "DataError",
    "TEXT_SUFFIXES",
    "JSONL_SUFFIXES",
    "cache_root",
    "default_corpus_files",
    "strip_gutenberg",
    "iter_documents",
    "list_text_files",
    "files_fingerprint",
    "split_large_document",
]

# A file without suffix is read as plain text too (e.g. `input`).
TEXT_SUFFIXES = (".txt", ".text", ".md", "")
# Only `.jsonl`: a bare `.json` is usually one JSON document (or a shard sidecar), not one record per line.
JSONL_SUFFIXES = (".jsonl",)

# package data: the *_gut.txt texts of the `shakespeare` 0.6 package (see its NOTICE for the origin and licence)
_CORPUS_DIR = "shakespeare"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache directory: the argument, else ``$QGALORE_CACHE``, else ``~/.cache/qgalore_dist``; created on demand."""
    if cache_dir is None:
        cache_dir = os.environ.get("QGALORE_CACHE") or Path.home() / ".cache" / "qgalore_dist"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_corpus_files() -> list[Path]:
    """The embedded default corpus: Shakespeare's works, one file per work, shipped as package data.

    They are the ``*_gut.txt`` texts (Gutenberg's modernised edition; 37 plays + 5 poems, ~5 MB) of the
    ``shakespeare`` 0.6 package, byte for byte, so names, sizes and contents — and with them the tokenizer and
    token-cache keys — are those of the package's texts. That package cannot be a dependency: its own declared
    dependencies no longer install.
    """
    texts = Path(str(resources.files(__package__).joinpath(_CORPUS_DIR)))
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"default corpus: no *_gut.txt texts under {texts} (package data of qgalore_dist); "
                        "reinstall qgalore_dist, or pass a local text/JSONL/shard path")
    return files


# Gutenberg boilerplate markers, old ("*END*THE SMALL PRINT!") and new ("*** START OF THE PROJECT ...") style.
_START_RE = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M | re.I)
_END_RE = re.compile(
    r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer if present (the shipped texts are mostly clean already)."""
    start = _START_RE.search(text)
    if start:
        text = text[start.end():]
    end = _END_RE.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def list_text_files(path: Path) -> list[Path]:
    """Files under ``path`` (a file or a folder, searched recursively, sorted) that hold text or JSONL."""
    if path.is_file():
        return [path]
    # Suffix-less files only when named directly: in a folder they are LICENSE, Makefile, ...
    wanted = set(TEXT_SUFFIXES + JSONL_SUFFIXES) - {""}
    return [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".") and _suffix(p) in wanted]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with handle:
        lineno = 0
        lines = iter(handle)
        while True:
            try:  # decoding happens while reading: binary garbage is a data error naming the line
                line = next(lines)
            except StopIteration:
                break
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason})") from exc
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({exc.msg})") from exc
            except RecursionError as exc:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from exc
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{lineno}: JSON record has no {field!r} field")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
            try:  # a JSON escape such as "\ud800" decodes to an unpaired surrogate, which no tokenizer takes
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise DataError(f"{path}:{lineno}: field {field!r} holds an unpaired surrogate ({text[exc.start]!r} "
                                f"at character {exc.start}), which is not text; fix the \\u escape") from exc
            if text:
                yield text


def iter_documents(files: Sequence[Path], text_field: str = "text", gutenberg: bool = False) -> Iterator[str]:
    """Yield documents: a whole text file is one document, a JSONL file gives one per line (``text_field``).

    ``gutenberg=True`` strips Project Gutenberg boilerplate from text files. Empty documents are skipped.
    """
    for path in files:
        if _suffix(path) in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, text_field)
        elif _suffix(path) in TEXT_SUFFIXES:
            text = _read_text(path)
            if gutenberg:
                text = strip_gutenberg(text)
            if text.strip():
                yield text
        else:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(text: .txt/.text/.md, JSONL: .jsonl, shards: .bin + .json sidecar, .safetensors)"
            )


_CHUNK_CHARS = 1 << 16  # 64 K characters: long documents encode no faster whole, and memory stays small
_CUT_RE = re.compile(r"(?<=\S)\n(?=\S)")


def split_large_document(doc: str) -> Iterator[str]:
    """Cut documents over ~64 K characters into pieces, right after a newline between two non-space characters.

    Byte-level (GPT-2 regex) pre-tokenisation makes such a newline a pre-token of its own, so the pieces
    pre-tokenise exactly as the whole document would — trained merges and token streams do not depend on the
    cut — while memory per tokenizer call stays bounded.
    """
    start = 0
    while len(doc) - start > _CHUNK_CHARS:
        match = _CUT_RE.search(doc, start + _CHUNK_CHARS - 1)
        if match is None:
            break  # no safe cut point left: keep the rest whole
        yield doc[start : match.end()]
        start = match.end()
    yield doc[start:]


def files_fingerprint(files: Sequence[Path], content: bool) -> str:
    """Hex digest identifying a file list: names + sizes, plus full contents when ``content`` is true.

    Names + sizes keys the tokenizer (training is cheap, the key must be stable across machines for the
    shipped corpus); content hashes key token caches, where a stale stream would silently corrupt training.
    """
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        if content:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
