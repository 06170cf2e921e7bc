# `make demo` and `make test` create (or reuse) .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Cache byte code in the venv even where the environment turns it off: without it every test process
# and every CLI call the tests make compiles torch, ExecuTorch and coremltools again.
unexport PYTHONDONTWRITEBYTECODE
# Re-install whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test demo lint train-tiny clean

WARM_IMPORTS_A := import torch.export, torch.onnx, onnxscript, onnx, onnxruntime, transformers, tokenizers, torchao.quantization
WARM_IMPORTS_B := import manzano_edge.cli, manzano_edge.export.bundle, coremltools, executorch.exir, \
	executorch.backends.xnnpack.partition.xnnpack_partitioner, executorch.backends.apple.coreml.partition

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: it resolves to the CPU wheel on this machine, never the CUDA build.
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	# Core AI's runtime (coreai-core) has wheels for Linux x86_64 with glibc 2.34+ and macOS 26+ arm64
	# only; elsewhere the package installs without it and the Core AI tests skip, saying why.
	$(PY) -m pip install -q --no-compile -e ".[dev,coreai]" || { \
		echo "make: manzano-edge[coreai] does not install on this platform; the Core AI tests will be skipped"; \
		$(PY) -m pip install -q --no-compile -e ".[dev]"; }
	# Byte-compile what the package imports (a quarter of site-packages), on both cores, instead of
	# every file (pip's default, most of the install time); the rest is cached on first import. Only a
	# cache: a broken import shows in the tests, so the libraries' import-time warnings stay quiet.
	{ $(PY) -c "$(WARM_IMPORTS_A)" & $(PY) -c "$(WARM_IMPORTS_B)"; wait; } 2> /dev/null
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# Two workers on two cores; the tests that share an exported bundle stay on one (tests/conftest.py).
TEST_WORKERS ?= 2

test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

demo: install
	$(VENV)/bin/manzano-edge demo -o out/demo --overwrite

lint: install
	$(VENV)/bin/ruff check manzano_edge tests
	$(VENV)/bin/lint-imports --no-cache

# Re-train the embedded tiny model from scratch (47:27 alone on a 2-core VM for v16; see docs/model-card.md, "Training").
train-tiny: install
	$(VENV)/bin/manzano-edge train --preset tiny -o runs/tiny

clean:
	rm -rf out .pytest_cache
