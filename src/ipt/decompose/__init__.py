"""Dataset Decomposition (spec: `dataset_decomposition.md`; docs/data.md).

What it adds to a run: documents cut into power-of-two pieces instead of packed sequences;
every step holds one length, and a length curriculum orders the steps. The step count is the
loader's state, so a resume continues exactly.

Config group: `data.decompose` (with `data.packing=decompose`; `ipt.config.decompose`).

Files:
- `technique.py`: the `Decomposition` technique and its `Pieces` sampling;
- `order.py`: the curricula, the order of steps and each rank's micro-batches.

The pieces themselves are core data (`ipt.data.pieces`): the scoring stage scores them too.
"""
