# Each target sets up the project virtualenv on first use (torch pinned to the CPU build here).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
NPROC  ?= 2
DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo
# CI runs the slow end-to-end tests too; `make test` locally skips them (`make test-slow` runs them).
PYTEST_SELECT := $(if $(CI),,-m "not slow")

.PHONY: setup train test test-slow bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

# The demo: docstrings -> sentencepiece -> token shards -> 2-rank ZeRO-1 pre-training -> HF
train: $(STAMP)
	$(PY) data_pipeline/demo_data.py out=$(DEMO_DATA)
	NPROC=$(NPROC) bash launch/torchrun.sh train/pretrain.py experiment=demo \
		data.root=$(DEMO_DATA) run_dir=$(DEMO_RUN)
	$(PY) train/sample.py model=$(DEMO_RUN)/hf prompt="Return the number of"

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_SELECT) $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src train data_pipeline tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf runs outputs multirun
