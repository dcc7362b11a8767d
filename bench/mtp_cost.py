"""What multi-token prediction costs and what it buys, each against its baseline in the same run.

- Peak memory of a training step (forward, backward) at a 32k vocabulary: n = 4 heads with the
  fused loss against n = 4 naive (every head's logits at once), and both against n = 1 (plain
  next-token loss through the model's logits). Each arm in a fresh process, its peak RSS
  reset just before the step, so the number is the step's own.
- Step time (forward, backward, AdamW) of n = 4 against n = 1, steps interleaved, with the
  FLOP ratio the heads add (an extra decoder layer and unembedding pass per head); and the
  fused loss against the naive one at n = 4.
- Decoding: self-speculative against plain greedy on the demo's MTP model (`make train`),
  tokens/s and tokens per verifying forward, over a set of prompts, interleaved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ipt.config import LossConfig, ModelConfig
from ipt.losses import IGNORE, NextTokenLoss
from ipt.model import build_model, flops_per_token
from ipt.mtp.heads import attach

ROOT = Path(__file__).resolve().parents[1]


def _model(layers: int, hidden: int, vocab: int, seq: int) -> torch.nn.Module:
    return build_model(ModelConfig(name="b", hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_layers=layers, num_heads=4, num_kv_heads=2,
                                   max_seq_len=seq), vocab)


def _batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, seq))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE
    return {"input_ids": ids, "labels": labels}


def _arm(name: str, vocab: int, hidden: int, seq: int):
    """(model, loss function) of an arm: ntp, or mtp<n>[-naive]."""
    lm = _model(4, hidden, vocab, seq)
    if name == "ntp":
        return lm, NextTokenLoss()
    n = int(name[3:].split("-")[0])
    from ipt.losses import FusedLoss

    cfg = LossConfig(name="mtp", heads=n, memory_efficient=not name.endswith("naive"))
    return attach(lm, n - 1, None), FusedLoss(cfg, eos_id=2)


def _peak(name: str, vocab: int = 32_000, hidden: int = 256, batch: int = 4,
          seq: int = 512) -> float:
    """Runs in a child: peak RSS (MiB) of one training step's forward and backward above the
    RSS before it."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, loss_fn = _arm(name, vocab, hidden, seq)
    b = _batch(vocab, batch, seq)

    def status_kib(key: str) -> int:  # VmRSS: resident now; VmHWM: peak since the reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = status_kib("VmRSS")
    loss_fn(model, b, 0).loss.backward()
    return (status_kib("VmHWM") - base) / 1024


def memory(vocab: int = 32_000, hidden: int = 256, batch: int = 4, seq: int = 512) -> dict:
    out: dict = {"benchmark": "mtp_step_peak_memory_32k_vocab", "tokens": batch * seq,
                 "hidden": hidden, "one_fp32_logits_mib": batch * seq * vocab * 4 / 2**20}
    for name in ("ntp", "mtp1", "mtp4", "mtp4-naive"):
        code = (f"import mtp_cost, json; print(json.dumps(mtp_cost._peak({name!r}, {vocab}, "
                f"{hidden}, {batch}, {seq})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=str(ROOT / "bench"))
        if proc.returncode:
            raise RuntimeError(f"the {name} memory probe failed:\n{proc.stderr[-2000:]}")
        out[f"peak_mib_{name}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_mtp4_fused_to_naive"] = out["peak_mib_mtp4"] / out["peak_mib_mtp4-naive"]
    out["ratio_mtp4_fused_to_ntp"] = out["peak_mib_mtp4"] / out["peak_mib_ntp"]
    out["ratio_mtp4_naive_to_ntp"] = out["peak_mib_mtp4-naive"] / out["peak_mib_ntp"]
    return out


def step_time(vocab: int = 4096, hidden: int = 256, batch: int = 8, seq: int = 256,
              steps: int = 10) -> dict:
    """n = 1 (next-token loss) and n = 4 (fused, and naive) training steps, interleaved."""
    torch.manual_seed(0)
    arms = {name: _arm(name, vocab, hidden, seq) for name in ("ntp", "mtp4", "mtp4-naive")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in arms.items()}
    b = _batch(vocab, batch, seq)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(steps + 2):
        for name, (model, loss_fn) in arms.items():
            start = time.perf_counter()
            loss_fn(model, b, 0).loss.backward()
            opts[name].step()
            opts[name].zero_grad()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lm = arms["ntp"][0]
    flops = flops_per_token(lm, seq, 3) / flops_per_token(lm, seq)
    return {"benchmark": f"mtp4_step_time_vs_ntp_h{hidden}_v{vocab}", "step_s_ntp": med["ntp"],
            "step_s_mtp4": med["mtp4"], "slowdown": med["mtp4"] / med["ntp"],
            "flops_ratio": flops, "step_s_mtp4_naive": med["mtp4-naive"],
            "fused_over_naive": med["mtp4"] / med["mtp4-naive"]}


PROMPTS = ["Return the number of", "Create a new", "If the value is", "The default",
           "This function", "Raises an error when", "Parameters", "See also"]


def decoding(model_dir: Path = ROOT / "runs" / "demo" / "hf", max_new: int = 64,
             rounds: int = 3) -> dict:
    """Greedy and self-speculative on the demo's MTP model, prompt by prompt, interleaved."""
    from transformers import AutoTokenizer

    from ipt.mtp import decode
    from ipt.mtp.heads import stored_head_type

    if stored_head_type(model_dir) != "parallel":
        return {"benchmark": "mtp_self_speculative_decoding",
                "skipped": f"no model with parallel MTP heads at {model_dir}: run "
                           "`make train` first"}
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = decode.load(model_dir)
    totals = {"greedy": [0, 0.0], "speculative": [0, 0.0]}
    accepted: list[int] = []
    same = True
    for r in range(rounds):
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            g = decode.greedy(model.lm, ids, max_new, tok.eos_token_id)
            s = decode.self_speculative(model, ids, max_new, tok.eos_token_id)
            if r:  # the first round warms up
                for name, out in (("greedy", g), ("speculative", s)):
                    totals[name][0] += len(out.tokens)
                    totals[name][1] += out.seconds
                accepted += s.accepted
            same &= g.tokens == s.tokens
    tps = {k: n / sec for k, (n, sec) in totals.items()}
    return {"benchmark": "mtp_self_speculative_decoding", "model": str(model_dir),
            "heads": model.n, "tokens_per_s_greedy": tps["greedy"],
            "tokens_per_s_speculative": tps["speculative"],
            "speedup": tps["speculative"] / tps["greedy"],
            "tokens_per_verifying_forward": sum(accepted) / len(accepted),
            "identical_to_greedy": same}


def run() -> list[dict]:
    return [memory(), step_time(), step_time(hidden=512), decoding()]
