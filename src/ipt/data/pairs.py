"""The released instruction synthesizer's text format: building prompts, parsing generations.

The synthesizer was fine-tuned on exactly this layout, so it is a protocol, not a style
choice (spec section 2):

    <s> <CON> {text} </CON>\n\n<QUE> {q1} <ANS> {a1} </END>\n\n<QUE> {q2} <ANS> {a2} </END></s>

`<s>` and `</s>` are written as literal strings; the model's tokenizer turns them into its
BOS and EOS tokens. A prompt is zero or more finished examples followed by the context of
the text to read; the model writes the pairs and stops at `</s>`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

BOS, EOS = "<s>", "</s>"
CON_OPEN, CON_CLOSE = "<CON>", "</CON>"
QUE, ANS, END = "<QUE>", "<ANS>", "</END>"
OPTIONS = "Options:"
COT = "Let's think step by step."
THEREFORE = "Therefore, the answer is"


@dataclass(frozen=True)
class Pair:
    instruction: str
    response: str

    @property
    def kind(self) -> str:
        """plain | mc (multiple choice) | cot (chain of thought) | mc_cot."""
        mc = options_of(self.instruction) is not None
        cot = self.instruction.rstrip().endswith(COT)
        return {(False, False): "plain", (True, False): "mc", (False, True): "cot",
                (True, True): "mc_cot"}[mc, cot]

    def to_json(self) -> dict[str, str]:
        return {"instruction": self.instruction, "response": self.response}


@dataclass
class Parsed:
    pairs: list[Pair] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)  # reason -> pieces dropped


def context(text: str) -> str:
    """The part of an example that shows the text: `<s> <CON> {text} </CON>` + two newlines."""
    return f"{BOS} {CON_OPEN} {text} {CON_CLOSE}\n\n"


def render_pairs(pairs: list[Pair]) -> str:
    """The part the synthesizer writes, up to (not including) the final `</s>`."""
    return "\n\n".join(f"{QUE} {p.instruction} {ANS} {p.response} {END}" for p in pairs)


def example(text: str, pairs: list[Pair]) -> str:
    """A finished one-shot example, as in the tuning data and in chained prompts."""
    return context(text) + render_pairs(pairs) + EOS


def prompt(text: str, shots: Sequence[tuple[str, list[Pair]]] = ()) -> str:
    """Finished examples of earlier texts (multi-round chaining), then the text to read."""
    return "".join(example(t, ps) for t, ps in shots) + context(text)


def parse(generation: str) -> Parsed:
    """The pairs of a generation; every dropped piece is counted by its reason.

    Never raises: a generation is model output and may be anything.
    """
    out = Parsed()
    body = generation.split(EOS)[0]  # anything after the end of the example is not ours
    *pieces, last = body.split(END)  # `last` is blank when the generation closed its pair
    if last.strip():
        out.drops["truncated"] += 1  # cut off by the token limit, or never closed
    seen: set[str] = set()
    for piece in pieces:
        parts = piece.split(ANS)
        if len(parts) != 2:
            out.drops["no_answer_marker" if len(parts) < 2 else "several_answer_markers"] += 1
            continue
        question, answer = parts[0].strip(), parts[1].strip()
        if not question.startswith(QUE):
            out.drops["no_question_marker"] += 1
            continue
        question = question[len(QUE):].strip()
        if not question:
            out.drops["empty_question"] += 1
        elif not answer:
            out.drops["empty_answer"] += 1
        elif question.lower() in seen:
            out.drops["duplicate_question"] += 1
        else:
            seen.add(question.lower())
            out.pairs.append(Pair(question, answer))
    return out


def options_of(question: str) -> tuple[str, list[str]] | None:
    """A multiple-choice question split into its stem and option texts, else None.

    The tuning data writes options as a line `Options:` followed by one `- option` line each
    (a chain-of-thought trigger may follow them).
    """
    head, sep, tail = question.rpartition(OPTIONS)
    if not sep:
        return None
    options = []
    for line in tail.strip().splitlines():
        line = line.strip()
        if line.startswith("- "):
            options.append(line[2:].strip())
        elif line != COT and line:
            return None
    return (head.rstrip(), options) if len(options) >= 2 else None


def split_cot(answer: str) -> tuple[str, str] | None:
    """A chain-of-thought answer split into (rationale, final answer), else None."""
    rationale, sep, final = answer.rpartition(THEREFORE)
    if not sep or not final.strip():
        return None
    return rationale.strip(), final.strip().rstrip(".")
