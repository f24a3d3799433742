# lungscreen: `make run` (demo scan, or SCAN_DIR=...), `make test`, `make bench`.
# The first call builds .venv from requirements.lock (pinned; torch==2.13.0 is the CPU build).
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.lungscreen-installed
SCAN_DIR ?=
OUT_DIR  ?= out
CONFIG   ?= configs/default.yaml
ARGS     ?=

.PHONY: run test bench eval train benchmark-data venv clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(BIN)/python -m pipeline run $(if $(SCAN_DIR),"$(SCAN_DIR)",--demo) --out "$(OUT_DIR)" --config "$(CONFIG)" $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pipeline.bench --out bench $(ARGS)

clean:
	rm -rf $(VENV) $(OUT_DIR)
