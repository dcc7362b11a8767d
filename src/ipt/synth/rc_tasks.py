"""Reading-comprehension tasks from held-out documents, as local lm-evaluation-harness tasks.

The documents are those the prepare stage holds out for validation (the same id hash and
fraction, on the id the source gives: `ipt.synth.ids`), which the synthesize stage never
augments either: no model trained on the prepared data has seen them in any form. A repeated
id is named as the synthesize stage names it (`x#2`), and all its copies are held out or none. The rules miner (`ipt.synth.rules`) asks its
questions about each one; a question is kept when its answer is a span of the document.

- **Multiple choice** (`mc.jsonl`): the document, the question, and its answer among
  `choices - 1` distractors, sentences of the same document, so that copying some span of
  the context is not enough. None of them is in the question or holds the answer.
- **Yes/no** (`boolq.jsonl`): "Does the sentence B come right after A in the passage?", half
  of them with the true next sentence and half with another sentence of the same document.
- **Extractive** (`mc.jsonl` again): the answer generated greedily up to a newline, scored by
  exact match.
- **Held-out text** (`text.jsonl`, task `heldout_text`): every held-out document, scored by
  rolling log-likelihood in bits per byte, which compares models whatever their tokenizer
  or training data.

Each is written in the prompt formats of the harness's reading-comprehension tasks (SciQ,
RACE, BoolQ), and in `unseen`, a format no training template uses
(`tests/test_rc_tasks.py` checks that against the templates). Everything is deterministic in
the documents and `seed`; `summary.json` accounts for every document read.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from ipt.config import ConfigError, RCTasksConfig
from ipt.data import sources as src
from ipt.data.pairs import options_of
from ipt.synth.ids import held_out, unique_ids
from ipt.synth.rules import Miner, sentences

# Prompt formats, as harness `doc_to_text` templates (the harness adds " " + the answer).
FORMATS = {
    "sciq": "{{context}}\nQuestion: {{question}}\nAnswer:",  # SciQ
    "race": "Article: {{context}}\n\nQuestion: {{question}}\nAnswer:",  # RACE, one question
    "unseen": "Passage: {{context}}\n\nQuery about the passage: {{question}}\nReply:",
}
BOOLQ_FORMAT = "{{context}}\nQuestion: {{question}}?\nAnswer:"  # BoolQ
# (task name, jsonl, kind, prompt format); `kind` is mc, boolq or em.
TASKS = [("heldout_mc_sciq", "mc", "mc", "sciq"), ("heldout_mc_race", "mc", "mc", "race"),
         ("heldout_mc_unseen", "mc", "mc", "unseen"), ("heldout_boolq", "boolq", "boolq", ""),
         ("heldout_em_sciq", "mc", "em", "sciq"), ("heldout_em_unseen", "mc", "em", "unseen")]
TASK_NAMES = [t[0] for t in TASKS]
# The held-out documents' own text, scored by rolling log-likelihood (bits per byte): the
# held-out raw-text loss, on the same documents whatever a model was trained on.
TEXT_TASK = "heldout_text"


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def examples(doc_id: str, text: str, cfg: RCTasksConfig) -> tuple[list[dict], list[dict], str]:
    """The multiple-choice and yes/no examples of one held-out document, and what became of
    it: `used`, or why it was skipped."""
    sents = sentences(text)
    context = " ".join(sents)
    if len(context) > cfg.max_chars:
        return [], [], "too_long"
    if len(sents) < cfg.min_sentences:
        return [], [], "too_few_sentences"
    rng = random.Random(zlib.crc32(f"{cfg.seed}:{doc_id}".encode()))
    miner = Miner(min_chars=cfg.min_sentence_chars, per_kind=1)
    mc: list[dict] = []
    for pair in miner.mine(text, doc_id):
        question, answer = pair.instruction.strip(), " ".join(pair.response.split())
        if options_of(question) is not None or _norm(answer) not in _norm(context):
            continue  # a yes/no or option question, or an answer the text does not hold
        pool = [s for s in sents if _norm(s) not in _norm(question)
                and _norm(answer) not in _norm(s) and _norm(s) not in _norm(answer)]
        if len(pool) < cfg.choices - 1:
            continue
        choices = [*rng.sample(pool, cfg.choices - 1), answer]
        rng.shuffle(choices)
        mc.append({"id": f"{doc_id}:{len(mc)}", "doc_id": doc_id, "context": context,
                   "question": question, "answer": answer, "choices": choices,
                   "label": choices.index(answer)})
        if len(mc) == cfg.per_doc:
            break
    boolq = _next_sentence_check(doc_id, sents, context, rng, cfg.min_sentence_chars)
    return mc, boolq, "used" if mc or boolq else "no_question"


def _next_sentence_check(doc_id: str, sents: list[str], context: str, rng: random.Random,
                         min_chars: int) -> list[dict]:
    """One yes/no question: whether a sentence follows another; yes for even-numbered
    documents (by the hash), so the labels are balanced across documents."""
    pairs = [(i, a, b) for i, (a, b) in enumerate(zip(sents, sents[1:], strict=False))
             if len(a) >= min_chars and len(b) >= min_chars]
    if not pairs:
        return []
    i, a, b = pairs[rng.randrange(len(pairs))]
    yes = zlib.crc32(doc_id.encode()) % 2 == 0
    if not yes:
        others = [s for j, s in enumerate(sents) if j not in (i, i + 1)
                  and len(s) >= min_chars and _norm(s) != _norm(b)]
        if not others:
            return []
        b = rng.choice(others)
    return [{"id": f"{doc_id}:boolq", "doc_id": doc_id, "context": context,
             "question": f'Does the sentence "{b}" come right after "{a}" in the passage',
             "label": int(yes)}]


def task_yaml(name: str, data: Path, kind: str, fmt: str, max_gen_toks: int) -> str:
    """A harness task over a local jsonl file (offline: the `json` loader reads it)."""
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {data}\n"
            "test_split: train\n")
    if kind == "boolq":
        return (head + f"output_type: multiple_choice\ndoc_to_text: {json.dumps(BOOLQ_FORMAT)}\n"
                'doc_to_choice: ["no", "yes"]\ndoc_to_target: label\n'
                "metric_list:\n" + _metric("acc"))
    prompt = json.dumps(FORMATS[fmt])
    if kind == "mc":
        return (head + f"output_type: multiple_choice\ndoc_to_text: {prompt}\n"
                'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                "metric_list:\n" + _metric("acc") + _metric("acc_norm"))
    return (head + f"output_type: generate_until\ndoc_to_text: {prompt}\n"
            'doc_to_target: "{{answer}}"\ntarget_delimiter: " "\n'
            f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {max_gen_toks}\n'
            "  do_sample: false\n"
            "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
            "      - function: take_first\n"
            "metric_list:\n" + _metric("exact_match")
            + "    ignore_case: true\n    ignore_punctuation: true\n")


def _metric(name: str) -> str:
    return f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n"


def text_yaml(data: Path) -> str:
    return (f"task: {TEXT_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files: {data}\n"
            'test_split: train\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\n'
            'doc_to_target: "{{text}}"\nmetric_list:\n'
            + "".join(f"  - metric: {m}\n    aggregation: weighted_perplexity\n"
                      "    higher_is_better: false\n" for m in ("word_perplexity",
                                                                 "byte_perplexity"))
            + "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
            "    higher_is_better: false\n")


def chance(kind: str, n_choices: int) -> float:
    return {"mc": 1 / n_choices, "boolq": 0.5, "em": 0.0}[kind]


def build(cfg: RCTasksConfig) -> dict[str, Any]:
    """Write `out/{mc,boolq,text}.jsonl`, a YAML file per task, and `summary.json`;
    return the summary."""
    if not 0 < cfg.valid_fraction < 1:
        raise ConfigError(f"valid_fraction={cfg.valid_fraction} must be the prepare stage's "
                          "held-out fraction for this source, in (0, 1)")
    if cfg.choices < 2:
        raise ConfigError(f"choices={cfg.choices} must be at least 2")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    fate: Counter[str] = Counter()
    rows: dict[str, list[dict]] = {"mc": [], "boolq": [], "text": []}
    for record in unique_ids(src.read(cfg.source)):
        if isinstance(record, src.Reject):
            fate["rejected"] += 1
        elif not held_out(record, cfg.valid_fraction):
            fate["trained_on"] += 1
        elif cfg.max_examples is not None and len(rows["mc"]) >= cfg.max_examples:
            fate["held_out_beyond_max_examples"] += 1
        else:
            rows["text"].append({"id": record.id, "text": record.text})
            mc, boolq, what = examples(record.id, record.text, cfg)
            rows["mc"] += mc
            rows["boolq"] += boolq
            fate[what if what == "used" else f"held_out_{what}"] += 1
    if not rows["mc"] and not rows["boolq"]:
        raise ConfigError(f"no held-out document of {cfg.source.path} gave a question "
                          f"({dict(fate)}); raise max_chars or valid_fraction, or use a source "
                          "of longer prose")
    for name, items in rows.items():
        _write(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in items))
    tasks = {}
    for name, data, kind, fmt in TASKS:
        _write(out / f"{name}.yaml",
               task_yaml(name, (out / f"{data}.jsonl").resolve(), kind, fmt, cfg.max_gen_toks))
        tasks[name] = {"examples": len(rows[data]), "kind": kind, "format": fmt or "boolq",
                       "chance": chance(kind, cfg.choices)}
    _write(out / f"{TEXT_TASK}.yaml", text_yaml((out / "text.jsonl").resolve()))
    tasks[TEXT_TASK] = {"examples": len(rows["text"]), "kind": "text", "format": "raw"}
    summary = {"source": cfg.source.path, "valid_fraction": cfg.valid_fraction,
               "docs": sum(fate.values()), "fate": dict(sorted(fate.items())), "tasks": tasks,
               "yes_share": (sum(r["label"] for r in rows["boolq"]) / len(rows["boolq"])
                             if rows["boolq"] else None)}
    _write(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
