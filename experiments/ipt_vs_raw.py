"""Does instruction pre-training beat raw pre-training at equal tokens, at toy scale?

    python experiments/ipt_vs_raw.py          # or: make experiment-ipt (about 30 min here)
    python experiments/ipt_vs_raw.py --steps 300 --seeds 0 1 2 --held-out 0.1 --parallel 2

The data, built once under `--out`/data, every stage a real entry point:
1. The demo's corpora (docstrings, package descriptions) and its tokenizer.
2. The rules miner augments 1/5 of the docstrings in 2 chained rounds.
3. A tiny synthesizer is fine-tuned on the mined pairs (the demo's recipe), and writes pairs
   for a sample of the package descriptions.
4. Three corpora, each prepared into shards:
   - **vanilla**: the raw docstrings and package descriptions;
   - **instruct**: the same documents, with those of steps 2 and 3 followed by their pairs
     in the paper's templates, linked ones chained into one 2-shot text;
   - **mix**: the raw documents, plus each document's pairs as a text of its own, detached.
5. Reading-comprehension tasks from the docstrings every stage held out (`--held-out` by id
   hash), and their raw text (`data_pipeline/rc_tasks.py`).

For each seed, one 4-layer model per arm is pre-trained with the same initial weights, the
same sample-order seed, the same steps, batch and sequence length (so the same number of
tokens), then exported and evaluated with lm-evaluation-harness: 0-shot and 3-shot on the
held-out tasks, and bits per byte on the held-out text. Runs go `--parallel` at a time, each
one process with one thread. Results: experiments/results/ipt_vs_raw.json and a markdown
table on stdout (docs/evaluation.md records it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ipt.config import DemoDataConfig, SourceConfig  # noqa: E402
from ipt.data import sources as src  # noqa: E402
from ipt.data.demo import build_demo_data  # noqa: E402
from ipt.data.pairs import Pair  # noqa: E402
from ipt.data.templates import render_pair, rng_for  # noqa: E402
from ipt.evaluate import flat_metrics  # noqa: E402
from ipt.synth.rc_tasks import TASK_NAMES, TEXT_TASK  # noqa: E402

ARMS = ("vanilla", "instruct", "mix")
FEW_SHOT_TASKS = ["heldout_mc_sciq", "heldout_mc_unseen", "heldout_boolq", "heldout_em_sciq"]


def run(cmd: list[str], log: Path, threads: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, *cmd], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def synth_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((folder / "shards").glob("shard_*.jsonl"))
            for line in f.read_text().splitlines()]


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    with open(path, "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")


def build_arms(data: Path) -> dict[str, int]:
    """vanilla.jsonl, instruct.jsonl and mix.jsonl in data/arms; the documents of each."""
    raw = [(d.id, d.text) for d in src.read(SourceConfig(
        name="docstrings", path=str(data / "raw" / "docstrings.jsonl"), id_field="id"))
        if isinstance(d, src.Doc)]
    raw += [(d.id, d.text) for d in src.read(SourceConfig(
        name="packages", path=str(data / "raw" / "packages"))) if isinstance(d, src.Doc)]
    synth = {}  # a raw text -> its document in the instruction-augmented corpus
    pairs = []  # the detached pairs, one text per document
    for folder in (data / "synth" / "rules", data / "synth" / "tiny"):
        rows = {r["text"]: r for r in synth_rows(folder)}
        rendered = {d.id: d.text for d in src.read(SourceConfig(name="s", path=str(folder)))
                    if isinstance(d, src.Doc)}
        for text, r in rows.items():
            # a linked document is rendered inside its chain, under the chain's first id
            synth[text] = rendered.get(r["id"], "")
            if r["pairs"]:
                rng = rng_for(r["id"], 0)
                qas = [render_pair(Pair(**p), rng)[2] for p in r["pairs"]]
                pairs.append((f"{r['id']}#pairs", "\n\n".join(qas)))
    arms = {"vanilla": raw,
            "instruct": [(i, synth.get(t, t)) for i, t in raw if synth.get(t, t)],
            "mix": raw + pairs}
    (data / "arms").mkdir(exist_ok=True)
    for name, docs in arms.items():
        write_jsonl(data / "arms" / f"{name}.jsonl", docs)
    return {name: len(docs) for name, docs in arms.items()}


def build_data(out: Path, held_out: float) -> Path:
    data = out / "data"
    build_demo_data(DemoDataConfig(out=str(data)))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tok = data / "tokenizer"
    common = [f"valid_fraction={held_out}", "progress_bar=never"]
    if not (data / "synth" / "rules" / "summary.json").exists():
        run(["data_pipeline/synthesize.py", f"source.path={data}/raw/docstrings.jsonl",
             "source.id_field=id", f"out={data}/synth/rules", "fraction=0.2",
             f"synth.tokenizer={tok}", *common], logs / "mine.log")
    synth_model = out / "synth"
    if not (synth_model / "hf" / "config.json").exists():
        run(["data_pipeline/prepare.py", f"tokenizer={tok}", f"out={data}/shards",
             f"+sources.synth_tuning.path={data}/synth/rules",
             "+sources.synth_tuning.format=synth_tuning", *common], logs / "prepare_tuning.log")
        run(["train/finetune.py", "experiment=synth_demo", f"data.root={data}",
             f"run_dir={synth_model}", "logger.progress_bar=never", "logger.plot=false"],
            logs / "synth_finetune.log", threads=2)
    if not (data / "synth" / "tiny" / "summary.json").exists():
        run(["data_pipeline/synthesize.py", f"source.path={data}/raw/packages",
             f"out={data}/synth/tiny", "max_docs=64", "synth=hf",
             f"synth.model={synth_model}/hf", "synth.context=512", "synth.max_text_tokens=128",
             "synth.max_new_tokens=128", *common], logs / "synth_tiny.log", threads=2)
    if not (data / "arms" / "mix" / "summary.json").exists():
        counts = build_arms(data)
        print(f"documents per arm: {counts}", flush=True)
        run(["data_pipeline/prepare.py", f"tokenizer={tok}", f"out={data}/arms",
             *[f"+sources.{a}.{k}={v}" for a in ARMS
               for k, v in (("path", f"{data}/arms/{a}.jsonl"), ("id_field", "id"))],
             *common], logs / "prepare_arms.log", threads=2)
    if not (data / "rc_tasks" / "summary.json").exists():
        run(["data_pipeline/rc_tasks.py", f"source.path={data}/raw/docstrings.jsonl",
             "source.id_field=id", f"valid_fraction={held_out}", "max_chars=500",
             f"out={data}/rc_tasks"], logs / "rc_tasks.log")
    return data


def train_and_evaluate(data: Path, run_dir: Path, arm: str, seed: int, steps: int,
                       model: str) -> dict:
    """One arm and seed: pre-train, export, evaluate (0- and 3-shot); its scores."""
    if not (run_dir / "summary.json").exists():
        run(["train/pretrain.py", "experiment=demo", f"model={model}", "data=custom",
             f"data.root={data}",
             f"tokenizer={data}/tokenizer", f"+data.sources.{arm}.path={data}/arms/{arm}",
             f"run_dir={run_dir}", f"name={arm}-s{seed}", f"train.max_steps={steps}",
             f"train.eval_every={steps}", "train.checkpoint_every=0", "train.keep_last=1",
             f"train.seed={seed}", f"data.seed={seed}", "schedule.warmup_steps=20",
             "train.threads_per_rank=1", "logger.progress_bar=never", "logger.plot=false"],
            run_dir.with_suffix(".log"))
    scores = {}
    for shots, tasks in ((0, [*TASK_NAMES, TEXT_TASK]), (3, FEW_SHOT_TASKS)):
        out = run_dir / f"eval-{shots}shot"
        if not (out / "results.json").exists():
            run(["train/evaluate.py", f"checkpoint={run_dir}/hf", f"tasks=[{','.join(tasks)}]",
                 f"include_path={data}/rc_tasks", f"out={out}", f"num_fewshot={shots}"],
                run_dir.with_name(f"{run_dir.name}-eval{shots}.log"))
        results = json.loads((out / "results.json").read_text())["results"]
        for key, value in flat_metrics(results).items():
            scores[f"{key.removeprefix('downstream/')}/{shots}shot"] = value
    return scores


def summarize(runs: dict[tuple[str, int], dict], chance: dict[str, float]) -> dict:
    keys = sorted({k for scores in runs.values() for k in scores})
    table = {}
    for key in keys:
        row = {}
        for arm in ARMS:
            values = [s[key] for (a, _), s in runs.items() if a == arm and key in s]
            row[arm] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values}
        task = key.split("/")[0]
        row["chance"] = chance.get(task)
        table[key] = row
    return table


def markdown(table: dict) -> str:
    lines = ["| task | metric | shots | vanilla | instruct | mix | chance |",
             "|---|---|---|---|---|---|---|"]
    for key, row in table.items():
        task, metric, shots = key.split("/")
        if metric in ("word_perplexity", "byte_perplexity"):
            continue
        cells = [f"{row[a]['mean']:.3f} ± {row[a]['std']:.3f}" for a in ARMS]
        level = "-" if row["chance"] is None else f"{row['chance']:.2f}"
        lines.append(f"| {task} | {metric} | {shots.removesuffix('shot')} | "
                     f"{' | '.join(cells)} | {level} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="a model config (configs/model/)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "exp-ipt"))
    args = ap.parse_args()

    out = Path(args.out)
    data = build_data(out, args.held_out)
    jobs = {(arm, seed): out / f"{arm}-s{seed}" for seed in args.seeds for arm in ARMS}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {key: pool.submit(train_and_evaluate, data, d, key[0], key[1], args.steps,
                                    args.model) for key, d in jobs.items()}
        runs = {key: f.result() for key, f in futures.items()}
    tasks = json.loads((data / "rc_tasks" / "summary.json").read_text())
    chance = {n: t["chance"] for n, t in tasks["tasks"].items() if "chance" in t}
    table = summarize(runs, chance)
    corpora = {a: json.loads((data / "arms" / a / "summary.json").read_text()) for a in ARMS}
    result = {"steps": args.steps, "seeds": args.seeds, "held_out": args.held_out,
              "model": args.model, "global_batch": 32, "seq_len": 256,
              "tokens_per_run": args.steps * 32 * 256,
              "corpora": {a: {k: v for k, v in c.items() if k.endswith(("_docs", "_tokens"))}
                          for a, c in corpora.items()},
              "tasks": tasks["tasks"], "table": table,
              "runs": {f"{a}-s{s}": scores for (a, s), scores in runs.items()}}
    dest = ROOT / "experiments" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "ipt_vs_raw.json").write_text(json.dumps(result, indent=1))
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
