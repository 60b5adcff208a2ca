"""Encoder classification (a GLUE-like stand-in), after MLM pretraining: BERT's recipe.

    python -m experiments.train --config experiments/configs/classify.py:tiny --workdir /tmp/cls

`train_and_evaluate` first runs `config.pretrain` (masked-LM on the synthetic language)
in `<workdir>/pretrain`, then fine-tunes a classifier initialized from it. The arg names
an encoder preset (tiny-encoder for `tiny`, bert-base, bert-large).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  preset = {None: "tiny-encoder", "tiny": "tiny-encoder"}.get(arg, arg)
  pre = common.base_config(preset, task="mlm")
  pre.model.head = "mlm"
  c = common.base_config(preset, task="classify")
  c.model.head = "classify"
  c.model.num_labels = 2
  c.data.classify = dict(num_classes=2, label_noise=0.1, min_len=16)
  if preset == "tiny-encoder":
    common.shrink_for_cpu(pre, steps=300)
    common.shrink_for_cpu(c, steps=200)
    c.optim.lr = 1e-3
  c.pretrain = pre
  return c
