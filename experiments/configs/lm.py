"""Decoder language modelling on the built-in synthetic source.

    python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm

The arg names a model preset (models.PRESETS: tiny, gpt2-small, gpt2-medium, llama-1b);
`tiny` also shrinks the run so it trains in about a minute on two CPU cores.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  preset = arg or "tiny"
  c = common.base_config(preset, task="lm")
  if preset == "tiny":
    common.shrink_for_cpu(c, steps=600)
  return c
