"""Typed configuration: the schema every Hydra config is validated against.

The YAML files under `configs/` hold the defaults; these dataclasses hold the *types*. Hydra
merges the YAML into the schema registered here, so an unknown key or a wrong type fails at
start-up with the full key named (for example `Key 'lr_max' not in 'OptimConfig'`).
Checks that involve several fields (a batch that does not divide, a file that is missing) live
in `validate()`, which also runs before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to change."""


@dataclass
class ModelConfig:
    """A Llama-family causal LM (see `configs/model/`)."""

    name: str = MISSING
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # A Hugging Face folder to continue pre-training from (weights and architecture);
    # null means random initialisation from the fields above.
    init_from: str | None = None
    # auto | flash_attn | varlen | flex | sdpa: the kernel that masks documents (ipt.attention);
    # auto picks the fastest that runs here at train.precision, and logs it.
    attn_implementation: str = "auto"


@dataclass
class MixSourceConfig:
    """One source of the training mixture: a folder written by the prepare stage."""

    path: str = MISSING  # holds train/ (and optionally valid/) token shards
    weight: float = 1.0  # share of the training sequences, relative to the other sources


@dataclass
class SelectConfig:
    """SLM-scored selection for the early phase (`ipt.slm.select`); off while fraction is null."""

    fraction: float | None = None  # share of each source's sequences to draw from
    mode: str = "top"  # top: the highest scores; sample: scores as logits, no replacement
    temperature: float = 1.0  # sample
    column: str = "median_topk_loss"  # median_topk_loss | mean_loss | frac_topk
    steps: int | None = None  # optimizer steps drawn from the selection; null: teacher.kd_steps


@dataclass
class DecomposeConfig:
    """Dataset Decomposition (`data.packing=decompose`, `ipt.data.decompose`): every sequence
    is one piece of one document, of a power of two from min_len to max_len tokens; each
    step draws one length, and a curriculum orders the lengths (docs/data.md)."""

    min_len: int = 64  # shorter document tails are dropped (counted and logged)
    max_len: int | None = None  # null: data.seq_len
    curriculum: str = "grow_p2"  # natural | uniform | grow_linear | grow_p2
    cycles: int = 1  # the curriculum repeats this many times per epoch


@dataclass
class DataConfig:
    """What the trainer reads: prepared sources, mixed, packed and ordered."""

    root: str | None = None  # a folder the paths below may interpolate (${data.root})
    # name -> MixSourceConfig fields (checked by `to_object`; see ENTRY_TYPES)
    sources: dict[str, Any] = field(default_factory=dict)
    # Tokens per sequence; with packing=decompose, a step's tokens are still
    # train.global_batch_size x seq_len, in sequences of the step's own length.
    seq_len: int = 256
    packing: str = "bestfit"  # bestfit | concat | decompose
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    # Tokens attend only within their own document; false lets them see the whole sequence.
    doc_masking: bool = True
    # The most times a source's sequences may repeat within one epoch of the mixture.
    max_repeat: float = 4.0
    seed: int = 1234
    # Loader processes per rank; 0 builds batches on a background thread (fastest for
    # packed shards, which are cheap to slice).
    num_workers: int = 0
    select: SelectConfig = field(default_factory=SelectConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    """Learning-rate schedule as a function of the optimizer step (see `ipt.schedule`)."""

    name: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 0
    # Continual pre-training re-warms from this fraction of the peak lr instead of from 0.
    warmup_start_ratio: float = 0.0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: share of the run spent in the final decay


@dataclass
class DeepSpeedConfig:
    """Rendered into DeepSpeed's config dict by `ipt.engine.deepspeed_config`."""

    stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    # Anything else DeepSpeed accepts, merged last (e.g. {"zero_optimization": {...}}).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The training loss (`configs/loss/`): ntp, or mtp (multi-token prediction)."""

    name: str = "ntp"
    # mtp: n heads, head i predicting token t + i; head 1 is the model's own next-token head,
    # heads 2..n are extra decoder layers kept beside the export (docs/mtp.md).
    heads: int = 1
    head_type: str = "parallel"  # parallel (Gloeckle et al.) | sequential (DeepSeek-V3)
    weights: list[float] | None = None  # one per head; null: all 1
    # Other weights once `later_from_step` optimizer steps are done, i.e. from logged step
    # later_from_step + 1 on (DeepSeek-V3 lowers its MTP weight from 0.3 to 0.1 late in
    # training); null: the same weights throughout.
    later_weights: list[float] | None = None
    later_from_step: int | None = None
    reduction: str = "mean"  # mean | sum over heads (each head's CE a mean over its targets)
    # false: every head's logits at once (the naive baseline, for comparison)
    memory_efficient: bool = True
    chunk_size: int = 1024  # positions per vocabulary-projection chunk


@dataclass
class TeacherConfig:
    """A small LM teaching the student through soft labels early in training (SALT)."""

    path: str | None = None  # a transformers model folder; null: no teacher
    weight: float = 0.5  # w in (1 - w) * CE + w * KD
    temperature: float = 1.0
    kd_steps: int = 0  # KD for the first kd_steps optimizer steps
    switch: str = "hard"  # hard | linear (w decays to 0 over decay_steps after kd_steps)
    decay_steps: int = 0
    chunk_size: int = 1024  # target positions per vocabulary-projection chunk
    # Offline: read the teacher's top-K log-probabilities stored beside each source's shards
    # by data_pipeline/score.py soft_labels=K, instead of running it (path may then be null;
    # if set, it must be the model the labels were made with).
    soft_labels: bool = False

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.soft_labels


@dataclass
class LoggerConfig:
    log_every: int = 10
    progress_bar: str = "auto"  # auto (on a terminal) | always | never
    wandb: bool = False
    wandb_project: str = "ipt"
    wandb_group: str | None = None
    tensorboard: bool = False
    plot: bool = True
    # Peak FLOP/s of one device for MFU; null: looked up for known GPUs, not reported on CPU.
    peak_flops: float | None = None


@dataclass
class EvalConfig:
    """Downstream evaluation during training (`ipt.evaluate.DownstreamEval`): the live
    weights on lm-evaluation-harness tasks, on rank 0, while the other ranks wait."""

    tasks: list[str] = field(default_factory=list)  # harness or local task names; []: off
    include_path: str | None = None  # a folder of local task YAML files
    every: int = 0  # steps between evaluations; 0: only at the end of the run
    num_fewshot: int = 0
    limit: float | None = None  # examples per task (a fraction if < 1); null: all
    batch_size: int = 16
    max_length: int = 0  # context the harness may use; 0: the model's own
    seed: int = 1234


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8  # = micro_batch_size x grad accumulation x ranks
    max_steps: int = 100
    # auto: bf16 on a GPU that has it, fp32 elsewhere | fp32 | bf16. In bf16 the weights the
    # forward and backward use are bf16; DeepSpeed keeps fp32 master weights and optimizer
    # state.
    precision: str = "auto"
    # none | full (every decoder layer) | selective (every ac_every-th layer): recompute the
    # layer in the backward instead of keeping its activations (ipt.model.checkpoint_layers).
    activation_checkpointing: str = "none"
    ac_every: int = 2
    # Regional torch.compile: each decoder layer's forward (and each MTP head's).
    compile: bool = False
    seed: int = 0
    # Intra-op threads per rank; 0 means cores // local ranks (at least 1).
    threads_per_rank: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_last: int = 3
    resume: str = "auto"  # auto | never | <path of a checkpoint>
    # A rank that finishes no step (with its evaluation and checkpoint) for this long ends the
    # job with a message and its threads' stacks: a dead or hung peer blocks every collective.
    # Also the collectives' own timeout. 0: wait forever.
    hang_timeout_s: float = 1800.0
    # A step whose loss is not finite, or spikes (more than spike_sigma standard deviations
    # above the mean of the last spike_window steps; 0: non-finite only), gets no update and:
    # skip: training goes on | stop: the run ends with an error | rollback: the weights go
    # back to the last checkpoint, the data since is skipped (ipt.health) | none: no check.
    # Checking reads the step's loss on the host before its update (one sync per step); with
    # none, metrics are read once per logger.log_every steps, and so are stop signals.
    on_anomaly: str = "skip"
    spike_sigma: float = 6.0
    spike_window: int = 100
    max_anomalies_in_row: int = 5  # more in a row end the run: it has diverged
    max_rollbacks: int = 5  # rollback: after this many in one run, the next anomaly ends it
    export_at_end: bool = True
    # Stop after this many steps of *this* process (tests use it to simulate a crash).
    stop_after: int | None = None


@dataclass
class PretrainConfig:
    """The whole job: `train/pretrain.py` and the functions it calls read only this."""

    name: str = "run"
    run_dir: str = "runs/${name}"
    tokenizer: str = MISSING  # folder with tokenizer.model / tokenizer.json
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SourceConfig:
    """A raw corpus for the data stages (`ipt.data.sources` reads it)."""

    name: str = ""  # filled from its key under `sources`
    path: str = MISSING
    # auto | jsonl | parquet | text | hf | hf_disk | synth | synth_tuning
    format: str = "auto"
    text_field: str = "text"
    # Instruction data: the text is `{text_field}` + a blank line + `{response_field}`,
    # plain, no chat template (e.g. text_field=instruction response_field=response).
    response_field: str | None = None
    id_field: str | None = None
    # A field holding [{"text": ..., "loss": bool}, ...]: the tokens of segments with
    # loss=false get a 0 in the shards' loss mask (SFT-style data).
    segments_field: str | None = None
    split: str = "train"  # hf / hf_disk
    streaming: bool = True  # hf
    data_files: str | None = None  # hf: e.g. path=parquet data_files=/data/*.parquet
    # synth / synth_tuning (the synthesize stage's output folder):
    template_seed: int = 0  # synth: templates are drawn per document from this seed
    shots: int = 4  # synth_tuning: one-shot examples concatenated per sequence
    allow_partial: bool = False  # use a synthesize output whose run has not finished


@dataclass
class PrepareConfig:
    """`data_pipeline/prepare.py`: raw sources to token shards, one folder per source."""

    sources: dict[str, Any] = field(default_factory=dict)  # name -> SourceConfig fields
    tokenizer: str = MISSING
    out: str = MISSING
    docs_per_shard: int = 20_000
    workers: int = 2
    valid_fraction: float = 0.005  # documents held out for validation, chosen by id hash
    add_bos: bool = True
    # Texts longer than this are tokenized in pieces cut at line breaks, else spaces
    # (bounded memory; no character is lost at a cut).
    max_chars_per_piece: int = 1_000_000
    progress_bar: str = "auto"


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
    # The prepare stage's valid_fraction: the documents it will hold out (the same id hash)
    # are never synthesized, chained or tuned on, so they stay unseen for evaluation.
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
class ScoreConfig:
    """`data_pipeline/score.py`: a small LM scores the packed sequences of prepared sources."""

    # The SLM: a transformers model folder with the shards' tokenizer. (Not `model`: that
    # name is the model config group on the command line.)
    slm: str = MISSING
    tokenizer: str = MISSING  # the tokenizer the shards were prepared with
    sources: dict[str, str] = field(default_factory=dict)  # name -> prepared source folder
    # The packing of the run that will use the scores (the scores are per packed sequence,
    # or per piece with packing=decompose and its decompose.min_len and max_len).
    seq_len: int = 256
    packing: str = "bestfit"
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    doc_masking: bool = True
    top_k: int = 10
    scores: bool = True  # the per-sequence statistics data selection uses
    # Also store the SLM's top-K log-probabilities per token, for offline distillation
    # (teacher.soft_labels=true): K entries of 4 bytes (6 above 65,536 tokens) per token.
    soft_labels: int = 0
    batch_size: int = 8
    block_size: int = 512  # sequences per resumable unit of work
    progress_bar: str = "auto"


@dataclass
class DemoDataConfig:
    """`data_pipeline/demo_data.py`: the demo's raw corpora, tokenizer and shards."""

    out: str = "data/demo"
    max_docs: int = 6000  # docstrings
    min_chars: int = 200
    vocab_size: int = 4096
    valid_fraction: float = 0.02
    docs_per_shard: int = 2000
    workers: int = 2


@dataclass
class TokenizerConfig:
    """`data_pipeline/tokenizer.py`: train a sentencepiece model on a sample of sources."""

    sources: dict[str, Any] = field(default_factory=dict)  # name -> SourceConfig fields
    out: str = MISSING
    vocab_size: int = 32000
    model_type: str = "bpe"  # bpe | unigram
    max_docs_per_source: int = 200_000


@dataclass
class ExportConfig:
    checkpoint: str = MISSING  # a checkpoint folder, or a run's checkpoints/ to take the latest
    out: str = MISSING


@dataclass
class EvaluateConfig:
    """`train/evaluate.py`: downstream tasks with lm-evaluation-harness (ipt.evaluate)."""

    # a Hugging Face folder, an ipt run (its hf/ export, else its latest checkpoint), a
    # checkpoint, or a checkpoints/ folder
    checkpoint: str = MISSING
    tasks: list[str] = field(default_factory=list)  # harness task names, or local ones
    include_path: str | None = None  # a folder of local task YAML files
    out: str = MISSING  # gets results.json and table.md
    num_fewshot: int = 0
    batch_size: int = 16
    limit: float | None = None  # examples per task (a fraction if < 1); null: all
    max_length: int = 0  # context the harness may use; 0: the model's own
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234


SECTIONS: dict[str, type] = {c.__name__: c for c in (
    ModelConfig, DataConfig, MixSourceConfig, OptimConfig, ScheduleConfig, DeepSpeedConfig, LossConfig,
    LoggerConfig, TrainConfig, EvalConfig, SourceConfig, SynthBackendConfig, TeacherConfig, SelectConfig,
    DecomposeConfig)}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; `configs/*.yaml` name them in their defaults."""
    cs = ConfigStore.instance()
    for name, schema in (("pretrain", PretrainConfig), ("export", ExportConfig),
                         ("evaluate", EvaluateConfig),
                         ("demo_data", DemoDataConfig), ("prepare", PrepareConfig),
                         ("tokenizer", TokenizerConfig), ("synthesize", SynthesizeConfig),
                         ("score", ScoreConfig), ("rc_tasks", RCTasksConfig)):
        cs.store(name=f"{name}_schema", node=_schema_node(schema))
    OmegaConf.register_new_resolver("ipt.writable_dir", writable_dir, replace=True)


def _schema_node(schema: type) -> DictConfig:
    """`schema` as a config node whose entry maps (ENTRY_TYPES) take new names without `+`,
    so `data.sources='{web: {path: ...}}'` works on the command line; `to_object` checks each
    entry's keys instead of Hydra's struct mode."""
    node = OmegaConf.structured(schema)

    def open_maps(node: DictConfig, kind: type) -> None:
        for f in dataclasses.fields(kind):
            if (kind, f.name) in ENTRY_TYPES:
                OmegaConf.set_struct(node[f.name], False)
            elif str(f.type) in SECTIONS:
                open_maps(node[f.name], SECTIONS[str(f.type)])

    open_maps(node, schema)
    return node


def writable_dir(path: str) -> str:
    """`${ipt.writable_dir:${run_dir}}` as Hydra's run and sweep directory: a run_dir that
    cannot be created or written ends the job with one line and exit code 2 (as
    `ipt.cli.run` does), before Hydra would fail writing into it with a traceback."""
    import os
    import sys

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        print(f"ipt: error: run_dir={path} is not writable ({e}); "
              "set run_dir=<a writable folder>", file=sys.stderr)
        sys.exit(2)  # SystemExit passes through OmegaConf's and Hydra's handlers
    return path


SCHEDULES = ("cosine", "wsd", "constant")
# The statistics of the scoring stage, in the column order of its files (`ipt.slm.score`).
SCORE_COLUMNS = ("median_topk_loss", "mean_loss", "frac_topk")
PACKINGS = ("bestfit", "concat", "decompose")
CURRICULA = ("natural", "uniform", "grow_linear", "grow_p2")  # `ipt.data.decompose`
PRECISIONS = ("auto", "fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


# Maps whose entries a user adds by name (`+sources.web.path=...`): OmegaConf cannot create
# dataclass-typed entries from the command line, so the schema types them `Any` and
# `to_object` checks each entry against its dataclass.
ENTRY_TYPES: dict[tuple[type, str], type] = {
    (DataConfig, "sources"): MixSourceConfig,
    (PrepareConfig, "sources"): SourceConfig,
    (TokenizerConfig, "sources"): SourceConfig,
}


def to_object(cfg: DictConfig, schema: type = PretrainConfig) -> Any:
    """Resolve interpolations and turn Hydra's DictConfig into the typed dataclass `schema`.

    Unknown keys and wrong types anywhere, map entries included, fail with the key named.
    """
    unknown = _unknown_keys(cfg, schema)
    if unknown:  # `+key=value` overrides slip past Hydra's struct mode; nothing else does
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, schema), type(obj)
    _build_entries(obj, "")
    return obj


def _build_entries(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (type(obj), f.name) in ENTRY_TYPES:
            kind = ENTRY_TYPES[type(obj), f.name]
            setattr(obj, f.name, {name: _entry(kind, entry, f"{prefix}{f.name}.{name}", name)
                                  for name, entry in value.items()})
        elif dataclasses.is_dataclass(value):
            _build_entries(value, f"{prefix}{f.name}.")


def _entry(kind: type, entry: Any, key: str, name: str) -> Any:
    if isinstance(entry, kind):
        return entry
    if not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping of {kind.__name__} fields, got {entry!r}")
    known = {f.name for f in dataclasses.fields(kind)}
    if extra := sorted(set(entry) - known):
        raise ConfigError(f"unknown config keys: {', '.join(f'{key}.{k}' for k in extra)} "
                          f"(known: {', '.join(sorted(known))})")
    try:
        obj: Any = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kind), entry))
    except (ValidationError, MissingMandatoryValue) as e:
        raise ConfigError(f"{key}.{e.key}: {e.msg}") from e
    if "name" in known and not obj.name:
        obj.name = name
    return obj


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in node:
        if key not in fields:
            out.append(f"{prefix}{key}")
            continue
        kind = str(fields[key].type)
        if kind in SECTIONS:
            out += _unknown_keys(node[key], SECTIONS[kind], f"{prefix}{key}.")
    return out


def validate(cfg: PretrainConfig, world_size: int) -> int:
    """Check what a schema cannot; returns the gradient-accumulation steps.

    Runs before the model is built, so a mistake costs seconds, not a queue slot.
    """
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}"
        )
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    from ipt.health import ANOMALY_ACTIONS

    if t.on_anomaly not in ANOMALY_ACTIONS:
        raise ConfigError(f"train.on_anomaly={t.on_anomaly!r}; expected one of {ANOMALY_ACTIONS}")
    if t.spike_sigma < 0 or t.spike_window < 1 or t.max_anomalies_in_row < 0 \
            or t.max_rollbacks < 0:
        raise ConfigError(f"train.spike_sigma={t.spike_sigma} (>= 0), train.spike_window="
                          f"{t.spike_window} (>= 1), train.max_anomalies_in_row="
                          f"{t.max_anomalies_in_row} (>= 0) and train.max_rollbacks="
                          f"{t.max_rollbacks} (>= 0) are out of range")
    if t.hang_timeout_s < 0:
        raise ConfigError(f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: no limit)")
    e = cfg.eval
    if e.tasks and (e.every < 0 or e.num_fewshot < 0 or e.batch_size < 1
                    or (e.limit is not None and e.limit <= 0)):
        raise ConfigError(f"eval.every={e.every} (>= 0), eval.num_fewshot={e.num_fewshot} "
                          f"(>= 0), eval.batch_size={e.batch_size} (>= 1) and eval.limit="
                          f"{e.limit} (> 0 or null) are out of range")
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r}; expected one of {SCHEDULES}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}; expected one of {PRECISIONS}")
    if t.activation_checkpointing not in ACTIVATION_CHECKPOINTING or t.ac_every < 1:
        raise ConfigError(f"train.activation_checkpointing={t.activation_checkpointing!r} "
                          f"must be one of {ACTIVATION_CHECKPOINTING}, and train.ac_every="
                          f"{t.ac_every} >= 1")
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.stage={cfg.deepspeed.stage}; expected 0, 1, 2 or 3")
    if cfg.data.seq_len > cfg.model.max_seq_len and cfg.model.init_from is None:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name at least one prepared source folder")
    if cfg.teacher.enabled:
        k = cfg.teacher
        if k.switch not in ("hard", "linear"):
            raise ConfigError(f"teacher.switch={k.switch!r}; expected hard or linear")
        if not 0 < k.weight <= 1 or k.temperature <= 0 or k.kd_steps < 1 or k.chunk_size < 1:
            raise ConfigError("teacher: weight must be in (0, 1], temperature > 0, "
                              "kd_steps >= 1 and chunk_size >= 1")
    if cfg.loss.name == "mtp":
        from ipt.mtp.loss import check

        check(cfg.loss)
    elif cfg.loss.heads != 1:
        raise ConfigError(f"loss.heads={cfg.loss.heads} needs loss=mtp (loss={cfg.loss.name} "
                          "has the next-token head only)")
    sel = cfg.data.select
    if sel.fraction is not None:
        if not 0 < sel.fraction <= 1:
            raise ConfigError(f"data.select.fraction={sel.fraction} must be in (0, 1]; "
                              "null turns selection off")
        if sel.mode not in ("top", "sample") or sel.column not in SCORE_COLUMNS:
            raise ConfigError(f"data.select: mode must be top or sample (got {sel.mode!r}), "
                              f"column one of {SCORE_COLUMNS} (got {sel.column!r})")
        if sel.steps is None and not cfg.teacher.enabled:
            raise ConfigError("data.select needs data.select.steps, or a teacher whose "
                              "teacher.kd_steps it follows")
    if cfg.data.packing not in PACKINGS:
        raise ConfigError(f"data.packing={cfg.data.packing!r}; expected one of {PACKINGS}")
    if cfg.data.packing == "decompose":
        check_decompose(cfg)
    paths = [("tokenizer", cfg.tokenizer), ("model.init_from", cfg.model.init_from)]
    paths += [(f"data.sources.{name}.path", f"{m.path}/train")
              for name, m in cfg.data.sources.items()]
    for key, path in paths:
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}={path!r} does not exist")
    return t.global_batch_size // per_step


def max_len(data: DataConfig | ScoreConfig) -> int:
    """The longest piece of Dataset Decomposition: data.decompose.max_len, or seq_len."""
    return data.decompose.max_len or data.seq_len


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def check_decompose(cfg: PretrainConfig) -> None:
    """`data.packing=decompose`: lengths, micro-batches that hold whole pieces, no offline
    soft labels (they are stored per packed sequence)."""
    d, t = cfg.data.decompose, cfg.train
    longest = max_len(cfg.data)
    if not (_power_of_two(d.min_len) and _power_of_two(longest)) or d.min_len > longest:
        raise ConfigError(f"data.decompose.min_len={d.min_len} and max_len={longest} must be "
                          "powers of two, min_len <= max_len")
    if d.curriculum not in CURRICULA or d.cycles < 1:
        raise ConfigError(f"data.decompose.curriculum={d.curriculum!r} must be one of "
                          f"{CURRICULA}, and cycles={d.cycles} >= 1")
    if t.micro_batch_size * cfg.data.seq_len % longest:
        raise ConfigError(
            f"a micro-batch holds train.micro_batch_size x data.seq_len = "
            f"{t.micro_batch_size * cfg.data.seq_len} tokens, which is not a whole number of "
            f"data.decompose.max_len={longest} pieces; make it a multiple of {longest}")
    if longest > cfg.model.max_seq_len and cfg.model.init_from is None:
        raise ConfigError(f"data.decompose.max_len={longest} exceeds model.max_seq_len="
                          f"{cfg.model.max_seq_len}")
    if cfg.teacher.soft_labels:
        raise ConfigError(
            "teacher.soft_labels=true reads soft labels stored per packed sequence, and "
            "data.packing=decompose trains on pieces of documents instead; distil from the "
            "teacher online (teacher.soft_labels=false) or pack with bestfit")
