"""Multi-token prediction (spec: `mtp.md`; docs/mtp.md).

What it adds to a run: `loss.heads - 1` extra prediction heads on the causal LM, trained by
the core's fused loss (`ipt.losses.fused`, which runs any number of heads one chunk of
positions at a time); their FLOPs; their record in the checkpoint; their weights beside the
Hugging Face export; and self-speculative decoding with them.

Config group: `loss` (`loss=mtp`, `ipt.config.loss`).

Files:
- `technique.py`: the `MultiToken` technique;
- `heads.py`: the heads (parallel or sequential), attaching them, saving and loading them;
- `decode.py`: self-speculative decoding.
"""
