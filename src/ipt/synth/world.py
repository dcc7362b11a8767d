"""A synthetic world of people and their biographies: ground truth for knowledge extraction
(Allen-Zhu and Li's bioS, "Physics of Language Models: Part 3.1", arXiv 2309.14316).

Each person has a unique full name and six attributes: birth date, birth city, university,
major, employer and the employer's city (fixed by the employer). A biography states each
attribute in one sentence, drawn from 30 templates per attribute (the paper drew from about
50); options give several
paraphrases per person, a shuffled sentence order, and the full name in every sentence
instead of pronouns. Each attribute has one question, whose answer is the attribute's exact
text. People are split by a hash of their id into a train half and a test half.

`build` writes, into `out`:
- `biographies.jsonl`: every biography (`id` `<person>/<k>`, `text`), an ordinary source;
- `qa/`: the train half's questions in the synthesize stage's output format, one record per
  question, so the prepare stage renders them with its templates as it renders synthesized
  pairs (an oracle synthesizer); alone (closed-book, the paper's mixed training) or after one
  of the person's biographies (`qa_with_biography`, Instruction Pre-Training's layout);
- `qa_plain.jsonl`: the same questions as plain text in the tasks' prompt format, one
  document each (the paper's mixed training, without ipt's templates). A person's questions
  in one document would always put the same question first, right after BOS where the tasks
  ask theirs, and a model learns to answer that one whatever is asked;
- `qa_finetune.jsonl`: the same questions as prompt and answer segments, the answer alone
  trained on, for fine-tuning after pre-training (`train/finetune.py`);
- `tuning/`: every biography of the train half with all six of its questions, in the
  synthesize stage's output format, to tune a synthesizer on (`format=synth_tuning`): it
  learns to write a biography's questions and answers, and `score_synthesis` says how
  faithfully it writes them for the test half, whose biographies it never saw. With
  `tuning_people`, the biographies of that many people outside the world instead (drawn
  after the world's own, from the same pools and templates): a synthesizer that must copy
  from the text, because it cannot have learned anyone it is asked about;
- `tasks/`: lm-evaluation-harness tasks `world_train` and `world_test` (the question, the
  answer generated greedily to the end of the line, exact match);
- `example/`: one test-half question as a prompt (`prompt.txt`, for `train/sample.py
  prompt_file=`) and its answer (`answer.txt`): the demo's last act;
- `summary.json`: what was written, for every person, biography and question.

Everything follows from `seed`: the name and value pools, the people, the templates drawn.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipt.config import ConfigError, WorldConfig

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
MAJORS = (
    "Accounting", "Aerospace Engineering", "African Studies", "Agricultural Science",
    "Animal Science", "Anthropology", "Applied Mathematics", "Archaeology", "Architecture",
    "Art History", "Astronomy", "Biochemistry", "Bioengineering", "Biology", "Biophysics",
    "Botany", "Business Administration", "Chemical Engineering", "Chemistry",
    "Civil Engineering", "Classics", "Cognitive Science", "Communications",
    "Comparative Literature", "Computer Engineering", "Computer Science", "Construction Management",
    "Creative Writing", "Criminology", "Dance", "Data Science", "Dentistry", "Earth Science",
    "Ecology", "Economics", "Education", "Electrical Engineering", "English Literature",
    "Environmental Science", "Epidemiology", "Film Studies", "Finance", "Fine Arts",
    "Food Science", "Forestry", "French", "Game Design", "Genetics", "Geography", "Geology",
    "German", "Graphic Design", "Health Administration", "History", "Hospitality Management",
    "Industrial Design", "Industrial Engineering", "Information Systems",
    "International Relations", "Journalism", "Kinesiology", "Latin American Studies",
    "Law", "Linguistics", "Marine Biology", "Marketing", "Materials Science", "Mathematics",
    "Mechanical Engineering", "Media Studies", "Medicine", "Meteorology", "Microbiology",
    "Music", "Music Composition", "Neuroscience", "Nuclear Engineering", "Nursing",
    "Nutrition", "Oceanography", "Pharmacology", "Philosophy", "Photography", "Physics",
    "Physiology", "Political Science", "Psychology", "Public Health", "Public Policy",
    "Religious Studies", "Robotics", "Social Work", "Sociology", "Software Engineering",
    "Spanish", "Statistics", "Theater", "Urban Planning", "Veterinary Science", "Zoology")
POOLS = {"first": 400, "middle": 400, "last": 1000, "city": 200, "university": 300,
         "employer": 263}
ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p",
          "pr", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "y")
CODAS = ("", "", "", "", "n", "l", "r", "s", "m", "t")
COMPANY_KINDS = ("Industries", "Systems", "Labs", "Holdings", "Group", "Works", "Partners",
                 "Dynamics", "Technologies", "Foods", "Motors", "Media", "Logistics")

# One sentence per attribute: a core phrase, behind an opener (30 templates per attribute).
# {subj} {obj} {poss} are the person (full name or pronoun); {value} the attribute's text.
OPENERS = ("", "It is recorded that ", "Those who know {obj} say that ", "As it happens, ",
           "According to the records, ")
CORES = {
    "birth_date": ("{subj} was born on {value}", "{subj} came into this world on {value}",
                   "{poss} birthday falls on {value}", "{poss} date of birth is {value}",
                   "{subj} was brought into the world on {value}",
                   "{subj} celebrates {poss_adj} birthday every year; {subj_pron} was born "
                   "on {value}"),
    "birth_city": ("{subj} was born in {value}", "{poss} birthplace is {value}",
                   "{subj} first saw the light of day in {value}",
                   "{subj} spent {poss_adj} early years in {value}, where {subj_pron} was "
                   "born", "{poss} hometown is {value}", "{subj} hails from {value}"),
    "university": ("{subj} studied at {value}", "{subj} graduated from {value}",
                   "{subj} received {poss_adj} education at {value}",
                   "{subj} was a student at {value}", "{poss} alma mater is {value}",
                   "{subj} completed {poss_adj} degree at {value}"),
    "major": ("{subj} majored in {value}", "{subj} chose {value} as {poss_adj} field of study",
              "{poss} major was {value}", "{subj} specialized in {value}",
              "{subj} earned a degree in {value}", "{subj} focused {poss_adj} studies on {value}"),
    "employer": ("{subj} worked for {value}", "{subj} was employed by {value}",
                 "{poss} employer was {value}", "{subj} held a job at {value}",
                 "{subj} built a career at {value}", "{subj} was on the staff of {value}"),
    "employer_city": ("{subj} worked in {value}", "{poss} workplace was in {value}",
                      "{subj} commuted to an office in {value}",
                      "{subj} spent {poss_adj} working life in {value}",
                      "{poss} job was based in {value}", "{subj} was employed in {value}"),
}
QUESTIONS = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} study at?",
    "major": "What major did {name} study?",
    "employer": "Which company did {name} work for?",
    "employer_city": "Where did {name} work?",
}
PROMPT = "Question: {question}\nAnswer:"  # the tasks' and fine-tuning's prompt
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    pronoun: str  # he | she
    attributes: dict[str, str]
    split: str  # train | test


def templates(attribute: str) -> list[str]:
    """The attribute's sentence templates: every opener before every core phrase."""
    return [opener + core for core in CORES[attribute] for opener in OPENERS]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables)).capitalize()


def _pool(rng: random.Random, size: int, make: Any, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < size:
        w = make(rng)
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def pools(seed: int) -> dict[str, list[str]]:
    """The world's names and values, unique within and across pools."""
    rng = random.Random(f"world-pools:{seed}")
    taken: set[str] = set()
    names = {k: _pool(rng, POOLS[k], lambda r: _word(r, 2), taken)
             for k in ("first", "middle", "last")}
    cities = _pool(rng, POOLS["city"], lambda r: _word(r, r.choice((2, 3))), taken)
    universities = _pool(rng, POOLS["university"], lambda r: rng.choice((
        "University of {}", "{} University", "{} Institute of Technology", "{} College",
        "{} State University")).format(_word(r, r.choice((2, 3)))), taken)
    employers = _pool(rng, POOLS["employer"], lambda r: f"{_word(r, 2)} "
                      f"{r.choice(COMPANY_KINDS)}", taken)
    return {**names, "city": cities, "university": universities, "employer": employers,
            "employer_city": [rng.choice(cities) for _ in employers]}


def split_of(person_id: str, seed: int, test_fraction: float) -> str:
    h = hashlib.blake2b(f"{seed}:{person_id}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(h, "little") / 2**64 < test_fraction else "train"


def people(cfg: WorldConfig, count: int | None = None) -> list[Person]:
    """`count` (by default `cfg.people`) people with unique full names, in a fixed order:
    the first n of a larger count are the n people of the smaller one."""
    count = cfg.people if count is None else count
    p = pools(cfg.seed)
    capacity = POOLS["first"] * POOLS["middle"] * POOLS["last"]
    if not 0 < count <= capacity:
        raise ConfigError(f"people={count} must be between 1 and {capacity:,}")
    rng = random.Random(f"world-people:{cfg.seed}")
    names: set[str] = set()
    out = []
    for i in range(count):
        while True:
            name = f"{rng.choice(p['first'])} {rng.choice(p['middle'])} {rng.choice(p['last'])}"
            if name not in names:
                names.add(name)
                break
        employer = rng.randrange(POOLS["employer"])
        attributes = {
            "birth_date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, "
                          f"{rng.randint(1900, 2099)}",
            "birth_city": rng.choice(p["city"]),
            "university": rng.choice(p["university"]),
            "major": rng.choice(MAJORS),
            "employer": p["employer"][employer],
            "employer_city": p["employer_city"][employer],
        }
        pid = f"p{i:06d}"
        out.append(Person(pid, name, rng.choice(("he", "she")), attributes,
                          split_of(pid, cfg.seed, cfg.test_fraction)))
    return out


def _sentence(template: str, person: Person, value: str, named: bool) -> str:
    subj, obj, poss_adj = PRONOUNS[person.pronoun]
    forms = {"subj": subj, "obj": obj, "poss": poss_adj, "subj_pron": subj,
             "poss_adj": poss_adj}
    if named:  # the name where the subject, the object or the owner is named
        forms |= {"subj": person.name, "obj": person.name, "poss": f"{person.name}'s"}
    text = template.format(value=value, **forms)
    return text[0].upper() + text[1:] + "."


def biography(person: Person, k: int, cfg: WorldConfig) -> str:
    """The person's k-th biography: one sentence per attribute, templates drawn anew for
    each paraphrase, in a shuffled order with `permute`; the full name in the first sentence,
    and in every one with `fullname`."""
    rng = random.Random(f"world-bio:{cfg.seed}:{person.id}:{k}")
    order = list(ATTRIBUTES)
    if cfg.permute:
        rng.shuffle(order)
    return " ".join(_sentence(rng.choice(templates(a)), person, person.attributes[a],
                              named=cfg.fullname or i == 0)
                    for i, a in enumerate(order))


def questions(person: Person) -> list[tuple[str, str, str]]:
    """(attribute, question, answer) for each attribute."""
    return [(a, QUESTIONS[a].format(name=person.name), person.attributes[a])
            for a in ATTRIBUTES]


def task_yaml(name: str, data: Path, max_gen_toks: int) -> str:
    """A harness task over a local jsonl of questions: greedy to the end of the line,
    exact match with the answer."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
            f"test_split: train\noutput_type: generate_until\n"
            f"doc_to_text: {json.dumps(PROMPT.replace('{question}', '{{question}}'))}\n"
            'doc_to_target: "{{answer}}"\ntarget_delimiter: " "\n'
            f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {max_gen_toks}\n'
            "  do_sample: false\n"
            "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n"
            "      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def build(cfg: WorldConfig) -> dict[str, Any]:
    """Write the world's biographies, training QA, fine-tuning QA, tasks and summary."""
    if cfg.paraphrases < 1:
        raise ConfigError(f"paraphrases={cfg.paraphrases} must be >= 1")
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"test_fraction={cfg.test_fraction} must be in (0, 1)")
    if cfg.tuning_people < 0:
        raise ConfigError(f"tuning_people={cfg.tuning_people} must be >= 0")
    out = Path(cfg.out)
    everyone = people(cfg)
    bios = [{"id": f"{p.id}/{k}", "person": p.id, "text": biography(p, k, cfg)}
            for p in everyone for k in range(cfg.paraphrases)]
    _write_jsonl(out / "biographies.jsonl", bios)
    bios_of: dict[str, list[dict]] = {}
    for b in bios:
        bios_of.setdefault(b["person"], []).append(b)
    first_bio = {person: mine[0]["text"] for person, mine in bios_of.items()}

    train = [p for p in everyone if p.split == "train"]
    # one record per question: each drawn its own template, none always first after BOS
    qa_rows = [{"id": f"{p.id}/{a}", "input_id": f"{p.id}/{a}", "status": "ok",
                "text": first_bio[p.id] if cfg.qa_with_biography else "",
                "pairs": [{"instruction": q, "response": ans}]}
               for p in train for a, q, ans in questions(p)]
    per_shard = max(1, cfg.people_per_shard)
    shards = [qa_rows[i:i + per_shard] for i in range(0, len(qa_rows), per_shard)] or [[]]
    for n, rows in enumerate(shards):
        _write_jsonl(out / "qa" / "shards" / f"shard_{n:05d}.jsonl", rows)
    (out / "qa" / "summary.json").write_text(json.dumps({
        "synthesizer": "world (oracle)", "groups_done": len(shards),
        "groups_total": len(shards), "docs": len(qa_rows),
        "pairs": sum(len(r["pairs"]) for r in qa_rows)}, indent=1))

    # the synthesizer's teachers: the train half, or people outside the world altogether
    if cfg.tuning_people:
        teachers = people(cfg, cfg.people + cfg.tuning_people)[cfg.people:]
        texts = {p.id: [biography(p, k, cfg) for k in range(cfg.paraphrases)]
                 for p in teachers}
    else:
        teachers, texts = train, {p.id: [b["text"] for b in bios_of[p.id]] for p in train}
    tuning = [{"id": f"{p.id}/{k}", "input_id": f"{p.id}/{k}", "status": "ok", "text": text,
               "pairs": [{"instruction": q, "response": ans} for _, q, ans in questions(p)]}
              for p in teachers for k, text in enumerate(texts[p.id])]
    _write_jsonl(out / "tuning" / "shards" / "shard_00000.jsonl", tuning)
    (out / "tuning" / "summary.json").write_text(json.dumps({
        "synthesizer": "world (oracle)", "groups_done": 1, "groups_total": 1,
        "docs": len(tuning), "pairs": sum(len(r["pairs"]) for r in tuning)}, indent=1))

    _write_jsonl(out / "qa_plain.jsonl", [
        {"id": f"{p.id}/{a}", "text": f"{PROMPT.format(question=q)} {ans}"}
        for p in train for a, q, ans in questions(p)])
    _write_jsonl(out / "qa_finetune.jsonl", [
        {"id": f"{p.id}/{a}", "segments": [
            {"text": PROMPT.format(question=q), "loss": False},
            {"text": f" {ans}", "loss": True}]}
        for p in train for a, q, ans in questions(p)])

    tasks = out / "tasks"
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "test"):
        rows = [{"id": f"{p.id}/{a}", "person": p.id, "attribute": a, "question": q,
                 "answer": ans} for p in everyone if p.split == split
                for a, q, ans in questions(p)]
        _write_jsonl(tasks / f"world_{split}.jsonl", rows)
        (tasks / f"world_{split}.yaml").write_text(
            task_yaml(f"world_{split}", (tasks / f"world_{split}.jsonl").resolve(),
                      cfg.max_gen_toks))
        counts[split] = {"people": sum(p.split == split for p in everyone),
                         "questions": len(rows)}
    asked = next((p for p in everyone if p.split == "test"), None)
    if asked is not None:  # a one-word answer: the birth city
        (out / "example").mkdir(parents=True, exist_ok=True)
        (out / "example" / "prompt.txt").write_text(
            PROMPT.format(question=QUESTIONS["birth_city"].format(name=asked.name)))
        (out / "example" / "answer.txt").write_text(asked.attributes["birth_city"] + "\n")
    summary: dict[str, Any] = {
        "people": len(everyone), "biographies": len(bios), "paraphrases": cfg.paraphrases,
        "permute": cfg.permute, "fullname": cfg.fullname,
        "qa_with_biography": cfg.qa_with_biography, "seed": cfg.seed,
        "templates_per_attribute": {a: len(templates(a)) for a in ATTRIBUTES},
        "train": counts["train"], "test": counts["test"],
        "qa_training_pairs": sum(len(r["pairs"]) for r in qa_rows),
        "tuning_people": cfg.tuning_people, "tuning_biographies": len(tuning),
        "biography_chars": sum(len(b["text"]) for b in bios),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def score_synthesis(world_dir: Path, synth_dir: Path) -> dict[str, dict[str, Any]]:
    """How a synthesizer did on the world's biographies, per half: the share of biographies
    whose generation parsed into pairs, and the share of pairs that are faithful (the question
    is one of the person's, word for word, and the answer is its attribute's exact text)."""
    truth: dict[str, dict[str, str]] = {}  # person -> question -> answer
    split: dict[str, str] = {}
    for half in ("train", "test"):
        for r in (json.loads(line) for line in
                  (world_dir / "tasks" / f"world_{half}.jsonl").read_text().splitlines()):
            truth.setdefault(r["person"], {})[r["question"]] = r["answer"]
            split[r["person"]] = half
    counts: dict[str, dict[str, Any]] = {
        half: {"biographies": 0, "parsed": 0, "pairs": 0, "faithful": 0}
        for half in ("train", "test")}
    for f in sorted((synth_dir / "shards").glob("shard_*.jsonl")):
        for r in (json.loads(line) for line in f.read_text().splitlines()):
            person = r.get("input_id", r["id"]).rsplit("/", 1)[0]
            if person not in split:
                raise ValueError(f"{f}: record {r['id']!r} is not a biography of the world in "
                                 f"{world_dir} (no person {person!r})")
            c = counts[split[person]]
            c["biographies"] += 1
            c["parsed"] += r["status"] == "ok"
            c["pairs"] += len(r["pairs"])
            c["faithful"] += sum(truth[person].get(p["instruction"].strip()) ==
                                 p["response"].strip() for p in r["pairs"])
    for c in counts.values():
        c["parse_rate"] = round(c["parsed"] / c["biographies"], 4) if c["biographies"] else None
        c["faithfulness"] = round(c["faithful"] / c["pairs"], 4) if c["pairs"] else None
    return counts
