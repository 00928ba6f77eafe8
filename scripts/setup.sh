#!/usr/bin/env bash
# Idempotent CPU set-up for qgalore_dist: system MPI, .venv, pinned CPU torch, DeepSpeed with its CPU
# shared-memory communication op prebuilt, mpi4py built against the system Open MPI, the package itself
# (editable) and the test-only oracle (galore-torch). The embedded corpus is package data
# (qgalore_dist/data/shakespeare).
#
#   bash scripts/setup.sh            (or: make setup)
#
# Environment knobs:
#   VENV=path                 virtual environment to use/create (default: <repo>/.venv)
#   PYTHON=python3            interpreter used to create the venv
#   SKIP_APT=1                never call apt-get
#   ALLOW_CUDA_TORCH=1        allow pip to pick a non-CPU torch build (multi-GB download; off by default)
#   MPI4PY_CFLAGS             extra CFLAGS for the mpi4py source build (default "-O1 -g0")
#   TORCH_EXTENSIONS_DIR      where a JIT-compiled DeepSpeed op would go (default: <repo>/.cache/torch_extensions)
#
# Every pip call passes -c constraints.txt: an unconstrained torch resolves to a multi-GB CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints.txt"
TORCH_SPEC="torch==2.13.0"
DEEPSPEED_SPEC="deepspeed>=0.19,<0.20"
MPI4PY_SPEC="mpi4py>=3.1"
GALORE_SPEC="galore-torch==1.0"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_PROGRESS_BAR="${PIP_PROGRESS_BAR:-off}"

log()  { printf '\n[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '\n[setup WARNING] %s\n' "$*" >&2; }
die()  { printf '\n[setup ERROR] %s\n' "$*" >&2; exit 1; }

[ -f "$CONSTRAINTS" ] || die "missing $CONSTRAINTS"

# ---------------------------------------------------------------------------------------------------
# 1. System packages: Open MPI (mpirun + headers/mpicc, needed to build mpi4py).
# ---------------------------------------------------------------------------------------------------
have_mpi() {
    command -v mpirun >/dev/null 2>&1 || return 1
    command -v mpicc >/dev/null 2>&1 || return 1
    local inc
    for inc in $(mpicc -showme:incdirs 2>/dev/null) /usr/include /usr/lib/x86_64-linux-gnu/openmpi/include; do
        [ -f "$inc/mpi.h" ] && return 0
    done
    return 1
}

if have_mpi; then
    log "Open MPI present: $(mpirun --version 2>/dev/null | head -n1)"
elif [ "${SKIP_APT:-0}" = 1 ]; then
    warn "Open MPI (mpirun/mpicc/mpi.h) missing and SKIP_APT=1: mpi4py will not be installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing openmpi-bin libopenmpi-dev with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    log "installing openmpi-bin libopenmpi-dev with sudo apt-get"
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -q
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openmpi-bin libopenmpi-dev
else
    warn "Open MPI missing and cannot apt-get install it (not root / no apt): mpi4py will not be installed." \
         "Install openmpi-bin libopenmpi-dev (or any MPI with mpicc) and re-run."
fi
MPI_OK=0
if have_mpi; then MPI_OK=1; fi

# ---------------------------------------------------------------------------------------------------
# 2. Virtual environment.
# ---------------------------------------------------------------------------------------------------
PY="$VENV/bin/python"
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' >/dev/null 2>&1; then
    log "creating venv $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
        || die "$PYTHON is older than 3.10"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip_c() { "$PY" -m pip install -c "$CONSTRAINTS" "$@"; }

# Build tools used by --no-build-isolation (DeepSpeed) builds.
if ! "$PY" -c 'import setuptools, wheel, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' >/dev/null 2>&1; then
    log "upgrading setuptools/wheel in the venv"
    pip_c -q "setuptools>=68" wheel
fi

# ---------------------------------------------------------------------------------------------------
# 3. torch: the pinned CPU wheel (lies on local disk via pip's find-links on these machines).
# ---------------------------------------------------------------------------------------------------
if "$PY" -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0"' >/dev/null 2>&1; then
    log "torch present: $("$PY" -c 'import torch; print(torch.__version__)')"
else
    if [ "${ALLOW_CUDA_TORCH:-0}" != 1 ]; then
        # Resolve first and refuse anything that is not a CPU build: a CUDA torch is gigabytes.
        report="$(mktemp)"
        "$PY" -m pip install -q -c "$CONSTRAINTS" --dry-run --ignore-installed --no-deps \
            --report "$report" "$TORCH_SPEC" >/dev/null
        url="$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["install"][0]["download_info"]["url"])' "$report")"
        rm -f "$report"
        case "$url" in
            *cpu*) log "torch will come from $url" ;;
            *) die "pip would install torch from $url, which is not a CPU build (multi-GB CUDA wheels)." \
                   "Put the CPU wheel on pip's find-links (e.g. PIP_FIND_LINKS=/opt/wheels), or" \
                   "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu, or set ALLOW_CUDA_TORCH=1." ;;
        esac
    fi
    log "installing $TORCH_SPEC"
    pip_c "$TORCH_SPEC"
fi

# ---------------------------------------------------------------------------------------------------
# 4. DeepSpeed with the CPU shared-memory comm op prebuilt (no JIT compile on the first run).
# ---------------------------------------------------------------------------------------------------
# Exit 0: op prebuilt in the install; 3: deepspeed imports but op not prebuilt; other: no deepspeed.
DS_CHECK='
import importlib, sys
try:
    import deepspeed
except Exception:
    sys.exit(2)
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops, accelerator_name
b = get_accelerator().create_op_builder("ShareMemCommBuilder")
if b is None:
    sys.exit(4)
if not (installed_ops.get(b.NAME, False) and accelerator_name == get_accelerator()._name):
    sys.exit(3)
importlib.import_module(b.absolute_name())   # the prebuilt .so, no compiler involved
m = b.load()
assert m.__name__ == b.absolute_name(), m
print("deepspeed", deepspeed.__version__, "accelerator", accelerator_name, "prebuilt op", b.absolute_name())
'
ds_check() { ds_status=0; "$PY" -c "$DS_CHECK" "$@" || ds_status=$?; }
ds_check >/dev/null 2>&1
if [ "$ds_status" = 0 ]; then
    log "DeepSpeed present with prebuilt shm comm op"
else
    # Without build isolation so DeepSpeed's setup.py sees torch. First try may reuse pip's wheel cache
    # (fast on a machine that built it before); if that wheel lacks the op or was built against another
    # torch, rebuild with --no-cache-dir.
    for cache_opt in "" "--no-cache-dir"; do
        if [ "$ds_status" != 2 ]; then "$PY" -m pip uninstall -y -q deepspeed; fi
        log "installing $DEEPSPEED_SPEC with DS_BUILD_SHM_COMM=1 $cache_opt (compiles the CPU shm comm op, ~2 min)"
        DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 \
            pip_c --no-build-isolation $cache_opt "$DEEPSPEED_SPEC" \
            || warn "DeepSpeed build with DS_BUILD_SHM_COMM=1 failed"
        ds_check
        if [ "$ds_status" = 0 ]; then break; fi
    done
    if [ "$ds_status" = 2 ]; then
        warn "prebuilt DeepSpeed install failed; installing it plainly (the op will be JIT-compiled)"
        pip_c "$DEEPSPEED_SPEC"
        ds_check
    fi
fi
if [ "$ds_status" = 3 ]; then
    # Fallback: JIT-compile once now into the per-repo TORCH_EXTENSIONS_DIR (the Makefile exports the same).
    log "pre-warming DeepSpeed shm comm op into $TORCH_EXTENSIONS_DIR"
    mkdir -p "$TORCH_EXTENSIONS_DIR"
    "$PY" -c 'from deepspeed.accelerator import get_accelerator as g; g().create_op_builder("ShareMemCommBuilder").load(verbose=False)'
elif [ "$ds_status" != 0 ]; then
    die "DeepSpeed is not usable (check exit $ds_status)"
fi

# ---------------------------------------------------------------------------------------------------
# 5. mpi4py, compiled against the system Open MPI (never the binary wheel).
# ---------------------------------------------------------------------------------------------------
MPI_CHECK='
import mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI
v = MPI.Get_library_version()
assert "Open MPI" in v, v
print(mpi4py.__version__, v.splitlines()[0])
'
EXTRAS="test,distributed,bench"
if [ "$MPI_OK" = 1 ]; then
    if "$PY" -c "$MPI_CHECK" >/dev/null 2>&1; then
        log "mpi4py present: $("$PY" -c "$MPI_CHECK")"
    else
        log "building mpi4py from source against $(command -v mpicc)"
        # mpi4py is one huge generated C file: -O1 -g0 (appended to Python's -O3 -g) builds it in
        # about half the time; it is only a thin wrapper, so speed does not suffer where it matters.
        MPICC="$(command -v mpicc)" CFLAGS="${MPI4PY_CFLAGS--O1 -g0}" \
            pip_c --no-binary mpi4py --force-reinstall --no-deps "$MPI4PY_SPEC"
        "$PY" -c "$MPI_CHECK"
    fi
else
    warn "skipping mpi4py (no MPI); installing extras [test] only"
    EXTRAS="test,bench"
fi

# ---------------------------------------------------------------------------------------------------
# 6. The package itself (editable) + extras; torch/deepspeed/mpi4py are already satisfied.
# ---------------------------------------------------------------------------------------------------
log "installing qgalore_dist -e .[$EXTRAS]"
pip_c -e ".[$EXTRAS]"

# ---------------------------------------------------------------------------------------------------
# 7. Test-only oracle. Its declared deps are obsolete/unneeded: --no-deps.
# ---------------------------------------------------------------------------------------------------
if ! "$PY" -c 'import importlib.metadata as m; assert m.version("galore-torch") == "1.0"' >/dev/null 2>&1; then
    log "installing $GALORE_SPEC (--no-deps)"
    pip_c --no-deps "$GALORE_SPEC"
fi

# ---------------------------------------------------------------------------------------------------
# 8. Final checks.
# ---------------------------------------------------------------------------------------------------
log "verifying"
"$PY" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.version.cuda is None or __import__("os").environ.get("ALLOW_CUDA_TORCH") == "1", \
    f"torch {torch.__version__} is a CUDA build"
print("torch", torch.__version__, "threads", torch.get_num_threads())
for name in ("transformers", "tokenizers", "safetensors", "pytest", "hypothesis", "build", "galore-torch"):
    print(f"{name:13s}", md.version(name))
import qgalore_dist  # noqa: F401  (editable install resolves)
EOF
"$PY" -c "$DS_CHECK" || [ "$ds_status" = 3 ]
if [ "$MPI_OK" = 1 ]; then "$PY" -c "$MPI_CHECK"; fi
log "setup complete ($VENV)"
