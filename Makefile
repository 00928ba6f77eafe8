# qgalore_dist — CPU developer/CI entry points.
#   make setup   system MPI + .venv + pinned CPU torch + DeepSpeed/mpi4py + editable install (idempotent)
#   make test    setup, lint (ruff over the whole tree), then the test suite (hypothesis profile "ci" when CI is set)
#   make lint    setup, then ruff check (lint + import order, configured in pyproject.toml)
#   make demo    setup, then the default pre-training run
#   make bench   setup, then every bench/bench_*.py (helpers such as bench/report.py are not run)
#   make clean   remove build/test output (`make distclean` also removes .venv, .cache, runs)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

ROOT   := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV   ?= $(ROOT)/.venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

# Per-repo JIT cache for torch C++ extensions (DeepSpeed ops): a killed compile can never leave a
# stale lock in the global ~/.cache/torch_extensions that hangs every later run.
export TORCH_EXTENSIONS_DIR ?= $(ROOT)/.cache/torch_extensions

# CI=true (or any value other than empty/0/false) selects the deterministic hypothesis profile;
# tests/conftest.py reads HYPOTHESIS_PROFILE (or CI itself).
ifneq ($(filter-out 0 false False FALSE no,$(strip $(CI))),)
export HYPOTHESIS_PROFILE ?= ci
endif

PYTEST_ARGS ?=
# a 50-step refresh interval so the 200-step demo exercises the refresh gate (the CLI default is the paper's 200)
DEMO_ARGS   ?= --update-proj-gap 50 --metrics-jsonl runs/demo/metrics.jsonl

.PHONY: setup lint test demo bench clean distclean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	VENV="$(VENV)" bash scripts/setup.sh
	touch "$@"

setup: $(STAMP)

# pytest's own exit status is kept: 5 (no tests collected) fails the target on purpose.
lint: $(STAMP)
	"$(VENV)/bin/ruff" check .

test: lint
	"$(PY)" -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	"$(PY)" launch/pretrain.py $(DEMO_ARGS)

bench: $(STAMP)
	@shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no bench/bench_*.py scripts"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "== $$s"; "$(PY)" "$$s"; done

clean:
	rm -rf build dist .pytest_cache .hypothesis bench/out *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf "$(VENV)" .cache runs
