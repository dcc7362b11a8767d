SHELL := /bin/bash
# Each target sets up the project virtualenv on first use, from the lock of tested versions
# (constraints.txt; torch pinned to the CPU build here). `make lock` refreshes the lock.
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)
LATEST_VENV ?= .venv-latest
NPROC  ?= 2
DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/demo
DEMO_SYNTH ?= runs/demo-synth
DEMO_SLM  ?= runs/demo-slm
DEMO_WORLD ?= runs/demo-world
# CI runs the slow end-to-end tests too; `make test` locally skips them (`make test-slow` runs them).
PYTEST_SELECT := $(if $(CI),,-m "not slow")

.PHONY: setup demo-synth train test vllm test-vllm test-slow bench experiment-salt experiment-ipt experiment-dd experiment-knowledge lint clean slurm check-latest lock gpu-kit check-gpu-versions

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $@

# The newest versions pyproject.toml admits, in a scratch venv, against the fast tests: drift
# shows here before users meet it. Leaves $(LATEST_VENV) for `make lock`.
check-latest:
	rm -rf $(LATEST_VENV) && python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| sed 's/^torch==\([^+]*\)+.*/torch==\1/' > $(LATEST_VENV)/freeze.txt
	@echo "versions that differ from $(LOCK) (< lock, > newest):"
	@diff <(grep -v '^#' $(LOCK)) $(LATEST_VENV)/freeze.txt | grep '^[<>]' || echo "  none"
	$(LATEST_VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

# Refresh the lock: the newest allowed versions, written only once the fast tests pass on them.
lock: check-latest
	{ echo "# The exact versions ipt is tested with (make setup installs from here)."; \
	  echo "# Refresh: make lock (newest versions pyproject.toml admits, after the fast tests)"; \
	  cat $(LATEST_VENV)/freeze.txt; } > $(LOCK)

# The demo, raw text to an exported model, every stage a real entry point:
#  1. raw corpora (docstrings, package descriptions) -> sentencepiece tokenizer -> raw shards
#  2. the rules miner augments 1/5 of the docstrings (2 chained rounds)
#  3. a tiny synthesizer is trained on the mined pairs (loss on the pairs only) ...
#  4. ... and writes pairs for held-out texts (a sample of the package descriptions)
#  5. the mix is tokenized; a small LM (2 layers) is pre-trained on it and scores every sequence
#  6. reading-comprehension tasks are made from the held-out docstrings (never trained on)
#  7. the model is pre-trained on 2 CPU ranks with ZeRO-1 and 2 multi-token heads, its first
#     30 steps distilled from the small LM on the hardest-but-learnable half of the data
#     (SALT), scored on the held-out tasks every 50 steps, then exported; it continues a
#     prompt greedily, then self-speculatively, and lm-evaluation-harness scores the export
#     on every held-out task
#  8. knowledge: a synthetic world of 100 people; the tiny model reads their biographies and
#     the questions about half of them (in ipt's templates), then answers a question about
#     someone from the other half, and the harness scores both halves (docs/evaluation.md)
# The share of documents held out (by id hash) from every stage: validation loss, and the
# held-out reading-comprehension tasks the model is evaluated on
DEMO_HELDOUT ?= 0.05
HELDOUT_TASKS := heldout_mc_sciq,heldout_mc_race,heldout_mc_unseen,heldout_boolq,heldout_em_sciq,heldout_em_unseen
WORLD := $(DEMO_DATA)/world
SYNTH := $(PY) data_pipeline/synthesize.py valid_fraction=$(DEMO_HELDOUT)
PREP  := $(PY) data_pipeline/prepare.py tokenizer=$(DEMO_DATA)/tokenizer out=$(DEMO_DATA)/shards \
	valid_fraction=$(DEMO_HELDOUT)
# Steps 1-3 alone (`make demo-synth`): the tiny synthesizer, exported to $(DEMO_SYNTH)/hf,
# which the vLLM tests serve too.
demo-synth: $(STAMP)
	$(PY) data_pipeline/demo_data.py out=$(DEMO_DATA)
	$(SYNTH) source.path=$(DEMO_DATA)/raw/docstrings.jsonl source.id_field=id \
		out=$(DEMO_DATA)/synth/rules fraction=0.2 synth.tokenizer=$(DEMO_DATA)/tokenizer
	$(PREP) +sources.synth_tuning.path=$(DEMO_DATA)/synth/rules \
		+sources.synth_tuning.format=synth_tuning +sources.docstrings_ipt.path=$(DEMO_DATA)/synth/rules
	NPROC=$(NPROC) bash launch/torchrun.sh train/finetune.py experiment=synth_demo \
		data.root=$(DEMO_DATA) run_dir=$(DEMO_SYNTH)

train: demo-synth
	$(SYNTH) source.path=$(DEMO_DATA)/raw/packages out=$(DEMO_DATA)/synth/tiny max_docs=64 \
		synth=hf synth.model=$(DEMO_SYNTH)/hf synth.context=512 synth.max_text_tokens=128 \
		synth.max_new_tokens=128
	$(PREP) +sources.packages_synth.path=$(DEMO_DATA)/synth/tiny
	$(PY) data_pipeline/rc_tasks.py source.path=$(DEMO_DATA)/raw/docstrings.jsonl \
		source.id_field=id valid_fraction=$(DEMO_HELDOUT) max_chars=700 out=$(DEMO_DATA)/rc_tasks
	NPROC=$(NPROC) bash launch/torchrun.sh train/pretrain.py experiment=demo_slm data=demo_ipt \
		data.root=$(DEMO_DATA) run_dir=$(DEMO_SLM)
	NPROC=$(NPROC) bash launch/torchrun.sh data_pipeline/score.py slm=$(DEMO_SLM)/hf \
		tokenizer=$(DEMO_DATA)/tokenizer seq_len=256 \
		$(foreach s,docstrings_ipt packages packages_synth,+sources.$(s)=$(DEMO_DATA)/shards/$(s))
	NPROC=$(NPROC) bash launch/torchrun.sh train/pretrain.py experiment=demo data=demo_ipt \
		data.root=$(DEMO_DATA) run_dir=$(DEMO_RUN) teacher=kd teacher.path=$(DEMO_SLM)/hf \
		teacher.kd_steps=30 data.select.fraction=0.5 loss=mtp loss.heads=2 eval=heldout
	$(PY) train/sample.py model=$(DEMO_RUN)/hf prompt="Return the number of"
	$(PY) train/evaluate.py checkpoint=$(DEMO_RUN)/hf 'tasks=[$(HELDOUT_TASKS)]' \
		include_path=$(DEMO_DATA)/rc_tasks out=$(DEMO_RUN)/eval
	$(PY) data_pipeline/world.py out=$(WORLD) people=100 paraphrases=4 permute=true > /dev/null
	$(PY) data_pipeline/tokenizer.py out=$(WORLD)/tokenizer vocab_size=2048 \
		+sources.bios.path=$(WORLD)/biographies.jsonl +sources.qa.path=$(WORLD)/qa +sources.qa.format=synth
	$(PY) data_pipeline/prepare.py tokenizer=$(WORLD)/tokenizer out=$(WORLD)/shards valid_fraction=0.0 \
		+sources.bios.path=$(WORLD)/biographies.jsonl +sources.bios.id_field=id \
		+sources.qa.path=$(WORLD)/qa +sources.qa.format=synth
	NPROC=$(NPROC) bash launch/torchrun.sh train/pretrain.py experiment=demo_world data=world \
		data.root=$(WORLD) run_dir=$(DEMO_WORLD)
	$(PY) train/sample.py model=$(DEMO_WORLD)/hf prompt_file=$(WORLD)/example/prompt.txt max_new_tokens=8
	@echo "  the world's answer: $$(cat $(WORLD)/example/answer.txt) (a question about the test half: never trained on)"
	$(PY) train/evaluate.py checkpoint=$(DEMO_WORLD)/hf 'tasks=[world_train,world_test]' \
		include_path=$(WORLD)/tasks out=$(DEMO_WORLD)/eval

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_SELECT) $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

# SALT at toy scale: a 4-layer student with and without early KD from a 2-layer SLM (docs/salt.md)
experiment-salt: $(STAMP)
	$(PY) experiments/salt_kd.py $(ARGS)

# Dataset Decomposition (grow_p2) against best-fit packing at the same tokens, 2 seeds (docs/data.md)
experiment-dd: $(STAMP)
	$(PY) experiments/dd_vs_bestfit.py $(ARGS)

# Instruction pre-training against raw pre-training at equal tokens, 3 seeds (docs/evaluation.md)
experiment-ipt: $(STAMP)
	$(PY) experiments/ipt_vs_raw.py $(ARGS)

experiment-knowledge: $(STAMP)
	$(PY) experiments/knowledge.py $(ARGS)

# What the GPU node (no network; bench/gpu_node.txt) lacks for bench/gpu.py, in gpu-kit/ to
# carry: wheels at the lock's versions for CPython 3.12, and the benchmark's tokenizer and
# shards (built in data/gpubench first, about 5 minutes on 2 cores). bench/gpu_kit.py says how
# to install it there. ARGS="--skip-data" for the wheels only.
gpu-kit: $(STAMP)
	$(PY) bench/gpu_kit.py --out gpu-kit $(ARGS)

# The node's library versions (bench/gpu_node.txt: transformers 5.17.0, tokenizers 0.23.2,
# huggingface_hub 1.33.0, sentencepiece 0.2.2, ...) in place of the lock's, in a scratch venv,
# against the training path's tests, so a version gap shows here before the node. Python 3.11
# with torch 2.13.0 and numpy at the lock's: the node's torch 2.11 has no CPU build here (only
# /opt/wheels' torch 2.13.0+cpu, cp311), and its numpy 2.5.2 needs Python >= 3.12. Installed
# --no-deps at exact versions, as the node's packages are; `pip check` shows what disagrees.
# Last, the GPU session's --quick run on this venv's packages (not the kit's wheels: they are
# for Python 3.12) and the kit's corpus (`make gpu-kit` first). Not part of CI.
GPUNODE_VENV ?= .venv-gpunode
GPUNODE_PY   := $(GPUNODE_VENV)/bin/python
check-gpu-versions: $(STAMP)
	rm -rf $(GPUNODE_VENV) && python3.11 -m venv $(GPUNODE_VENV)
	$(PY) bench/gpu_kit.py --node-constraints $(GPUNODE_VENV)/constraints.txt --keep-lock torch,numpy
	$(GPUNODE_PY) -m pip install -q --no-deps -r $(GPUNODE_VENV)/constraints.txt
	$(GPUNODE_PY) -m pip install -q --no-deps -e .
	$(GPUNODE_PY) -m pip check || true
	$(GPUNODE_PY) -m pytest -q -m "not slow" tests/test_attention.py tests/test_losses.py \
		tests/test_speed_options.py tests/test_train.py $(ARGS)
	if test -f bench/gpu_session.sh; then \
		PATH=$(abspath $(GPUNODE_VENV))/bin:$$PATH KIT=$(GPUNODE_VENV)/no-kit \
		DATA=gpu-kit/data/gpubench bash bench/gpu_session.sh --quick $(or $(TMP),/tmp)/gpu-session; \
	else echo "bench/gpu_session.sh: not there yet, skipped"; fi

# The synthesizer's server: vLLM in a virtualenv of its own, from a lock of its own (every
# package pinned, installed --no-deps): the CPU build here, the CUDA build where nvidia-smi
# finds a GPU (or VLLM_BUILD=cpu|cuda). Its pins (transformers<5.20) are not the trainer's.
VLLM_VENV  ?= .venv-vllm
VLLM_BUILD ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
VLLM_LOCK  := constraints-vllm-$(VLLM_BUILD).txt
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat $(VLLM_LOCK) | cksum | cut -d' ' -f1)
vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -W ignore -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
	rm -f $(VLLM_VENV)/.installed-* && touch $@

# The synthesize stage against a real vLLM server serving the demo's synthesizer, which it
# trains first (`make demo-synth` into a scratch folder): tests/test_vllm.py.
test-vllm: $(STAMP) $(VLLM_STAMP)
	IPT_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q --vllm \
		tests/test_vllm.py $(ARGS)

# A one-node SLURM cluster on this machine (root; installs Debian's slurm + munge if missing)
slurm:
	bash launch/local_slurm.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src train data_pipeline tests bench experiments
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports  # the layers of docs/design-notes.md ([tool.importlinter])

clean:
	rm -rf runs outputs multirun $(LATEST_VENV)
