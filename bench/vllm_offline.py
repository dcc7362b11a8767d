"""vLLM's own throughput on a list of prompts: its offline engine (`LLM.generate`), no server.

Run by bench/synth_throughput.py with vLLM's interpreter (`make vllm`), not ipt's:

    .venv-vllm/bin/python bench/vllm_offline.py --model M --prompts p.json --out r.json

Prompts are token ids (the synthesizer's tokenizer, no special tokens added: the prompts carry
their own `<s>`), generated greedily to at most `max_tokens` each. The time is that of the
`generate` call alone, after a warm-up; the model's load is not counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="a JSON list of prompt strings")
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="every output max-tokens long")
    a = p.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(a.model)
    texts = json.loads(Path(a.prompts).read_text())
    prompts = [TokensPrompt(prompt_token_ids=tok(t, add_special_tokens=False)["input_ids"])
               for t in texts]
    extra = {"block_size": a.block_size} if a.block_size else {}
    llm = LLM(model=a.model, dtype=a.dtype, seed=0, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=a.ignore_eos)
    # warm-up, on a prompt of its own (the prefix cache would keep the first prompts)
    warm = TokensPrompt(prompt_token_ids=tok("<s> <CON> warm up </CON>\n\n",
                                             add_special_tokens=False)["input_ids"])
    llm.generate([warm] * 4, params, use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(a.out).write_text(json.dumps({
        "prompts": len(prompts), "generated_tokens": generated, "seconds": seconds,
        "tokens_s": generated / seconds,
        "prompt_tokens": sum(len(x["prompt_token_ids"]) for x in prompts)}))


if __name__ == "__main__":
    main()
