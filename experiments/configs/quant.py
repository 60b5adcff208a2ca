"""Quantization of the decoder LM on the synthetic source: QAT or PTQ, then int8 export.

    python -m experiments.train --config experiments/configs/quant.py:tiny --workdir /tmp/qat
    python -m experiments.train --config experiments/configs/quant.py:ptq --workdir /tmp/ptq
    ... --config.quant.bits=4 --config.quant.tile=32 --config.quant.lsq=True

`tiny` trains the tiny LM with int8 fake quantization from scratch (QAT). `ptq` first trains
the float model in `<workdir>/pretrain`, then calibrates and quantizes it without training
(train.steps=0). `lsq` is QAT with learned step sizes. Each run ends by converting the model
to integer weights (`<workdir>/export`) and evaluating the int8 x int8 -> int32 serving
model (`serve_*` rows in metrics.jsonl, with `export_bytes`).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in ("tiny", "ptq", "lsq"):
    raise ValueError(f"quant.py:{arg}: choose tiny (QAT), ptq or lsq.")
  c = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
  c.quant.method = "qat"
  if arg == "lsq":
    c.quant.lsq = True
  if arg == "ptq":
    pre = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
    c.pretrain = pre
    c.quant.method = "ptq"
    c.quant.act_static = True
    c.train.steps = 0
  return c
