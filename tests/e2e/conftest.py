"""What the command-line tests share: a workspace with the embedded sonnets as corpus and a small tokenizer trained
once on it (``ws``), and, for every test that uses it, the tokenizer cache and one intra-op thread."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from qgalore_dist.data import default_corpus_files, get_tokenizer

VOCAB = 512


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Corpus, cache and tokenizer shared by a module (the tokenizer is trained once here)."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    corpus = root / "sonnets.txt"
    shutil.copy(next(p for p in default_corpus_files() if p.name.startswith("sonnets")), corpus)
    tok = get_tokenizer(vocab_size=VOCAB, corpus=corpus, cache_dir=cache)
    tok.save_pretrained(str(root / "tok"))
    return SimpleNamespace(root=root, cache=cache, corpus=corpus, tok=root / "tok")


@pytest.fixture(autouse=True)
def _cli_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads of an
    oversubscribed process spin and slow every op down ~10x; the tokenizer cache is the workspace's."""
    if "ws" in request.fixturenames:
        monkeypatch.setenv("QGALORE_CACHE", str(request.getfixturevalue("ws").cache))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
