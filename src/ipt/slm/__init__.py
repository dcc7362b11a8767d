"""SALT: a small LM guides the large one (spec: `salt.md`; docs/salt.md).

What it adds to a run: knowledge distillation from the small LM in the first steps (online,
or from soft labels stored by the scoring stage), and data selection by the small LM's
scores for those steps. Outside a run it adds the scoring stage
(`data_pipeline/score.py`).

Config groups: `teacher` and `data.select`; the scoring stage's schema (`ipt.config.slm`).

Files:
- `technique.py`: the `SmallLM` technique;
- `kd.py`: the KD schedule and the distillation loss (its chunked terms are the core's,
  `ipt.losses.kd`);
- `teacher.py`: loading and checking the teacher;
- `select.py`: choosing the sequences from their scores;
- `score.py`: the scoring stage (scores, and soft labels);
- `soft_labels.py`: stored soft labels, read back with the batches.
"""
