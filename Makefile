# `make demo` and `make test` create (or reuse) .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Re-install whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test demo lint train-tiny clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: it resolves to the CPU wheel on this machine, never the CUDA build.
	# --no-compile: Python byte-compiles a module when it is first imported; compiling all
	# ~21,000 files of the dependencies at install time is most of the install, for code that never runs.
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	$(PY) -m pip install -q --no-compile -e ".[dev]"
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
