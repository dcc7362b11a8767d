"""Greedy continuation from an exported Hugging Face folder:
`python train/sample.py model=runs/demo/hf prompt="Return the"`."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    model = AutoModelForCausalLM.from_pretrained(args["model"])
    tokenizer = AutoTokenizer.from_pretrained(args["model"])
    ids = tokenizer(args.get("prompt", ""), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=int(args.get("max_new_tokens", 40)),
                             do_sample=False)
    print(f"[{args['model']}] {tokenizer.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
