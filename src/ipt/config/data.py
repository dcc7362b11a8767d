"""`data` (the training mixture) and the data stages' schemas: sources, prepare,
tokenizer, demo data (`ipt.data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ipt.config.decompose import DecomposeConfig
from ipt.config.slm import SelectConfig

PACKINGS = ("bestfit", "concat", "decompose")


@dataclass
class MixSourceConfig:
    """One source of the training mixture: a folder written by the prepare stage."""

    path: str = MISSING  # holds train/ (and optionally valid/) token shards
    weight: float = 1.0  # share of the training sequences, relative to the other sources


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
    # Where each source's sequence index is kept (built once, memory-mapped by every rank;
    # ipt.data.index). null: an `index/` folder beside the shards; set it when those are
    # read-only.
    index_dir: str | None = None


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
    workers: int = 2  # local processes
    # This process's share when several hosts split the groups (group k goes to worker
    # k % num_workers); null takes them from SLURM_PROCID/SLURM_NTASKS or RANK/WORLD_SIZE.
    worker_index: int | None = None
    num_workers: int | None = None
    valid_fraction: float = 0.005  # documents held out for validation, chosen by id hash
    # BOS before each document; no effect with a tokenizer that has none (Qwen's byte-level
    # BPE): its documents start without one, and settings.json records add_bos=false.
    add_bos: bool = True
    # Texts longer than this are tokenized in pieces cut at line breaks, else spaces
    # (bounded memory; no character is lost at a cut).
    max_chars_per_piece: int = 1_000_000
    progress_bar: str = "auto"


@dataclass
class TokenizerConfig:
    """`data_pipeline/tokenizer.py`: train a sentencepiece model on a sample of sources."""

    sources: dict[str, Any] = field(default_factory=dict)  # name -> SourceConfig fields
    out: str = MISSING
    vocab_size: int = 32000
    model_type: str = "bpe"  # bpe | unigram
    max_docs_per_source: int = 200_000


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
