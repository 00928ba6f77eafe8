"""Corpus, tokenizer cache, data formats and `TokenBatcher` semantics (CPU, ~15 s: one BPE training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import qgalore_dist.data.loader as loader_mod
import qgalore_dist.data.tokenizer as tokenizer_mod
from qgalore_dist.data import (
    EOT_TOKEN,
    DataError,
    TokenBatcher,
    TokenStream,
    cache_root,
    default_corpus_files,
    get_tokenizer,
    load_tokens,
    read_token_shard,
    split_point,
    strip_gutenberg,
    write_token_shard,
)

VOCAB = 512


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qgalore_cache")


@pytest.fixture(scope="session")
def tok(cache: Path):
    """The default BPE on the embedded corpus, small vocab: trained once for the whole session (~2 s)."""
    return get_tokenizer(vocab_size=VOCAB, cache_dir=cache)


@pytest.fixture
def small_corpus(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stand the embedded corpus down to its five poems (~250 KB) so tokenizing it stays fast."""
    poems = [
        p for p in default_corpus_files()
        if p.stem.split("_gut")[0] in {"sonnets", "lovers_complaint", "phoenix_and_the_turtle", "passionate_pilgrim"}
    ]
    monkeypatch.setattr(loader_mod, "default_corpus_files", lambda: poems)
    return poems


def _positions(n: int) -> TokenStream:
    # Token value == its position: makes "which tokens did a batch come from" directly checkable.
    return TokenStream.from_array(np.arange(n, dtype=np.uint32))


# ---------------------------------------------------------------------------------------------- corpus


def test_default_corpus_one_variant_per_work() -> None:
    files = default_corpus_files()
    names = [f.name for f in files]
    assert len(files) == 42  # 37 plays + 5 poems
    assert not any(n.endswith("_gut_f.txt") for n in names)
    assert "hamlet_gut.txt" in names and "sonnets_gut.txt" in names
    assert all(f.stat().st_size > 0 for f in files)


def test_missing_corpus_package_data_explains_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    import qgalore_dist.data.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "_CORPUS_DIR", "no_such_folder")
    with pytest.raises(DataError, match=r"no \*_gut\.txt texts under .*no_such_folder.*reinstall qgalore_dist"):
        default_corpus_files()


def test_strip_gutenberg() -> None:
    text = (
        "licence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line.\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nfooter"
    )
    assert strip_gutenberg(text) == "Body line.\n"
    assert strip_gutenberg("plain text\n") == "plain text\n"


def test_cache_root_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QGALORE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tok) -> None:
    assert len(tok) == VOCAB
    assert tok.eos_token == EOT_TOKEN and tok.convert_tokens_to_ids(EOT_TOKEN) == 0
    text = "To be, or not to be: that is the question.\n\nÜber naïve 日本 €"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: no unknowns, exact round trip


def test_tokenizer_cached_not_retrained(tok, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer retrained despite a cache entry")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    again = get_tokenizer(vocab_size=VOCAB, cache_dir=cache)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(AssertionError, match="retrained"):  # a different vocab size is a different key
        get_tokenizer(vocab_size=VOCAB + 8, cache_dir=cache)


def test_tokenizer_env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    monkeypatch.setenv("QGALORE_CACHE", str(tmp_path / "cache"))
    small = get_tokenizer(vocab_size=300, corpus=corpus)
    assert len(small) <= 300
    assert list((tmp_path / "cache" / "tokenizers").iterdir())


def test_tokenizer_directory_roundtrip(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    loaded = get_tokenizer(tmp_path / "tok")
    text = "Now is the winter of our discontent"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    from_file = get_tokenizer(tmp_path / "tok" / "tokenizer.json")  # a bare tokenizers file works too
    assert from_file(text)["input_ids"] == tok(text)["input_ids"] and from_file.eos_token_id == 0
    with pytest.raises(DataError, match="does not exist"):
        get_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- formats


def _doc_tokens(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_text_file_and_token_cache(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    path.write_text("Friends, Romans, countrymen, lend me your ears.\n")
    stream = load_tokens(path, tok, cache_dir=tmp_path / "cache")
    assert stream.slice(0, len(stream)).tolist() == _doc_tokens(tok, [path.read_text()])
    assert stream.vocab_size == VOCAB

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("re-tokenized despite a cached stream")

    monkeypatch.setattr(loader_mod, "_tokenize_to_shard", no_tokenizing)
    assert len(load_tokens(path, tok, cache_dir=tmp_path / "cache")) == len(stream)
    path.write_text("Different content now.\n")  # content hash changes: the cache must not be reused
    with pytest.raises(AssertionError, match="re-tokenized"):
        load_tokens(path, tok, cache_dir=tmp_path / "cache")


def test_jsonl_and_folder(tok, tmp_path: Path) -> None:
    docs = ["First record.", "Second record, longer than the first."]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    (tmp_path / "d" / "a.txt").write_text("A plain file.")
    (tmp_path / "d" / "notes.json").write_text("{}")  # not data files: skipped inside folders
    (tmp_path / "d" / "LICENSE").write_text("licence text")
    jsonl = load_tokens(tmp_path / "d" / "b.jsonl", tok, cache_dir=tmp_path / "cache")
    assert jsonl.slice(0, len(jsonl)).tolist() == _doc_tokens(tok, docs)
    folder = load_tokens(tmp_path / "d", tok, cache_dir=tmp_path / "cache")  # sorted: a.txt then b.jsonl
    assert folder.slice(0, len(folder)).tolist() == _doc_tokens(tok, ["A plain file."] + docs)


def test_default_source(tok, small_corpus: list[Path], cache: Path) -> None:
    stream = load_tokens(None, tok, cache_dir=cache)
    expected = sum(
        len(tok(p.read_text().strip() + "\n", add_special_tokens=False)["input_ids"]) + 1 for p in small_corpus
    )
    assert len(stream) == expected
    assert stream.pieces[0].dtype == np.uint16
    assert isinstance(stream.pieces[0], np.memmap)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_shard(tmp_path: Path, dtype: str) -> None:
    tokens = np.arange(1000) % 700
    write_token_shard(tmp_path / "s.bin", tokens, dtype=dtype, vocab_size=700)
    assert json.loads((tmp_path / "s.bin.json").read_text())["dtype"] == dtype
    stream = load_tokens(tmp_path / "s.bin")
    assert stream.vocab_size == 700 and stream.pieces[0].dtype == np.dtype(dtype)
    assert np.array_equal(stream.slice(0, 1000), tokens)


def test_bin_shard_with_stem_sidecar(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(np.arange(10, dtype=np.uint32).tobytes())
    (tmp_path / "x.json").write_text('{"dtype": "uint32"}')
    assert read_token_shard(tmp_path / "x.bin").slice(3, 6).tolist() == [3, 4, 5]


def test_safetensors_shard_and_shard_folder(tmp_path: Path) -> None:
    write_token_shard(tmp_path / "shards" / "000.safetensors", np.arange(0, 50), vocab_size=100)
    save_file({"tokens": np.arange(50, 80, dtype=np.int32)}, str(tmp_path / "shards" / "001.safetensors"))
    write_token_shard(tmp_path / "shards" / "002.bin", np.arange(80, 100))
    one = load_tokens(tmp_path / "shards" / "000.safetensors")
    assert one.vocab_size == 100 and one.slice(0, 50).tolist() == list(range(50))
    stream = load_tokens(tmp_path / "shards")  # the sidecar 002.bin.json is not mistaken for data
    assert len(stream.pieces) == 3
    assert stream.slice(0, 100).tolist() == list(range(100))
    assert stream.slice(45, 85).tolist() == list(range(45, 85))  # across piece boundaries
    assert stream.slice(7, 7).size == 0
    assert all(isinstance(piece, np.memmap) for piece in stream.pieces)  # nothing read into RAM up front


def _bad_source(kind: str, root: Path) -> Path:
    path = root / kind
    if kind == "missing":
        return root / "does_not_exist.txt"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "empty_text":
        path = root / "empty.txt"
        path.write_text("   \n")
    elif kind == "suffix":
        path = root / "data.parquet"
        path.write_bytes(b"PAR1")
    elif kind == "no_sidecar":
        path = root / "t.bin"
        path.write_bytes(b"\x00\x01" * 8)
    elif kind == "odd_size":
        path = root / "t.bin"
        path.write_bytes(b"\x00\x01\x02")
        (root / "t.bin.json").write_text('{"dtype": "uint16"}')
    elif kind == "bad_dtype":
        path = root / "t.bin"
        path.write_bytes(b"\x00" * 8)
        (root / "t.bin.json").write_text('{"dtype": "float32"}')
    elif kind == "bad_jsonl":
        path = root / "t.jsonl"
        path.write_text('{"text": "ok"}\n{not json\n')
    elif kind == "jsonl_field":
        path = root / "t.jsonl"
        path.write_text('{"content": "no text field"}\n')
    elif kind == "no_tokens_tensor":
        path = root / "t.safetensors"
        save_file({"ids": np.arange(4, dtype=np.int64)}, str(path))
    elif kind == "corrupt_safetensors":
        path = root / "t.safetensors"
        path.write_bytes(b"\xff" * 16)
    elif kind == "mixed":
        path.mkdir()
        (path / "a.txt").write_text("text")
        write_token_shard(path / "b.bin", np.arange(4))
    elif kind == "binary_text":
        path = root / "t.txt"
        path.write_bytes(b"\xff\xfe\x00bad")
    return path


@pytest.mark.parametrize(
    "kind",
    ["missing", "empty_dir", "empty_text", "suffix", "no_sidecar", "odd_size", "bad_dtype", "bad_jsonl",
     "jsonl_field", "no_tokens_tensor", "corrupt_safetensors", "mixed", "binary_text"],
)
def test_bad_sources_raise_data_error(kind: str, tok, tmp_path: Path) -> None:
    path = _bad_source(kind, tmp_path)
    with pytest.raises(DataError) as info:
        load_tokens(path, tok, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------- batching


def test_batch_shapes_and_shift() -> None:
    batcher = TokenBatcher(_positions(5000), seq_len=16, micro_batch=4, seed=3)
    x, y = batcher.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # labels are the next tokens (positions here)
    assert torch.all(x[:, 0] % 16 == 0)  # windows start at multiples of seq_len


def test_epoch_visits_every_window_once_and_wraps() -> None:
    batcher = TokenBatcher(_positions(1000), seq_len=10, micro_batch=7, seed=0, val_fraction=0.0)
    n = batcher.n_windows  # 99 windows; 7 does not divide it, so batches straddle epoch boundaries
    starts = [int(s) for _ in range(2 * n // 7 + 1) for s in batcher.next_batch()[0][:, 0]]
    first, second = starts[:n], starts[n : 2 * n]
    assert sorted(first) == sorted(second) == [10 * i for i in range(n)]
    assert first != second  # a fresh permutation per epoch
    assert batcher.epoch == 2


def test_seed_determinism() -> None:
    a = TokenBatcher(_positions(4000), 8, 4, seed=11)
    b = TokenBatcher(_positions(4000), 8, 4, seed=11)
    c = TokenBatcher(_positions(4000), 8, 4, seed=12)
    xa, xb, xc = (torch.cat([bt.next_batch()[0] for _ in range(5)]) for bt in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_rank_slicing_equals_single_device() -> None:
    stream = _positions(3000)
    micro, world, steps = 3, 2, 40  # 40 steps * 6 windows > 1 epoch of 29x windows: wraps too
    single = TokenBatcher(stream, 10, micro * world, seed=5)
    ranks = [TokenBatcher(stream, 10, micro, world_size=world, rank=r, seed=5) for r in range(world)]
    for _ in range(steps):
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert all(r.state_dict() == {**single.state_dict(), "global_batch": micro * world} for r in ranks)


def test_resume_gives_identical_batches() -> None:
    stream = _positions(2000)
    original = TokenBatcher(stream, 12, 5, seed=9)
    for _ in range(30):  # past an epoch boundary (157 windows / 5 per step)
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch() for _ in range(10)]

    resumed = TokenBatcher(stream, 12, 5, seed=0)  # the seed travels with the state
    resumed.load_state_dict(json.loads(json.dumps(state)))  # must survive JSON (checkpoint metadata)
    for want, got in zip(expected, (resumed.next_batch() for _ in range(10))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])

    # Resharding the same global batch over two ranks continues the same data.
    halves = [TokenBatcher(stream, 12, 5, world_size=2, rank=r) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    single = TokenBatcher(stream, 12, 10)
    single.load_state_dict(state)
    assert torch.equal(single.next_batch()[0], torch.cat([h.next_batch()[0] for h in halves]))

    with pytest.raises(ValueError, match="seq_len"):
        TokenBatcher(stream, 16, 5).load_state_dict(state)


def test_validation_split_disjoint_and_deterministic() -> None:
    n = 20_000
    batcher = TokenBatcher(_positions(n), seq_len=32, micro_batch=8, seed=1)
    split = batcher.n_train_tokens
    assert split == split_point(n, 32) and n - split == 200  # 1% tail (more than 4 windows' worth)
    train_max = max(int(torch.max(torch.cat(batcher.next_batch()))) for _ in range(100))
    assert train_max < split
    val = list(batcher.val_batches(4))
    val_tokens = torch.cat([torch.cat(b) for b in val])
    assert int(val_tokens.min()) >= split
    assert sum(b[0].shape[0] for b in val) == batcher.n_val_windows() == (200 - 1) // 32
    again = list(batcher.val_batches(4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, again))

    # Tiny streams still hold out at least `min_val_windows` windows.
    small = TokenBatcher(_positions(1000), seq_len=32, micro_batch=2, min_val_windows=4)
    assert small.n_val_windows() >= 4


def test_val_batches_sharded() -> None:
    stream = _positions(50_000)
    ranks = [TokenBatcher(stream, 16, 4, world_size=2, rank=r, seed=0) for r in range(2)]
    full = list(ranks[0].val_batches(8))
    sharded = [list(r.val_batches(4, shard=True)) for r in ranks]
    assert len(sharded[0]) == len(sharded[1]) == ranks[0].n_val_windows() // 8
    for step, (a, b) in enumerate(zip(*sharded)):
        assert torch.equal(full[step][0], torch.cat([a[0], b[0]]))


def test_too_short_stream_raises() -> None:
    with pytest.raises(DataError, match="too short"):
        TokenBatcher(_positions(50), seq_len=32, micro_batch=1)


def test_end_to_end_text_batches(tok, small_corpus: list[Path], cache: Path) -> None:
    ranks = [
        TokenBatcher.from_source(None, tok, 64, 2, cache_dir=cache, world_size=2, rank=r, seed=0) for r in range(2)
    ]
    single = TokenBatcher.from_source("shakespeare", tok, 64, 4, cache_dir=cache, seed=0)
    x, _ = single.next_batch()
    assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))
    assert int(x.max()) < len(tok)
