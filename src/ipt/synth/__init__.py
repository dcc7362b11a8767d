"""Instruction synthesis (spec: `instruction_pretraining.md`; docs/synthesis.md).

What it adds: pipeline stages, not run hooks. The synthesize stage writes instruction-response
pairs about raw documents; the prepare stage reads its output as a source like any other
(`ipt.data.augmented`, with the shared pair format `ipt.data.pairs` and its templates
`ipt.data.templates`), so a pre-training run needs nothing from this package. The
reading-comprehension tasks for evaluation are made here too.

Config groups: the synthesize and rc_tasks stages' schemas (`ipt.config.synth`).

Files:
- `stage.py`: the synthesize stage (sharded, resumable), and `cache.py`, its generations;
- `backend.py`: what a backend is; `backends.py`: the rule-based miner and the registry;
- `hf.py`, `openai.py`: a local `transformers` model, and a client of an OpenAI-compatible
  server (vLLM); `vllm.py`: starting and stopping a real vLLM server; `server.py`: a small
  stand-in server, for injecting faults;
- `rules.py`: the rule-based miner;
- `rc_tasks.py`: held-out reading-comprehension tasks;
- `ids.py`: documents' ids: repeats renamed, and held out by the id the source gave;
- `world.py`: a synthetic world of people, biographies and questions (an oracle
  synthesizer, with ground truth for knowledge extraction).
"""
