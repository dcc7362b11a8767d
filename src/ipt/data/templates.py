"""Augmented documents as pre-training text (spec section 4).

An entry (a text and its pairs) is rendered with templates drawn by a random generator
seeded by the entry's id, so the corpus is the same on every run and machine while the
model sees many layouts: mostly the text followed by an optional lead-in and the Q/A pairs,
sometimes a dialog, numbered questions, or one inline paragraph; now and then the pairs come
before the text. Q/A patterns come from separate pools for plain, multiple-choice,
chain-of-thought and multiple-choice-with-reasoning pairs. Multiple-choice options are
re-rendered with a drawn marker style, and the answer becomes the marker when markers are
letters or numbers. The output has no BOS/EOS: the prepare stage adds document boundaries.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from ipt.data import pairs as fmt
from ipt.data.pairs import Pair

LEAD_INS = ["", "", "Answer these questions:", "Now answer the following questions.",
            "Questions about the text above:", "Based on the text, answer the questions below.",
            "Read the text and respond:", "Test your understanding of the passage:"]
FIRST_LEAD_INS = ["Answer the questions after reading the text below.",
                  "Think about these questions while reading the text that follows.",
                  "Questions first, then the text they are about."]
PATTERNS = {
    "plain": ["Q: {q}\nA: {a}", "Question: {q}\nAnswer: {a}", "{q}\n{a}",
              "Question: {q}\nResponse: {a}", "Input: {q}\nOutput: {a}", "{q}\nAnswer: {a}",
              "Problem: {q}\nSolution: {a}"],
    "mc": ["Q: {q}\n{options}\nA: {a}", "Question: {q}\nOptions:\n{options}\nAnswer: {a}",
           "{q}\nChoose from:\n{options}\nAnswer: {a}", "{q}\nPick your answer from:\n{options}\n{a}",
           "{q}\nSelect the correct option:\n{options}\nThe answer is {a}."],
    "cot": ["Q: {q}\nA: {rationale}\nSo the answer is {final}.",
            "Question: {q}\nLet's think step by step. {rationale}\nTherefore, the answer is "
            "{final}.", "{q}\nReasoning: {rationale}\nAnswer: {final}"],
    "mc_cot": ["Q: {q}\n{options}\nA: {rationale}\nSo the answer is {a}.",
               "Question: {q}\nOptions:\n{options}\nLet's reason it out. {rationale}\n"
               "Answer: {a}", "{q}\nChoose from:\n{options}\nExplanation: {rationale}\n"
               "The answer is {a}."],
}
# Marker styles for options: (the marker of option i, whether the answer can be the marker).
MARKERS = [(lambda i: "- ", False), (lambda i: "* ", False),
           (lambda i: f"({chr(65 + i)}) ", True), (lambda i: f"{chr(65 + i)}. ", True),
           (lambda i: f"{chr(97 + i)}) ", True), (lambda i: f"{i + 1}. ", True)]
LAYOUTS = ["classic"] * 7 + ["dialog", "numbered", "inline"]
PAIRS_FIRST = 0.1


def rng_for(doc_id: str, seed: int) -> random.Random:
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


def render_pair(pair: Pair, rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, both through a drawn Q/A pattern): options re-rendered with a drawn
    marker style, chain-of-thought answers split into rationale and final answer."""
    q, a = pair.instruction.strip(), pair.response.strip()
    cot = fmt.split_cot(a) if pair.kind in ("cot", "mc_cot") else None
    if cot is not None:
        q = q[:q.rfind(fmt.COT)].rstrip()
    options = fmt.options_of(q)
    final = cot[1] if cot else a
    question = q
    values = {"q": q}
    if options is not None:
        stem, opts = options
        marker, by_label = rng.choice(MARKERS)
        marks = [marker(i) for i in range(len(opts))]
        if by_label and final in opts:
            label = marks[opts.index(final)].strip()
            final = label if rng.random() < 0.5 else f"{label} {final}"
        listed = "\n".join(m + o for m, o in zip(marks, opts, strict=True))
        values = {"q": stem, "options": listed}
        question = f"{stem}\n{listed}"
    values["a"] = final
    answer = final
    if cot is not None:
        values |= {"rationale": cot[0], "final": final}
        answer = f"{cot[0]}\nSo the answer is {final}."
    kind = {(False, False): "plain", (True, False): "mc", (False, True): "cot",
            (True, True): "mc_cot"}[options is not None, cot is not None]
    return question, answer, rng.choice(PATTERNS[kind]).format(**values)


def render_entry(text: str, pairs: Sequence[Pair], doc_id: str, seed: int) -> str:
    """One text and its pairs as pre-training text; raw text when there are no pairs."""
    if not pairs:
        return text
    rng = rng_for(doc_id, seed)
    layout = rng.choice(LAYOUTS)
    rendered = [render_pair(p, rng) for p in pairs]
    qas = [qa for _, _, qa in rendered]
    if layout == "dialog":
        block = "\n".join(f"User: {q}\nAssistant: {a}" for q, a, _ in rendered)
    elif layout == "numbered":
        block = "\n\n".join(f"{n}. {qa}" for n, qa in enumerate(qas, start=1))
    elif layout == "inline":
        block = " ".join(qa.replace("\n", " ") for qa in qas)
    else:
        block = "\n\n".join(qas)
    if not text.strip():  # pairs without a text (closed-book questions): the pairs alone
        return block
    if rng.random() < PAIRS_FIRST:
        return f"{rng.choice(FIRST_LEAD_INS)}\n\n{block}\n\n{text.strip()}"
    lead = rng.choice(LEAD_INS)
    return f"{text.strip()}\n\n{lead + chr(10) + chr(10) if lead else ''}{block}"


def render_chain(entries: Sequence[tuple[str, Sequence[Pair], str]], seed: int) -> str:
    """An M-shot example: each linked entry (text, pairs, id) rendered, one after another."""
    return "\n\n".join(render_entry(text, pairs, doc_id, seed) for text, pairs, doc_id in entries)
