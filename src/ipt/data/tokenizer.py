"""Tokenizers: train a sentencepiece model, load any tokenizer folder, fingerprint it.

A trained model is saved as a folder that both sentencepiece and `transformers` read:
`tokenizer.model` plus a `tokenizer_config.json` naming `LlamaTokenizer`. Training uses the
identity normalizer and keeps whitespace, so newlines and indentation survive a round trip
and the `transformers` conversion encodes exactly as sentencepiece does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


class TokenizerError(RuntimeError):
    """A tokenizer folder that is missing files or cannot be read."""


SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int,
                        model_type: str = "bpe", num_threads: int = 2) -> Path:
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=True, split_digits=True,
        max_sentence_length=1 << 20, num_threads=num_threads, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
              "add_eos_token": False, "legacy": False, **SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out


def fingerprint(tokenizer_dir: str | Path) -> str:
    """A short hash of the files that define the tokenization."""
    d = Path(tokenizer_dir)
    files = [d / "tokenizer.model"] if (d / "tokenizer.model").exists() else \
        sorted(d.glob("tokenizer*.json"))
    if not files:
        raise FileNotFoundError(f"{d} holds no tokenizer.model or tokenizer.json")
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load(tokenizer_dir: str | Path):
    """The `transformers` tokenizer of a folder (sentencepiece models are converted once)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # transformers reports a damaged file in many ways
        raise TokenizerError(f"the tokenizer in {tokenizer_dir} could not be loaded "
                             f"({type(e).__name__}: {str(e)[:300]})") from e


def train_from_sources(cfg) -> Path:
    """Train on the first `max_docs_per_source` documents of each source (a `TokenizerConfig`)."""
    from itertools import islice

    from ipt.config import ConfigError
    from ipt.data import sources as src

    if not cfg.sources:
        raise ConfigError("sources is empty: name at least one, e.g. +sources.web.path=...")
    for name, spec in cfg.sources.items():
        spec.name = name
        src.check(spec)

    def texts():
        for spec in cfg.sources.values():
            docs = (r.text for r in src.read(spec) if isinstance(r, src.Doc))
            yield from islice(docs, cfg.max_docs_per_source)

    return train_sentencepiece(texts(), cfg.out, cfg.vocab_size, cfg.model_type)
