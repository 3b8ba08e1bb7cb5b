# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= out/demo
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test bench clean c

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned: the CPU wheel. An unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# Corpus from Python's own docs -> 4096-id BPE -> two shard sources -> Atom trained a few minutes
# on the CPU (loss curve in $(DEMO_DIR)/run/training.png) -> a sample generation.
demo: $(STAMP)
	$(BIN)/python -m pipelines.demo --output $(DEMO_DIR)
	$(BIN)/python -m shards verify $(DEMO_DIR)/shards/topics
	$(BIN)/python -m trainer.run curricula/demo-atom.yaml \
	    data.sources.0.path=$(DEMO_DIR)/shards/topics data.sources.1.path=$(DEMO_DIR)/shards/docstrings \
	    tokenizer.path=$(DEMO_DIR)/tokenizer.json eval.include_path=$(DEMO_DIR)/tasks --run-dir $(DEMO_DIR)/run --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

# Heavy measurements, not tests: each writes bench/results/<name>.json and prints a table.
bench: $(STAMP)
	$(BIN)/python -m bench.tokenize
	$(BIN)/python -m bench.model
	$(BIN)/python -m bench.loader
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.c_runner
	$(BIN)/python -m bench.generate
	$(BIN)/python -m bench.tasks

# The single-file C runner (c/run.c, docs/c-format.md): libm only, OpenMP threads when cc has them.
C_FLAGS ?= -O3 -march=native -std=c99 -Wall
c: c/run

c/run: c/run.c
	$(CC) $(C_FLAGS) -fopenmp -o $@ $< -lm 2>/dev/null || $(CC) $(C_FLAGS) -Wno-unknown-pragmas -o $@ $< -lm

clean:
	rm -rf out runs
