"""Post-training compression of a trained decoder with calibration data: GPTQ, AWQ, SmoothQuant,
SparseGPT, Wanda, and their baselines (round-to-nearest, magnitude), no retraining.

    python -m experiments.train --config experiments/configs/oneshot.py:tiny,gptq,w4 --workdir /tmp/g
    python -m experiments.train --config experiments/configs/oneshot.py:tiny,sparsegpt,2:4 ...
    python -m experiments.train --config experiments/configs/oneshot.py:tiny,sparsegpt,2:4+w4 ...
    python -m experiments.train --config experiments/configs/oneshot.py:gpt2,gptq,w3 ...
    python -m experiments.train --config experiments/configs/oneshot.py:llama,wanda,50 ...

The argument: model, method, target.
- Models: `tiny` (the tiny LM, pretrained first in `<workdir>/pretrain`, 600 steps on the
  synthetic source; calibration 8 batches of 16 x 64 tokens; CPU, about a minute); `gpt2`
  (`hf:gpt2`) and `llama` (`hf:meta-llama/Llama-3.2-1B`), calibrated as the papers do on 128
  sequences of 2,048 tokens of c4/en (GPT-2: 1,024, its context) and evaluated on c4's
  validation split, bfloat16 on one accelerator (mesh fsdp=-1 spans what is there).
- Methods: `gptq`, `awq`, `rtn` (round-to-nearest: quant.method=ptq alone), `smoothquant`
  (with `w8a8`), `sparsegpt`, `wanda`, `magnitude` (prune.method=oneshot alone).
- Targets: `w4`, `w3`, ... (weight bits, one scale per output channel; `w4g32`: groups of 32
  inputs, `quant.tile`: along the last input axis, which for the attention output [H, D, E] is
  the head dimension, so a group must divide D and spans all heads), `w8a8`, `50` (50%
  unstructured), `2:4` (or any N:M), `2:4+w4` (SparseGPT's joint pass).
Every layer of the blocks is compressed; embeddings and the LM head stay float (as in the
papers). The run ends with the export that quant / prune write, evaluated as reloaded.
"""

import re

from experiments.configs import common, lm_tfds

MODELS = ("tiny", "gpt2", "llama")
METHODS = ("gptq", "awq", "rtn", "smoothquant", "sparsegpt", "wanda", "magnitude")
QUANTIZING = ("gptq", "awq", "rtn", "smoothquant")
ARGS = tuple(
  f"{model},{target}"
  for model in MODELS
  for target in (
    "gptq,w4", "gptq,w3", "gptq,w4g32", "awq,w4", "rtn,w4", "rtn,w3", "smoothquant,w8a8",
    "rtn,w8a8", "sparsegpt,50", "sparsegpt,2:4", "sparsegpt,2:4+w4", "wanda,50", "wanda,2:4",
    "magnitude,50", "magnitude,2:4",
  )
)  # fmt: skip


def _model(model: str):
  if model == "tiny":
    c = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=0)
    c.pretrain = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
    return c
  c = lm_tfds.get_config("c4,hf")
  length = 1024 if model == "gpt2" else 2048
  if model == "llama":
    c.model = common.base_config("llama-1b", task="lm").model
    c.init_from = "hf:meta-llama/Llama-3.2-1B"
    c.data.tokenizer = "meta-llama/Llama-3.2-1B"
  c.train.update(steps=0, batch_size=16, seq_len=length, microbatches=1)
  c.eval.update(steps=16, batch_size=16)
  c.oneshot.calib_batches = 8  # 8 x 16 = 128 sequences
  return c


def get_config(arg: str | None = None):
  model, method, target = ((arg or "tiny,gptq,w4").split(",") + ["", ""])[:3]
  if model not in MODELS or method not in METHODS or not target:
    raise ValueError(
      f"oneshot.py:{arg}: give model,method,target: a model of {MODELS}, a method of "
      f"{METHODS}, a target like w4, w3g128, w8a8, 50, 2:4 or 2:4+w4."
    )
  c = _model(model)
  sparse, _, bits = target.partition("+") if "+" in target else ("", "", target)
  if not bits.startswith("w"):
    sparse, bits = bits, ""
  if sparse:
    if method not in ("sparsegpt", "wanda", "magnitude"):
      raise ValueError(f"oneshot.py:{arg}: {method} does not prune; use sparsegpt or wanda.")
    c.prune.update(method="oneshot", select=r"^layers", score="magnitude")
    if ":" in sparse:
      c.prune.granularity = sparse
    else:
      c.prune.sparsity = int(sparse) / 100
  if bits:
    m = re.fullmatch(r"w(\d)(?:g(\d+))?(a8)?", bits)
    if m is None or (method not in QUANTIZING and method != "sparsegpt"):
      raise ValueError(f"oneshot.py:{arg}: target {bits!r} is wN[gG][a8] with a quantizing method.")
    c.quant.update(
      method="ptq",
      bits=int(m.group(1)),
      act_bits=8 if m.group(3) else 0,
      tile=int(m.group(2) or 0),
      calibrator="stored" if method in ("gptq", "sparsegpt") else "absmax",
    )
  elif method in QUANTIZING:
    raise ValueError(f"oneshot.py:{arg}: {method} needs a weight target like w4.")
  if method not in ("rtn", "magnitude"):
    c.oneshot.method = method
  return c
