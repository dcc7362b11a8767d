"""Does instruction-augmented pre-training make knowledge extractable, where pre-training then
fine-tuning does not? Closed-book questions about synthetic people (Allen-Zhu and Li's bioS).

    python experiments/knowledge.py            # or: make experiment-knowledge (about 40 min)
    python experiments/knowledge.py --arms A B B-plain --seeds 0 --curve 50

The data, built once under `--out`/data, every stage a real entry point:
1. a world of `--people` people (`data_pipeline/world.py`, options `--world`; by default
   four paraphrased biographies per person with their sentences shuffled): biographies, the
   train half's questions in the synthesize stage's format and as fine-tuning examples, the
   synthesizer's tuning data, and lm-evaluation-harness tasks for both halves;
2. a sentencepiece tokenizer trained on the world's text (`data_pipeline/tokenizer.py`);
3. the corpora prepared into shards, none held out (`data_pipeline/prepare.py`).

The arms, per seed, from the same initial weights and at the same number of training
tokens (`--steps` steps of the same batch and sequence length):
- **A**: the biographies for `steps - ft_steps` steps, then `train/finetune.py` on the train
  half's questions for `ft_steps` steps (loss on the answers);
- **B**: the biographies and the train half's questions in ipt's templates, mixed in one
  pre-training run, the questions `--qa-share` of the tokens;
- **B-plain**: B with the questions as plain text in the tasks' prompt format, one question
  per document (the paper's mixed training, without ipt's templates);
- **C**: Instruction Pre-Training's whole path: a tiny synthesizer tuned on the train half's
  biographies and their questions (`train/finetune.py` on `format=synth_tuning`) writes
  pairs for every biography (`data_pipeline/synthesize.py`, `synth=hf`), test half included;
  the biographies mixed with that output (each biography followed by its pairs, in ipt's
  templates) as B mixes its questions. The synthesizer is built once for all seeds; its
  parse rate and faithfulness per half are in the results;
- **A-mtp**, **B-mtp**: A and B with multi-token prediction (`loss=mtp`, `--heads` heads).

Each run is exported and scored by the harness on both halves (exact match of the greedy
answer). Results: experiments/results/knowledge.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("A", "B", "B-plain", "C", "A-mtp", "B-mtp")
SEQ_LEN, BATCH = 256, 32


def run(cmd: list[str], log: Path, threads: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, *cmd], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


# What the data and every run under --out follow from: a later call must agree.
SETTINGS = ("people", "world", "steps", "ft_steps", "qa_share", "lr", "ft_lr", "heads",
            "mtp_options", "synth_steps", "curve")


def check_out(out: Path, args: argparse.Namespace) -> None:
    """Runs and data under `out` are reused, so they must be of these settings."""
    mine = {k: getattr(args, k) for k in SETTINGS}
    f = out / "settings.json"
    if f.exists():
        theirs = json.loads(f.read_text())
        changed = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            raise SystemExit(f"{out} holds runs of other settings ({what}): pass another "
                             "--out, or remove it")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(mine, indent=1))


def build_data(out: Path, people: int, world_options: list[str]) -> Path:
    data = out / "data"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    world = data / "world"
    if not (world / "summary.json").exists():
        run(["data_pipeline/world.py", f"out={world}", f"people={people}", *world_options],
            logs / "world.log")
    tok = data / "tokenizer"
    if not (tok / "tokenizer_config.json").exists():
        run(["data_pipeline/tokenizer.py", f"out={tok}", "vocab_size=2048",
             f"+sources.bios.path={world}/biographies.jsonl",
             f"+sources.questions.path={world}/qa_plain.jsonl",
             f"+sources.qa.path={world}/qa", "+sources.qa.format=synth",
             f"+sources.tuning.path={world}/tuning", "+sources.tuning.format=synth_tuning"],
            logs / "tokenizer.log")
    shards = data / "shards"
    if not (shards / "tuning" / "summary.json").exists():
        run(["data_pipeline/prepare.py", f"tokenizer={tok}", f"out={shards}",
             "valid_fraction=0.0", "workers=2", "progress_bar=never",
             f"+sources.bios.path={world}/biographies.jsonl", "+sources.bios.id_field=id",
             f"+sources.qa.path={world}/qa", "+sources.qa.format=synth",
             f"+sources.qa_plain.path={world}/qa_plain.jsonl", "+sources.qa_plain.id_field=id",
             f"+sources.qa_ft.path={world}/qa_finetune.jsonl",
             "+sources.qa_ft.segments_field=segments", "+sources.qa_ft.id_field=id",
             f"+sources.tuning.path={world}/tuning", "+sources.tuning.format=synth_tuning",
             "+sources.tuning.shots=2"],
            logs / "prepare.log", threads=2)
    return data


SYNTH_LOCK = threading.Lock()


def synthesize(data: Path, args: argparse.Namespace) -> Path:
    """Arm C's data, built once for its seeds: a tiny synthesizer tuned on the train half's
    biographies and their questions (loss on the pairs) writes pairs for every biography,
    and its output is prepared as the synthesize stage's output always is."""
    with SYNTH_LOCK:
        logs = data.parent / "logs"
        tuned, synth, shards = data / "synthesizer", data / "synth", data / "shards_c"
        if not (tuned / "summary.json").exists():
            run(["train/finetune.py", "model=tiny", f"data.root={data}",
                 f"tokenizer={data}/tokenizer",
                 f"data.sources.synth_tuning.path={data}/shards/tuning", "data.max_repeat=100000",
                 f"run_dir={tuned}", "name=synthesizer", f"train.max_steps={args.synth_steps}",
                 "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=0",
                 "train.checkpoint_every=0", "train.keep_last=1", "train.threads_per_rank=1",
                 "schedule.warmup_steps=20", "optim.lr=3e-3", "logger.progress_bar=never",
                 "logger.plot=false", "logger.log_every=50"], logs / "synthesizer.log")
        if not (synth / "summary.json").exists():
            run(["data_pipeline/synthesize.py", f"source.path={data}/world/biographies.jsonl",
                 "source.id_field=id", f"out={synth}", "synth=hf", f"synth.model={tuned}/hf",
                 "synth.context=512", "synth.max_new_tokens=256", "rounds=1",
                 "valid_fraction=0.0", "progress_bar=never"], logs / "synthesize.log")
        if not (shards / "synth" / "summary.json").exists():
            run(["data_pipeline/prepare.py", f"tokenizer={data}/tokenizer", f"out={shards}",
                 "valid_fraction=0.0", "workers=1", "progress_bar=never",
                 f"+sources.synth.path={synth}", "+sources.synth.format=synth"],
                logs / "prepare_synth.log")
        return shards / "synth"


def synthesizer_figures(data: Path) -> dict | None:
    """The synthesize stage's parse rate, and per half the share of biographies parsed and of
    faithful pairs (`ipt.synth.world.score_synthesis`)."""
    if not (data / "synth" / "summary.json").exists():
        return None
    from ipt.synth.world import score_synthesis

    stage = json.loads((data / "synth" / "summary.json").read_text())
    return {"parse_rate": stage["parse_rate"], "pairs_per_doc": stage["pairs_per_doc"],
            **score_synthesis(data / "world", data / "synth")}


def common(data: Path, run_dir: Path, seed: int, steps: int, mtp: int, curve: int = 0,
           mtp_options: Sequence[str] = ()) -> list[str]:
    """The overrides every run shares; with `curve`, the harness scores both halves every
    `curve` steps during training (the metrics' `downstream/world_*`)."""
    every = ["eval.tasks=[world_train,world_test]", f"eval.include_path={data}/world/tasks",
             f"eval.every={curve}", "eval.batch_size=32"] if curve else []
    return [*every, "model=tiny", "data=custom", f"data.root={data}", f"tokenizer={data}/tokenizer",
            f"data.seq_len={SEQ_LEN}", "model.max_seq_len=512", "data.max_repeat=100000",
            f"run_dir={run_dir}", f"name={run_dir.name}", f"train.max_steps={steps}",
            f"train.global_batch_size={BATCH}", "train.micro_batch_size=8",
            "train.eval_every=0", "train.checkpoint_every=0", "train.keep_last=1",
            f"train.seed={seed}", f"data.seed={seed}", "train.threads_per_rank=1",
            "logger.progress_bar=never", "logger.plot=false", "logger.log_every=50",
            *(["loss=mtp", f"loss.heads={mtp}", *mtp_options] if mtp > 1 else [])]


def train(data: Path, out: Path, arm: str, seed: int, args: argparse.Namespace) -> Path:
    """The arm's runs for a seed; the folder of its exported model."""
    mtp = args.heads if arm.endswith("-mtp") else 1
    shards = data / "shards"
    run_dir = out / f"{arm}-s{seed}"
    if arm.startswith("A"):
        pre = run_dir.with_name(run_dir.name + "-pt")
        if not (pre / "summary.json").exists():
            run(["train/pretrain.py", *common(data, pre, seed, args.steps - args.ft_steps, mtp,
                                               args.curve, args.mtp_options),
                 f"+data.sources.bios.path={shards}/bios", "schedule.warmup_steps=20",
                 f"optim.lr={args.lr}"], pre.with_suffix(".log"))
        if not (run_dir / "summary.json").exists():
            run(["train/finetune.py", *common(data, run_dir, seed, args.ft_steps, mtp, args.curve,
                                              args.mtp_options),
                 f"model.init_from={pre}/hf", f"+data.sources.qa_ft.path={shards}/qa_ft",
                 "schedule.warmup_steps=5", f"optim.lr={args.ft_lr}"],
                run_dir.with_suffix(".log"))
    elif not (run_dir / "summary.json").exists():
        share = args.qa_share
        qa = synthesize(data, args) if arm == "C" else \
            shards / ("qa_plain" if arm == "B-plain" else "qa")
        run(["train/pretrain.py", *common(data, run_dir, seed, args.steps, mtp, args.curve,
                                                args.mtp_options),
             f"+data.sources.bios.path={shards}/bios",
             f"+data.sources.bios.weight={1 - share}",
             f"+data.sources.qa.path={qa}", f"+data.sources.qa.weight={share}",
             "schedule.warmup_steps=20", f"optim.lr={args.lr}"], run_dir.with_suffix(".log"))
    return run_dir / "hf"


def evaluate(data: Path, model: Path) -> dict[str, float]:
    out = model.parent / "eval"
    if not (out / "results.json").exists():
        run(["train/evaluate.py", f"checkpoint={model}", "tasks=[world_train,world_test]",
             f"include_path={data}/world/tasks", f"out={out}", "batch_size=32"],
            model.parent.with_name(model.parent.name + "-eval.log"))
    results = json.loads((out / "results.json").read_text())["results"]
    return {half: results[f"world_{half}"]["exact_match,strip"] for half in ("train", "test")}


def curve(run_dirs: list[Path], offset: int) -> list[dict]:
    """(step, train and test exact match) of the scores taken during training; the steps of
    a run after the first are counted on from `offset` (A's fine-tuning after its
    pre-training)."""
    points = []
    for i, d in enumerate(run_dirs):
        if not (d / "metrics.jsonl").exists():
            continue
        for line in (d / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "downstream/world_test/exact_match" in r:
                points.append({"step": r["step"] + (offset if i else 0),
                               "train": r["downstream/world_train/exact_match"],
                               "test": r["downstream/world_test/exact_match"]})
    return points


def one(data: Path, out: Path, arm: str, seed: int, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model = train(data, out, arm, seed, args)
    scores = evaluate(data, model)
    runs = [model.parent.with_name(model.parent.name + "-pt"), model.parent]
    return {**scores, "wall_s": round(time.perf_counter() - start, 1),
            "curve": curve(runs if arm.startswith("A") else runs[1:],
                           args.steps - args.ft_steps)}


def table(runs: dict[str, dict], arms: list[str], tokens: int) -> tuple[dict, str]:
    rows = {}
    lines = ["| arm | train half EM | test half EM | seeds | tokens per run | wall per run |",
             "|---|---|---|---|---|---|"]
    for arm in arms:
        mine = [r for name, r in runs.items() if name.rsplit("-s", 1)[0] == arm]
        row: dict = {"wall_s": statistics.fmean(r["wall_s"] for r in mine)}
        for half in ("train", "test"):
            v = [r[half] for r in mine]
            row[half] = {"mean": statistics.fmean(v),
                         "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
        rows[arm] = row
        lines.append(f"| {arm} | {row['train']['mean']:.3f} ± {row['train']['sd']:.3f} | "
                     f"{row['test']['mean']:.3f} ± {row['test']['sd']:.3f} | {len(mine)} | "
                     f"{tokens / 1e6:.2f}M | {row['wall_s'] / 60:.1f} min |")
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=100)
    ap.add_argument("--steps", type=int, default=250, help="training steps of every arm")
    ap.add_argument("--ft-steps", type=int, default=60, help="of them, A's fine-tuning")
    ap.add_argument("--qa-share", type=float, default=0.5,
                    help="B's and C's share of question tokens")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mtp-options", nargs="*", default=[],
                    help="more overrides of the -mtp arms' loss, e.g. loss.reduction=sum")
    ap.add_argument("--synth-steps", type=int, default=300,
                    help="arm C: the synthesizer's tuning steps (16 sequences of 512 tokens)")
    ap.add_argument("--curve", type=int, default=0,
                    help="score both halves every this many steps during training (0: off)")
    ap.add_argument("--arms", nargs="+", default=["A", "B", "C", "A-mtp", "B-mtp"],
                    choices=ARMS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--world", nargs="*", default=["paraphrases=4", "permute=true"],
                    help="options of data_pipeline/world.py, e.g. paraphrases=2 permute=true")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "exp-knowledge"))
    ap.add_argument("--results", default=str(ROOT / "experiments" / "results" / "knowledge.json"))
    args = ap.parse_args()

    out = Path(args.out)
    check_out(out, args)
    start = time.perf_counter()
    data = build_data(out, args.people, args.world)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {f"{a}-s{s}": pool.submit(one, data, out, a, s, args) for a, s in jobs}
        runs = {name: f.result() for name, f in futures.items()}
    tokens = args.steps * BATCH * SEQ_LEN
    rows, md = table(runs, args.arms, tokens)
    world = json.loads((data / "world" / "summary.json").read_text())
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "results")},
              "tokens_per_run": tokens, "seq_len": SEQ_LEN,
              "global_batch": BATCH, "world": world, "table": rows, "runs": runs,
              "synthesizer": synthesizer_figures(data),
              "wall_s": round(time.perf_counter() - start, 1)}
    dest = Path(args.results)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1))
    print(md, end="")
    if result["synthesizer"]:
        syn = result["synthesizer"]
        print(f"synthesizer: parse rate {syn['parse_rate']}; faithful pairs "
              f"{syn['train']['faithfulness']} (train half), {syn['test']['faithfulness']} "
              "(test half)")
    print(f"{result['wall_s'] / 60:.1f} min in all; every run in {dest}")


if __name__ == "__main__":
    main()
