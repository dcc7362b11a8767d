"""Greedy continuation from an exported Hugging Face folder:

    python train/sample.py model=runs/demo/hf prompt="Return the" [max_new_tokens=40]
                           [decode=auto|greedy|speculative|both]
    python train/sample.py model=runs/demo-world/hf prompt_file=data/demo/world/example/prompt.txt

prompt_file= reads the prompt from a file, whole (a prompt of several lines).

decode=speculative drafts with the model's MTP heads and verifies with its next-token head
(the same text as greedy, in fewer forwards); `both` runs the two and compares them; `auto`
(the default) is `both` for a model exported with parallel MTP heads, else greedy.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ipt.mtp import decode
from ipt.mtp.heads import HeadsError, has_heads, stored_head_type

MODES = ("auto", "greedy", "speculative", "both")
KEYS = ("model", "prompt", "prompt_file", "max_new_tokens", "decode")


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    unknown = set(args) - set(KEYS)
    if unknown or "model" not in args or args.get("decode", "auto") not in MODES:
        sys.exit(f"usage: sample.py model=<hf folder> [prompt=... | prompt_file=...] "
                 f"[max_new_tokens=40] "
                 f"[decode={'|'.join(MODES)}] (unknown: {sorted(unknown)})")
    if "prompt" in args and "prompt_file" in args:
        sys.exit("error: give prompt= or prompt_file=, not both")
    if "prompt_file" in args:
        try:
            with open(args["prompt_file"]) as f:
                args["prompt"] = f.read()
        except OSError as e:
            sys.exit(f"error: prompt_file: {e}")
    path, mode = args["model"], args.get("decode", "auto")
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # "Loading weights": a bar is for a terminal
    if mode == "auto":  # speculative decoding is built for parallel heads
        unreadable = has_heads(path) and stored_head_type(path) is None
        mode = "both" if stored_head_type(path) == "parallel" or unreadable else "greedy"
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer(args.get("prompt", ""), return_tensors="pt").input_ids
    max_new = int(args.get("max_new_tokens", 40))
    torch.set_num_threads(1)
    runs = {}
    if mode in ("greedy", "both"):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        runs["greedy"] = decode.greedy(lm, prompt, max_new, tokenizer.eos_token_id)
    if mode in ("speculative", "both"):
        try:
            model = decode.load(path)
        except HeadsError as e:  # a model without heads, or heads that do not fit it
            sys.exit(f"error: {e}")
        runs["speculative"] = decode.self_speculative(model, prompt, max_new,
                                                      tokenizer.eos_token_id)
    for name, out in runs.items():
        text = tokenizer.decode(prompt[0].tolist() + out.tokens, skip_special_tokens=True)
        print(f"[{path}, {name}] {text!r}")
        extra = (f", {out.mean_accepted:.2f} tokens per verifying forward (accepted per step: "
                 f"{out.accepted})" if name == "speculative" else "")
        print(f"  {len(out.tokens)} tokens, {out.forwards} forwards, "
              f"{out.tokens_per_s:.1f} tokens/s{extra}")
    if len(runs) == 2:
        same = runs["greedy"].tokens == runs["speculative"].tokens
        print(f"  speculative == greedy: {same}; speed-up "
              f"{runs['speculative'].tokens_per_s / runs['greedy'].tokens_per_s:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
