"""Shared pytest configuration for qgalore_dist.

* Layout: ``tests/unit`` (math, codecs, hypothesis), ``tests/parity`` (placements and engines against the
  single-device reference, real gloo processes, world sizes 2 and 3), ``tests/e2e`` (the command line, Trainer,
  bad input). The shared builders and the rank workers (``helpers.py``, ``*_worker.py``) stay in ``tests/``, which
  is put on ``sys.path`` here.

* Hypothesis profiles: ``ci`` (no deadline, derandomized: identical examples every run) and ``dev``
  (no deadline, random). Selected by ``HYPOTHESIS_PROFILE``, else ``ci`` when ``CI`` is set, else ``dev``.
* ``load_galore_adamw()`` / the ``galore_adamw`` fixture: the test oracle ``galore_torch.adamw.AdamW``
  imported *without* running ``galore_torch/__init__.py`` (which imports bitsandbytes, not installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers and workers for tests in the subfolders

# --------------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------------
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a [test] extra
    settings = None

if settings is not None:
    settings.register_profile(
        "ci",
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile("dev", deadline=None)

    def _is_ci() -> bool:
        return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

    _profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _is_ci() else "dev")
    settings.load_profile(_profile)


def pytest_report_header(config):
    if settings is None:
        return None
    return f"hypothesis profile: {settings.get_current_profile_name()}"


# --------------------------------------------------------------------------------------------------
# GaLore oracle loader
# --------------------------------------------------------------------------------------------------
_GALORE_PKG = "galore_torch"


def _galore_package_dir() -> Path | None:
    """Directory of the installed ``galore_torch`` package, found without importing it."""
    mod = sys.modules.get(_GALORE_PKG)
    if mod is not None and getattr(mod, "__path__", None):
        return Path(list(mod.__path__)[0])
    try:
        spec = importlib.util.find_spec(_GALORE_PKG)  # top-level: does not execute __init__.py
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    for entry in sys.path:  # fallback: plain scan of sys.path (site-packages)
        candidate = Path(entry or ".") / _GALORE_PKG
        if (candidate / "adamw.py").is_file():
            return candidate
    return None


def load_galore_adamw():
    """Return ``galore_torch.adamw.AdamW`` (GaLoreAdamW) without executing ``galore_torch/__init__.py``.

    A bare package module is registered under ``galore_torch`` with the installed ``__path__`` so that
    ``galore_torch.adamw``'s relative import of ``.galore_projector`` resolves. Calls ``pytest.skip`` when
    galore-torch is not installed.
    """
    pkg_dir = _galore_package_dir()
    if pkg_dir is None or not (pkg_dir / "adamw.py").is_file():
        pytest.skip("galore-torch (test oracle) is not installed: pip install --no-deps galore-torch==1.0")
    adamw_mod = sys.modules.get(f"{_GALORE_PKG}.adamw")
    if adamw_mod is None:
        pkg = sys.modules.get(_GALORE_PKG)
        if pkg is None:
            pkg = types.ModuleType(_GALORE_PKG)
            pkg.__path__ = [str(pkg_dir)]
            pkg.__file__ = None
            pkg.__package__ = _GALORE_PKG
            pkg.__spec__ = importlib.util.spec_from_loader(_GALORE_PKG, loader=None, is_package=True)
            pkg.__spec__.submodule_search_locations = [str(pkg_dir)]
            sys.modules[_GALORE_PKG] = pkg
        adamw_mod = importlib.import_module(f"{_GALORE_PKG}.adamw")
    return adamw_mod.AdamW


@pytest.fixture(scope="session")
def galore_adamw():
    """The GaLoreAdamW class (``galore_torch.adamw.AdamW``); skips if galore-torch is missing."""
    return load_galore_adamw()


# --------------------------------------------------------------------------------------------------
# Command-line tests (tests/e2e): one workspace per module
# --------------------------------------------------------------------------------------------------
CLI_VOCAB = 512


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory):
    """Corpus (the embedded sonnets), a small tokenizer trained once on it and saved, and the tokenizer cache:
    the workspace of a command-line test module."""
    import shutil
    from types import SimpleNamespace

    from qgalore_dist.data import default_corpus_files, get_tokenizer

    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    corpus = root / "sonnets.txt"
    shutil.copy(next(p for p in default_corpus_files() if p.name.startswith("sonnets")), corpus)
    tok = get_tokenizer(vocab_size=CLI_VOCAB, corpus=corpus, cache_dir=cache)
    tok.save_pretrained(str(root / "tok"))
    return SimpleNamespace(root=root, cache=cache, corpus=corpus, tok=root / "tok")


@pytest.fixture(autouse=True)
def _cli_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """For a test using ``ws``: its tokenizer cache, and one intra-op thread (tiny models gain nothing from
    threads, and on a shared 2-core machine OpenMP threads of an oversubscribed process spin and slow every op
    down ~10x)."""
    if "ws" not in request.fixturenames:
        yield
        return
    import torch

    monkeypatch.setenv("QGALORE_CACHE", str(request.getfixturevalue("ws").cache))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
