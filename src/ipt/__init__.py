"""ipt: instruction pre-training with small-LM guidance, on DeepSpeed ZeRO."""

from ipt import quiet

quiet.install()  # before any third-party import can print its import-time noise
