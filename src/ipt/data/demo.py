"""The demo's data: docstrings of the installed Python, a sentencepiece tokenizer trained on
them, and train/validation token shards. Idempotent: finished parts are not redone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ipt.config import DemoDataConfig
from ipt.data import tokenizer as tok
from ipt.data.corpus import docstrings
from ipt.data.shards import ShardSet, write_shards

log = logging.getLogger(__name__)


def build_demo_data(cfg: DemoDataConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    if not corpus.exists():
        tmp = corpus.with_suffix(".tmp")
        with tmp.open("w") as f:
            for doc in docstrings(cfg.min_chars, cfg.max_docs):
                f.write(json.dumps(doc) + "\n")
        tmp.rename(corpus)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    log.info("corpus: %d documents, %d characters", len(docs), sum(map(len, docs)))

    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").exists():
        tok.train_sentencepiece(docs, tok_dir, cfg.vocab_size)
    fp = tok.fingerprint(tok_dir)
    tokenizer = tok.load(tok_dir)

    for split, keep in (("train", lambda i: i % cfg.valid_every != 0),
                        ("valid", lambda i: i % cfg.valid_every == 0)):
        d = out / split
        if d.is_dir() and any(d.glob("*.json")) and ShardSet(d).tokenizer_fingerprint == fp:
            continue
        texts = [t for i, t in enumerate(docs) if keep(i)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        write_shards(([*x, tokenizer.eos_token_id] for x in ids), d, len(tokenizer), fp,
                     source="python-docstrings")
        log.info("%s: %s tokens", split, f"{ShardSet(d).num_tokens:,}")
    return out
