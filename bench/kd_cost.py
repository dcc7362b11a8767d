"""The cost of online distillation, each against its baseline in the same run.

- Step time: a training step (forward, backward, AdamW) of a 4-layer student with KD from a
  2-layer teacher of half its width, online and from stored top-64 soft labels, against the
  same step with next-token loss only; interleaved so drift hits all three; at two widths,
  to show how the vocabulary side's share moves. The target is at most
  1 + 1.2 x (teacher forward FLOPs / student training FLOPs).
- Peak memory of the loss at a 32k vocabulary: the chunked KD loss against the naive one
  (full logits of student and teacher), forward and backward, each in a fresh process so
  peak RSS is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from ipt.config import ModelConfig, TeacherConfig
from ipt.losses import IGNORE, NextTokenLoss
from ipt.model import build_model, count_params
from ipt.slm.kd import DistillationLoss

VOCAB, SEQ, BATCH = 4096, 256, 8


def model(layers: int, hidden: int, vocab: int = VOCAB) -> torch.nn.Module:
    return build_model(ModelConfig(name="b", hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_layers=layers, num_heads=4, num_kv_heads=2,
                                   max_seq_len=SEQ), vocab)


def step_time(hidden: int = 256, steps: int = 12) -> dict:
    """A 4-layer student of width `hidden` and a 2-layer teacher of half its width: next-token
    loss, online KD, and offline KD from stored top-64 soft labels, steps interleaved."""
    torch.manual_seed(0)
    student, teacher = model(4, hidden), model(2, hidden // 2)
    teacher.requires_grad_(False).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    batch["labels"][:, -1] = IGNORE
    with torch.no_grad():  # what the scoring stage stores (fp16 log-probs)
        top, top_ids = torch.log_softmax(teacher(input_ids=ids).logits, -1).topk(64, dim=-1)
    stored = {**batch, "teacher_ids": top_ids, "teacher_logp": top.half().float()}
    arms = {"ntp": (NextTokenLoss(), batch),
            "kd": (DistillationLoss(teacher, TeacherConfig(path="-", kd_steps=10**9),
                                    NextTokenLoss()), batch),
            "kd_offline": (DistillationLoss(None, TeacherConfig(soft_labels=True,
                                                                kd_steps=10**9),
                                            NextTokenLoss()), stored)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i in range(steps + 2):
        for name, (fn, b) in arms.items():
            start = time.perf_counter()
            fn(student, b, 0).loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}

    def train_flops(m: torch.nn.Module) -> float:  # per token, matmuls incl. the output layer
        return 6 * (count_params(m) + m.config.hidden_size * VOCAB)

    ratio = (train_flops(teacher) / 3) / train_flops(student)  # forward only: 2N of 6N
    return {"benchmark": f"kd_step_time_vs_ntp_h{hidden}",
            "student_params": count_params(student, False),
            "teacher_params": count_params(teacher, False), "step_s_ntp": med["ntp"],
            "step_s_kd": med["kd"], "slowdown": med["kd"] / med["ntp"],
            "step_s_kd_offline": med["kd_offline"],
            "slowdown_offline": med["kd_offline"] / med["ntp"],
            "teacher_over_student_flops": ratio, "target_slowdown": 1 + 1.2 * ratio}


def _peak(kind: str) -> float:
    """Runs in a child: peak RSS (MiB) of one KD loss forward and backward above the RSS
    before it (the earlier peak, from start-up, must be lower: asserted)."""
    from ipt.losses.kd import kd_losses, online_probs

    torch.manual_seed(0)
    n, seq, vocab = 4, 512, 32_000
    head_s = torch.nn.Linear(256, vocab, bias=False)
    head_t = torch.nn.Linear(128, vocab, bias=False).requires_grad_(False)
    h_s = torch.randn(n, seq, 256, requires_grad=True)
    h_t = torch.randn(n, seq, 128)
    labels = torch.randint(0, vocab, (n, seq))
    def status_kib(key: str) -> int:  # VmRSS: resident now; VmHWM: the peak of this image
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    base = status_kib("VmRSS")
    assert status_kib("VmHWM") < base + 64 * 1024, "start-up peaked higher than the loss may"
    logits = head_s(h_s)  # the student's own forward: in both, as in next-token training
    if kind == "chunked":
        loss = kd_losses(logits, labels, online_probs(h_t, head_t, 1.0), 1.0, 0.5, 512)[0]
    else:
        s = logits.float().flatten(0, 1)
        with torch.no_grad():
            p_t = torch.softmax(head_t(h_t).float().flatten(0, 1), -1)
        ce = torch.nn.functional.cross_entropy(s, labels.flatten(), reduction="sum")
        loss = 0.5 * ce + 0.5 * -(p_t * torch.log_softmax(s, -1)).sum()
    loss.backward()
    return (status_kib("VmHWM") - base) / 1024


def memory() -> dict:
    out = {"benchmark": "kd_loss_peak_memory_32k_vocab", "tokens": 4 * 512,
           "one_fp32_logits_mib": 4 * 512 * 32_000 * 4 / 2**20}
    for kind in ("naive", "chunked"):
        code = f"import kd_cost, json; print(json.dumps(kd_cost._peak({kind!r})))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=__file__.rsplit("/", 1)[0])
        if proc.returncode:
            raise RuntimeError(f"the {kind} memory probe failed:\n{proc.stderr[-2000:]}")
        out[f"peak_mib_{kind}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_chunked_to_naive"] = out["peak_mib_chunked"] / out["peak_mib_naive"]
    return out


def run() -> list[dict]:
    torch.set_num_threads(2)
    return [step_time(256), step_time(512), memory()]
