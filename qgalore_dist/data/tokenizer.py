"""Tokenizers: a byte-level BPE trained offline on the corpus (cached), or a local tokenizer directory.

The trained tokenizer is returned as a `transformers.PreTrainedTokenizerFast`, so it can be saved next to an
exported model with ``save_pretrained``. Its only special token is ``<|endoftext|>`` (id 0), used as BOS, EOS,
document separator and padding.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from qgalore_dist.data.corpus import (
    DataError,
    cache_root,
    default_corpus_files,
    files_fingerprint,
    iter_documents,
    list_text_files,
    split_large_document,
)

__all__ = ["EOT_TOKEN", "DEFAULT_VOCAB_SIZE", "get_tokenizer", "train_bpe", "tokenizer_fingerprint"]

EOT_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
# Bump when the training recipe changes, so old cache entries are not reused.
_RECIPE_VERSION = "bpe-bytelevel-v1"
_DEFAULT_NAMES = ("default", "shakespeare")


def _train_chunks(files: Sequence[Path], gutenberg: bool) -> Iterator[str]:
    for doc in iter_documents(files, gutenberg=gutenberg):
        yield from split_large_document(doc)


def train_bpe(files: Sequence[Path], vocab_size: int, gutenberg: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, all 256 bytes in the alphabet) on ``files``.

    Byte-level means any input text encodes without unknown tokens. ~2 s for the 5 MB default corpus.
    """
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must exceed 257 (256 bytes + {EOT_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_train_chunks(files, gutenberg), trainer=trainer)
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        unk_token=None,
        model_max_length=1 << 30,  # sequence length is the model's business, not the tokenizer's
    )


def _load_dir(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a loadable tokenizer directory ({str(exc).splitlines()[0]})") from exc


def _load_file(path: Path) -> PreTrainedTokenizerFast:
    # A bare `tokenizers` JSON file carries no special-token roles; assume this package's convention.
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception on malformed files
        raise DataError(f"{path}: not a tokenizers JSON file ({str(exc).splitlines()[0]})") from exc
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30)
    if tok.token_to_id(EOT_TOKEN) is not None:
        wrapped.add_special_tokens({"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": EOT_TOKEN})
    return wrapped


def _trained_tokenizer(
    files: Sequence[Path], vocab_size: int, cache_dir: str | os.PathLike[str] | None, gutenberg: bool
) -> PreTrainedTokenizerFast:
    key_src = json.dumps(
        {"recipe": _RECIPE_VERSION, "vocab": vocab_size, "files": files_fingerprint(files, content=False),
         "gutenberg": gutenberg},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key}"
    if not (target / "tokenizer.json").is_file():
        tok = train_bpe(files, vocab_size, gutenberg=gutenberg)
        # Write to a private temp dir, then rename: several ranks may train concurrently; the first rename
        # wins and everyone loads the winner below, so all ranks use byte-identical tokenizers.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        _wrap(tok).save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def get_tokenizer(
    spec: str | os.PathLike[str] | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: str | os.PathLike[str] | None = None,
    corpus: str | os.PathLike[str] | Sequence[os.PathLike[str]] | None = None,
) -> PreTrainedTokenizerBase:
    """Return a tokenizer.

    * ``spec`` is a local tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json`` ...) or a bare
      ``tokenizer.json`` file (``<|endoftext|>``, when present, becomes BOS/EOS/pad): load it.
    * ``spec`` is None / ``"default"`` / ``"shakespeare"``: a byte-level BPE of ``vocab_size`` trained on
      ``corpus`` (a text/JSONL file, a folder of them, or a list of files; default: the embedded Shakespeare
      corpus), cached under ``<cache>/tokenizers/`` keyed by the file list and vocab size, so only the first
      call trains.
    """
    if spec is not None and str(spec) not in _DEFAULT_NAMES:
        path = Path(spec).expanduser()
        if path.is_dir():
            return _load_dir(path)
        if path.is_file() and path.suffix == ".json":
            return _load_file(path)
        if path.exists():
            raise DataError(f"{path}: expected a tokenizer directory or a tokenizer.json file")
        raise DataError(f"{path}: tokenizer path does not exist")

    gutenberg = corpus is None
    if corpus is None:
        files = default_corpus_files()
    elif isinstance(corpus, (str, os.PathLike)):
        root = Path(corpus).expanduser()
        if not root.exists():
            raise DataError(f"{root}: tokenizer training corpus does not exist")
        files = list_text_files(root)
    else:
        files = [Path(f).expanduser() for f in corpus]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: tokenizer training file does not exist")
    if not files:
        raise DataError(f"{corpus}: no text or JSONL files to train a tokenizer on")
    return _trained_tokenizer(files, vocab_size, cache_dir, gutenberg)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable hex digest of a tokenizer's behaviour (its serialised pipeline), for keying token caches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizer: the vocabulary is the best cheap proxy
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    blob += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
