"""The rule-based miner (AdaptLLM): reading-comprehension tasks from raw text, no model.

Sentences are joined by connector words whose meaning is known ("However" contradicts,
"Therefore" entails, "In other words" paraphrases). Removing the connector and asking about
the relation of the two sentences gives a task whose answer the text itself states. The
miner also asks for definitions ("X is defined as ..."), topics ("... is about ..."),
keywords of a domain vocabulary, a title for a text that has one, and the next sentence.

Deterministic: the same text (and id) always gives the same pairs. At most `per_kind`
tasks of each kind per text. The tasks use the released synthesizer's sub-formats
(`Options:` lists for multiple choice), so mined pairs are also synthesizer tuning data.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterator

from ipt.data.pairs import OPTIONS, Pair

ENTAIL = ("Yes", "Therefore", "Thus", "Accordingly", "Hence", "For this reason")
CONTRADICT = ("No", "However", "But", "On the contrary", "In contrast", "Whereas")
NEUTRAL = ("Maybe", "Also", "Furthermore", "Secondly", "Additionally", "Moreover",
           "In addition")
CAUSE_EFFECT = ("Thus", "Therefore", "Accordingly", "Hence", "For this reason")
EFFECT_CAUSE = ("due to", "on account of", "owing to")
SIMILAR = ("In other words", "Namely", "That is to say", "i.e.", "Similarly", "Equally")

# One template is drawn per task (seeded by the document), so the corpus is varied but
# reproducible. {a}/{b} are the two sentences, {x} a term, {t} the text's first words.
NLI = ['Does the sentence "{a}" entail the sentence "{b}"?',
       'Premise: "{a}"\nHypothesis: "{b}"\nDoes the premise entail the hypothesis?',
       'Here is a premise: {a}\nHere is a hypothesis: {b}\nIs it possible to conclude that, '
       'if the premise is true, then so is the hypothesis?',
       'Sentence 1: {a}\nSentence 2: {b}\nIs sentence 2 true, based on sentence 1?']
NLI_OPTIONS = {"entail": "yes", "neutral": "it is not possible to tell", "contradict": "no"}
EFFECT = ['What is the effect of the following?\n"{a}"', '"{a}"\nWhat happens as a result?',
          'What is a likely consequence of this: {a}']
CAUSE = ['What is the reason for the following?\n"{b}"', '"{b}"\nWhy is that?',
         'What causes this: {b}']
PARAPHRASE = ['Do the sentences "{a}" and "{b}" express the same meaning?',
              'Sentence A: {a}\nSentence B: {b}\nAre these two sentences paraphrases of each '
              'other?',
              'Is "{b}" a rewording of "{a}"?']
DEFINITION = ['How is "{x}" defined?', 'What is the definition of {x}?', 'Define {x}.']
TOPIC = ['What is "{x}" about?', 'Give the topic of {x}.', 'What does {x} deal with?']
KEYWORDS = ['Write a sentence about the following terms: {x}.',
            'Use these words in a sentence: {x}.',
            'Generate a sentence that includes the keywords {x}.']
TITLE = ['What is a good title for this text?', 'Suggest a title for the text.',
         'Write a title for the text that starts with "{t}".']
NEXT = ['What sentence comes after this one in the text?\n"{a}"',
        'Continue the text: {a}', 'Complete the passage after "{a}"']

SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
DEFINES = re.compile(r"^(?P<x>[A-Z][\w\s\-']{1,60}?) (?:is|are) defined as (?P<y>.+)$")
ABOUT = re.compile(r"^(?P<x>[A-Z][\w\s\-']{1,60}?) (?:is|are) about (?P<y>.+)$")
WORD = re.compile(r"[A-Za-z][A-Za-z\-]+")


def sentences(text: str) -> list[str]:
    """The sentences of a text in order, whitespace collapsed (short ones included, so that
    two sentences adjacent here are adjacent in the text)."""
    flat = " ".join(text.split())
    return [s.strip() for s in SENTENCE.split(flat) if s.strip()] if flat else []


def _strip_connector(sentence: str, connectors: tuple[str, ...]) -> str | None:
    for c in connectors:
        # "Yes"/"No" are connectors only as "Yes, ..." ("No feature is ..." is not one).
        if sentence.startswith(c + ",") or (c not in ("Yes", "No")
                                            and sentence.startswith(c + " ")):
            rest = sentence[len(c):].lstrip(" ,")
            return rest[:1].upper() + rest[1:] if rest else None
    return None


def _mc(question: str, options: list[str]) -> str:
    return question + f"\n{OPTIONS}\n" + "\n".join(f"- {o}" for o in options)


class Miner:
    """Mines pairs from one text at a time; `domain_words` enables the keyword task."""

    def __init__(self, min_chars: int = 50, per_kind: int = 2,
                 domain_words: frozenset[str] = frozenset()) -> None:
        self.min_chars, self.per_kind, self.domain_words = min_chars, per_kind, domain_words

    def mine(self, text: str, doc_id: str = "") -> list[Pair]:
        rng = random.Random(zlib.crc32(f"{doc_id}\n{text[:2000]}".encode()))
        sents = sentences(text)
        pairs: list[Pair] = []
        seen: set[str] = set()
        for kind in (self._nli, self._causal, self._paraphrase, self._word_to_text,
                     self._title, self._next):
            n = 0
            for pair in kind(sents, text, rng):
                if n == self.per_kind:
                    break
                if pair.instruction.lower() not in seen:
                    seen.add(pair.instruction.lower())
                    pairs.append(pair)
                    n += 1
        return pairs

    def _long(self, s: str) -> bool:
        return len(s) >= self.min_chars

    def _adjacent(self, sents: list[str]) -> Iterator[tuple[str, str]]:
        for a, b in zip(sents, sents[1:], strict=False):
            if self._long(a) and self._long(b):
                yield a, b

    def _nli(self, sents: list[str], _: str, rng: random.Random) -> Iterator[Pair]:
        for a, b in self._adjacent(sents):
            for label, connectors in (("entail", ENTAIL), ("contradict", CONTRADICT),
                                      ("neutral", NEUTRAL)):
                if (rest := _strip_connector(b, connectors)) and self._long(rest):
                    q = rng.choice(NLI).format(a=a, b=rest)
                    yield Pair(_mc(q, list(NLI_OPTIONS.values())), NLI_OPTIONS[label])
                    break

    def _causal(self, sents: list[str], _: str, rng: random.Random) -> Iterator[Pair]:
        for a, b in self._adjacent(sents):
            if (rest := _strip_connector(b, CAUSE_EFFECT)) and self._long(rest):
                yield Pair(rng.choice(EFFECT).format(a=a), rest)
        for s in sents:
            for c in EFFECT_CAUSE:
                effect, sep, cause = s.partition(f" {c} ")
                if sep and len(effect) >= self.min_chars // 2 and len(cause) > 10:
                    b = effect.rstrip(" ,") + "."
                    yield Pair(rng.choice(CAUSE).format(b=b), cause.rstrip(".") + ".")
                    break

    def _paraphrase(self, sents: list[str], _: str, rng: random.Random) -> Iterator[Pair]:
        for a, b in self._adjacent(sents):
            for answer, connectors in (("yes", SIMILAR), ("no", CONTRADICT)):
                if (rest := _strip_connector(b, connectors)) and self._long(rest):
                    q = rng.choice(PARAPHRASE).format(a=a, b=rest)
                    yield Pair(_mc(q, ["yes", "no"]), answer)
                    break

    def _word_to_text(self, sents: list[str], _: str, rng: random.Random) -> Iterator[Pair]:
        for s in sents:
            for pattern, pool in ((DEFINES, DEFINITION), (ABOUT, TOPIC)):
                if m := pattern.match(s):
                    yield Pair(rng.choice(pool).format(x=m["x"].strip()), s)
        if self.domain_words:
            for s in filter(self._long, sents):
                words = list(dict.fromkeys(w for w in WORD.findall(s)
                                           if w.lower() in self.domain_words))
                if len(words) >= 3:
                    yield Pair(rng.choice(KEYWORDS).format(x=", ".join(words[:5])), s)

    def _title(self, _: list[str], text: str, rng: random.Random) -> Iterator[Pair]:
        head, sep, body = text.strip().partition("\n")
        head = head.strip().rstrip(".")
        if sep and 10 <= len(head) <= 100 and len(body.strip()) >= 2 * self.min_chars \
                and not head.endswith(":"):
            yield Pair(rng.choice(TITLE).format(t=" ".join(body.split()[:6])), head)

    def _next(self, sents: list[str], _: str, rng: random.Random) -> Iterator[Pair]:
        pairs = list(self._adjacent(sents))
        if pairs:
            a, b = pairs[rng.randrange(len(pairs))]
            yield Pair(rng.choice(NEXT).format(a=a), b)


def read_words(path: str | None) -> frozenset[str]:
    """A domain vocabulary file, one word per line (lower-cased); none when `path` is None."""
    if not path:
        return frozenset()
    with open(path, encoding="utf-8") as f:
        return frozenset(w.strip().lower() for w in f if w.strip())

