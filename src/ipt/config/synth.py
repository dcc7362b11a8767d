"""The synthesizer's groups: its backend, the synthesis stage and the reading-comprehension
tasks (`ipt.synth`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ipt.config.data import SourceConfig


@dataclass
class SynthBackendConfig:
    """An instruction synthesizer (see `configs/synth/` and `ipt.synth.backends`)."""

    kind: str = "rules"  # rules | hf | openai
    name: str | None = None  # the synthesizer id in records; default from kind and model
    model: str | None = None  # hf: a model folder; openai: the served model's name
    url: str | None = None  # openai: base URL, e.g. http://127.0.0.1:8000/v1
    # A tokenizer folder for fitting prompts into the context (hf uses the model's own);
    # without one, tokens are estimated as characters / chars_per_token.
    tokenizer: str | None = None
    chars_per_token: float = 3.0
    context: int = 4096  # the synthesizer's context window (the released one: 4096)
    # Texts are truncated to fit the context with the generation; a smaller limit leaves
    # room for chaining earlier examples into the prompt.
    max_text_tokens: int | None = None
    max_new_tokens: int = 400
    temperature: float = 0.0  # 0: greedy, as the released synthesizer was evaluated
    batch_size: int = 16  # hf: prompts per generate call
    device: str = "auto"  # hf
    dtype: str = "auto"  # hf: auto | fp32 | bf16
    concurrency: int = 8  # openai: requests in flight
    timeout_s: float = 120.0  # openai: per request
    retries: int = 3  # openai: after the first attempt, with exponential backoff
    backoff_s: float = 1.0
    # openai: more fields for every request. Prompts carry their own `<s>`, so the server
    # must not add one (vLLM's and SGLang's `add_special_tokens`).
    extra_body: dict[str, Any] = field(default_factory=lambda: {"add_special_tokens": False})
    min_sentence_chars: int = 50  # rules
    per_kind: int = 2  # rules: tasks of each kind per text
    domain_words: str | None = None  # rules: a file of domain words (keyword task)


@dataclass
class SynthesizeConfig:
    """`data_pipeline/synthesize.py`: raw documents to documents with instruction-response
    pairs, in shards, resumable, splittable over workers and hosts."""

    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = MISSING
    synth: SynthBackendConfig = field(default_factory=SynthBackendConfig)
    rounds: int = 2  # multi-round synthesis: documents of round r chain to round r-1
    fraction: float = 1.0  # share of documents synthesized (by id hash); the rest stay raw
    # The prepare stage's valid_fraction: the documents it will hold out (the same hash of
    # the id the source gives) are never synthesized, chained or tuned on, so they stay
    # unseen for evaluation. Recorded in stage.json: a re-run with another is refused.
    valid_fraction: float = 0.005
    docs_per_shard: int = 1000
    max_docs: int | None = None  # read only the first documents (a sample)
    workers: int = 1  # local processes, each with its own backend
    # This process's share when several hosts split the shards (shard k goes to worker
    # k % num_workers); null takes them from SLURM_PROCID/SLURM_NTASKS or RANK/WORLD_SIZE.
    worker_index: int | None = None
    num_workers: int | None = None
    retry_failed: bool = True  # a re-run regenerates only the documents that failed
    seed: int = 0
    progress_bar: str = "auto"


@dataclass
class RCTasksConfig:
    """`data_pipeline/rc_tasks.py`: reading-comprehension tasks for lm-evaluation-harness
    from the documents the prepare stage held out (`ipt.synth.rc_tasks`)."""

    source: SourceConfig = field(default_factory=SourceConfig)  # the raw documents
    out: str = MISSING
    # The prepare stage's valid_fraction for this source: its held-out documents are used.
    valid_fraction: float = 0.005
    max_chars: int = 1200  # longer held-out documents are skipped (they must fit the model)
    min_sentences: int = 4  # a question's sentences plus enough distractors
    choices: int = 4
    per_doc: int = 2  # questions per document, of different kinds where there are several
    max_examples: int | None = None  # stop once this many multiple-choice examples exist
    min_sentence_chars: int = 30
    max_gen_toks: int = 64  # extractive: the answer's length limit in tokens
    seed: int = 0


@dataclass
class WorldConfig:
    """`data_pipeline/world.py`: a synthetic world of people, their biographies and questions
    about them (`ipt.synth.world`)."""

    out: str = MISSING
    people: int = 1000
    seed: int = 0
    paraphrases: int = 1  # biographies per person (1: the paper's `single`)
    permute: bool = False  # each biography's sentences in a shuffled order
    fullname: bool = False  # the full name in every sentence, not pronouns after the first
    test_fraction: float = 0.5  # people whose questions are never trained on
    # The training QA alone (closed-book: the paper's mixed training), or after one of the
    # person's biographies (Instruction Pre-Training's layout).
    qa_with_biography: bool = False
    # The synthesizer's tuning data (`tuning/`): the train half's biographies (0), or those of
    # this many people outside the world, so that it cannot have learned whom it writes about.
    tuning_people: int = 0
    people_per_shard: int = 1000  # of the QA in the synthesize stage's format
    max_gen_toks: int = 16  # the tasks' answer length limit
