"""The scoring stage (SALT_DS): a small LM scores every packed training sequence.

Per sequence, over the positions that have a target (loss masks and document ends excluded):
- `median_topk_loss`: the median of the SLM's per-token losses over the tokens whose true
  next token is among its top-k predictions (k = 10): high is hard, in the top-k is
  learnable rather than noise. NaN when no token is in the top-k.
- `mean_loss`: the mean per-token loss;
- `frac_topk`: the share of targets inside the top-k.

The sequences are the trainer's own: the source's shards packed with the same `seq_len`,
packing and document masking, so the scores file is named by that packing's fingerprint
(`{source}/scores/{fingerprint}.npy`, float32 [sequences, 3]) and the trainer finds it, or
finds that it does not match. Work is cut into blocks of `block_size` sequences; block b goes
to rank `b % world_size` (torchrun or srun set them), finished blocks are kept in
`scores/parts/`, so a killed run goes on, and the last rank to finish merges them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipt.config import SCORE_COLUMNS, ConfigError, ScoreConfig, TeacherConfig
from ipt.data import tokenizer as tok
from ipt.data.loader import PackedShards
from ipt.data.shards import ShardSet
from ipt.engine import launcher_env
from ipt.losses import IGNORE
from ipt.slm import teacher

log = logging.getLogger(__name__)

COLUMNS = SCORE_COLUMNS


@torch.no_grad()
def sequence_scores(model: Any, batch: dict[str, torch.Tensor], k: int) -> np.ndarray:
    """[batch, 3] statistics (see the module doc) of one batch of packed sequences."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids")}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    out = np.full((len(labels), 3), np.nan, dtype=np.float32)
    for i in range(len(labels)):
        keep = labels[i] != IGNORE
        if not keep.any():
            continue
        lg, y = logits[i][keep], labels[i][keep]
        loss = torch.nn.functional.cross_entropy(lg, y, reduction="none")
        in_topk = (lg.topk(k, dim=-1).indices == y[:, None]).any(-1)
        if in_topk.any():
            out[i, 0] = loss[in_topk].median().item()
        out[i, 1], out[i, 2] = loss.mean().item(), in_topk.float().mean().item()
    return out


def scores_path(source_dir: Path, data: PackedShards) -> Path:
    return source_dir / "scores" / f"{data.fingerprint}.npy"


def score_source(model: Any, source_dir: Path, cfg: ScoreConfig, rank: int,
                 world: int) -> Path | None:
    shards = ShardSet(source_dir / "train")
    if shards.tokenizer_fingerprint != tok.fingerprint(cfg.tokenizer):
        raise ConfigError(f"{source_dir} was tokenized with another tokenizer than "
                          f"tokenizer={cfg.tokenizer!r}")
    data = PackedShards(shards, cfg.seq_len, cfg.packing, cfg.doc_masking)
    final = scores_path(source_dir, data)
    if final.exists():
        return final
    parts = final.parent / "parts" / data.fingerprint
    parts.mkdir(parents=True, exist_ok=True)
    blocks = range(0, len(data), cfg.block_size)
    bar = _progress(cfg, source_dir.name, len(data), rank)
    for b, start in enumerate(blocks):
        part = parts / f"block_{b:06d}.npy"
        if b % world != rank or part.exists():
            continue
        rows = []
        for a in range(start, min(start + cfg.block_size, len(data)), cfg.batch_size):
            items = [data[i] for i in range(a, min(a + cfg.batch_size,
                                                   start + cfg.block_size, len(data)))]
            batch = {name: torch.stack([it[name] for it in items]) for name in items[0]}
            rows.append(sequence_scores(model, batch, cfg.top_k))
            if bar is not None:
                bar.update(len(items))
        tmp = part.with_name(part.stem + ".tmp.npy")
        np.save(tmp, np.concatenate(rows))
        tmp.replace(part)
    if bar is not None:
        bar.close()
    done = sorted(parts.glob("block_*[0-9].npy"))
    if len(done) < len(blocks):
        return None  # other ranks still at work; the last one merges
    merged = np.concatenate([np.load(p) for p in done])
    tmp = final.with_name(final.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, merged)
    tmp.replace(final)
    meta = {"model": cfg.model, "top_k": cfg.top_k, "sequences": len(data),
            "columns": list(COLUMNS), "fingerprint": data.fingerprint}
    final.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return final


def _progress(cfg: ScoreConfig, name: str, total: int, rank: int) -> Any:
    if rank != 0 or cfg.progress_bar == "never" or \
            (cfg.progress_bar == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=f"score {name}", total=total, unit="seq", dynamic_ncols=True)


def score(cfg: ScoreConfig) -> dict[str, str | None]:
    if not cfg.sources:
        raise ConfigError("sources is empty: name prepared source folders, e.g. "
                          "+sources.web=data/shards/web")
    teacher.check(TeacherConfig(path=cfg.model), cfg.tokenizer)
    env = launcher_env()  # torchrun's or srun's rank variables; one process without them
    rank, world = env["rank"], env["world"]
    device = torch.device(f"cuda:{env['local_rank']}" if torch.cuda.is_available() else "cpu")
    model = teacher.load(TeacherConfig(path=cfg.model), device, torch.float32)
    out = {}
    for name, path in cfg.sources.items():
        if not (Path(path) / "train").is_dir():
            raise ConfigError(f"sources.{name}={path!r} is not a prepared source (no train/)")
        done = score_source(model, Path(path), cfg, rank, world)
        out[name] = str(done) if done else None
    return out
