"""One optimizer step of the real trainer on 2 ranks x 2 micro-batches (ZeRO-0, a real
DeepSpeed engine), whose micro-batches hold very different numbers of target tokens. Rank 0
writes the gradient the optimizer received, and the gradient of the same 8 sequences taken
as one batch (the sum of their cross-entropies over their target count), to argv[1].

    python -m torch.distributed.run --nproc_per_node=2 tests/workers/grad_step.py out.pt
"""

import sys

import torch

from ipt.checkpoint import TrainerState
from ipt.config import ModelConfig, PretrainConfig
from ipt.engine import build_engine, init_distributed
from ipt.losses import IGNORE, NextTokenLoss
from ipt.model import build_model
from ipt.trainer import Trainer, TrainerOptions

VOCAB, SEQ, MICRO, ACCUM = 64, 16, 2, 2


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """8 sequences; sequence i keeps 2 targets when i % 4 == 0, else all of them, so some
    micro-batches have 17 targets and others 32."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE
    labels[::4, :-3] = IGNORE
    return ids, labels


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="t", hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=2, num_kv_heads=2, max_seq_len=SEQ), VOCAB)


def main(out: str) -> None:
    dist = init_distributed(threads_per_rank=1)
    ids, labels = tokens()
    cfg = PretrainConfig(tokenizer="-")
    cfg.deepspeed.stage, cfg.optim.grad_clip = 0, 0.0
    cfg.train.micro_batch_size, cfg.train.global_batch_size = MICRO, 8
    engine = build_engine(model(), cfg, ACCUM, lambda step: 1.0)
    seen: list[torch.Tensor] = []
    step = engine.basic_optimizer.step

    def observe(*args, **kwargs):
        seen.extend(p.grad.clone() for p in engine.module.parameters())
        return step(*args, **kwargs)

    engine.basic_optimizer.step = observe
    mine = range(dist.rank * MICRO * ACCUM, (dist.rank + 1) * MICRO * ACCUM)
    batches = iter([{"input_ids": ids[list(mine)[m:m + MICRO]],
                     "labels": labels[list(mine)[m:m + MICRO]]}
                    for m in range(0, MICRO * ACCUM, MICRO)])
    trainer = Trainer(engine, NextTokenLoss(), batches, TrainerState(), dist, [],
                      TrainerOptions(ACCUM, 8, SEQ, 1))
    trainer.train_step()
    if dist.rank == 0:
        reference = model()
        logits = reference(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=IGNORE, reduction="sum")
        (loss / (labels != IGNORE).sum()).backward()
        torch.save({"trainer": seen, "one_batch": [p.grad for p in reference.parameters()]},
                   out)


if __name__ == "__main__":
    main(sys.argv[1])
