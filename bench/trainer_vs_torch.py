"""Trainer steps/s against a bare PyTorch loop: same model, data, batch, threads and AdamW.

Both run the same model and loss (the fused next-token loss, documents masked) and run in
one process, interleaved in rounds so that machine noise hits both alike; the
result is the ratio of their median step rates. The trainer side is ipt's real path: the
DeepSpeed engine (ZeRO-1, one rank), the loss module, the resumable loader and the metrics.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ipt.checkpoint import TrainerState
from ipt.config import LossConfig, PretrainConfig
from ipt.data.loader import MixtureOrder, PackedShards, to_device, train_loader
from ipt.data.shards import ShardSet
from ipt.engine import build_engine, init_distributed
from ipt.losses import build_loss
from ipt.model import FusedLM, build_model
from ipt.schedule import lr_multiplier
from ipt.trainer import Trainer, TrainerOptions

# Both sides run the trainer's default loss: the fused next-token loss over the LM wrapped
# without extra heads, with document masking.
LOSS = build_loss(LossConfig(name="ntp"))


def config(data: Path, stage: int, threads: int) -> PretrainConfig:
    cfg = PretrainConfig(tokenizer=str(data / "tokenizer"))
    cfg.data.seq_len = 256
    m = cfg.model
    m.name, m.hidden_size, m.intermediate_size, m.num_layers = "bench", 256, 768, 4
    m.num_heads, m.num_kv_heads, m.max_seq_len = 4, 4, 256
    cfg.train.micro_batch_size = cfg.train.global_batch_size = 8
    cfg.train.threads_per_rank = threads
    cfg.deepspeed.stage = stage
    return cfg


def bare_steps(model, opt, batches, n: int, clip: float) -> float:
    start = time.perf_counter()
    for step in range(n):
        b = to_device(next(batches), torch.device("cpu"))
        loss = LOSS(model, b, step, [max(1, int((b["labels"] != -100).sum()))]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return n / (time.perf_counter() - start)


def trainer_steps(trainer: Trainer, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
    return n / (time.perf_counter() - start)


def run(data: Path, stage: int = 1, threads: int = 2, rounds: int = 5,
        steps: int = 10) -> dict:
    cfg = config(data, stage, threads)
    dist = init_distributed(threads)
    ds = PackedShards(ShardSet(data / "shards" / "docstrings" / "train"), cfg.data.seq_len)
    order = MixtureOrder([len(ds)], [1.0], 0, ds.fingerprint)
    vocab = int(ds.shards.shards[0].meta["vocab_size"])

    torch.manual_seed(0)
    bare = FusedLM(build_model(cfg.model, vocab))
    o = cfg.optim
    opt = torch.optim.AdamW(bare.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                            weight_decay=o.weight_decay, foreach=True)
    bare_batches = train_loader(ds, order, 0, 8, 8, 0, 1, cfg.data.num_workers)

    torch.manual_seed(0)
    model = FusedLM(build_model(cfg.model, vocab))
    engine = build_engine(model, cfg, 1, lr_multiplier(cfg.schedule, 10**6))
    trainer = Trainer(engine, LOSS, train_loader(ds, order, 0, 8, 8, 0, 1,
                                                 cfg.data.num_workers),
                      TrainerState(), dist, [], TrainerOptions(1, 8, cfg.data.seq_len, 10**6))
    bare_steps(bare, opt, bare_batches, 3, o.grad_clip)  # warm-up both
    trainer_steps(trainer, 3)
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(bare_steps(bare, opt, bare_batches, steps, o.grad_clip))
        ours.append(trainer_steps(trainer, steps))
    return {
        "benchmark": f"trainer_vs_torch_zero{stage}", "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": 8 * cfg.data.seq_len,
        "ipt_steps_per_s": statistics.median(ours),
        "torch_steps_per_s": statistics.median(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
    }
