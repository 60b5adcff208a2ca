"""LoRA, QLoRA and low-rank (SVD) fine-tuning of a trained decoder.

    python -m experiments.train --config experiments/configs/lora.py:tiny --workdir /tmp/lora
    python -m experiments.train --config experiments/configs/lora.py:tiny,qlora --workdir /tmp/ql
    python -m experiments.train --config experiments/configs/lora.py:tiny,lowrank --workdir /tmp/lr
    python -m experiments.train --config experiments/configs/lora.py:gpt2,qlora --workdir /tmp/g
    python -m experiments.train --config experiments/configs/lora.py:llama --workdir /tmp/llama

Models (the first part of the argument):
- `tiny`: the tiny LM, pretrained first in `<workdir>/pretrain` (600 steps on the synthetic
  source), then fine-tuned 200 steps on another sample of it; CPU, about a minute.
- `gpt2`: GPT-2 small from `hf:gpt2` on lm1b (lm_tfds.py:lm1b), 2,000 steps of 128 x 128
  tokens, bfloat16; a TPU v4-8 / v5e-8 or 8 GPUs (or one GPU: mesh fsdp=-1 spans what is there).
- `llama`: Llama 3.2 1B from `hf:meta-llama/Llama-3.2-1B` (the preset llama-1b's shape), on
  lm1b with its tokenizer, 1,000 steps of 64 x 512 tokens, bfloat16, full remat; the Hub
  checkpoint needs its licence accepted and a token, or a local copy (`hf:/path/to/dir`).
Methods (flags): none: LoRA r=16, alpha=32 on every linear layer of the blocks (QLoRA's
choice), adapters' lr 2e-4 (HF models) / 2e-3 (tiny); `qlora`: the same on an NF4 base
(blocks of 64, double-quantized scales), QLoRA's recipe; `lowrank`: no adapters, every block
kernel replaced by its rank-32 truncated SVD (tiny: 50% of the attention kernels' parameters,
31% of the MLP's), then all parameters fine-tuned. `lowrank` reads the dense kernels from a
run's checkpoint, not from `hf:` (for GPT-2 / Llama: import or fine-tune them in a run first,
then `--config.init_from=` that run, with `lowrank.budget` or `lowrank.energy` if wanted). The runs end with the merged model's eval and the PEFT adapter
files (`<workdir>/adapter`), which `peft.PeftModel.from_pretrained` loads onto the
transformers model (GPT-2, Llama).
"""

from experiments.configs import common, lm_tfds

MODELS = ("tiny", "gpt2", "llama")
FLAGS = ("qlora", "lowrank")
ARGS = ("tiny", "tiny,qlora", "tiny,lowrank", "gpt2", "gpt2,qlora", "llama", "llama,qlora")


def get_config(arg: str | None = None):
  model, *flags = (arg or "tiny").split(",")
  if model not in MODELS or set(flags) - set(FLAGS) or len(flags) > 1:
    raise ValueError(f"lora.py:{arg}: choose one of {MODELS}, then at most one of {FLAGS}.")
  if "lowrank" in flags and model != "tiny":
    raise ValueError(
      f"lora.py:{arg}: lowrank factorizes a run's checkpoint, not hf: weights; run "
      f"lora.py:{model} without adapters (or lm_tfds.py:lm1b,hf) first, then "
      "--config.lowrank.method=svd --config.init_from=THAT_RUN."
    )
  if model == "tiny":
    c = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=200)
    c.pretrain = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
    c.data.stream = 1  # another sample of the source than the pretraining's
    lr = 2e-3
  else:
    c = lm_tfds.get_config("lm1b,hf")
    c.train.update(steps=2000 if model == "gpt2" else 1000, checkpoint_every=500)
    c.eval.update(every=500, steps=20)
    if model == "gpt2":
      c.train.batch_size = 128
    else:
      c.model = common.base_config("llama-1b", task="lm").model
      c.init_from = "hf:meta-llama/Llama-3.2-1B"
      c.data.tokenizer = "meta-llama/Llama-3.2-1B"
      c.train.update(batch_size=64, seq_len=512)
      c.model.remat_policy = "full"
    c.eval.batch_size = c.train.batch_size
    c.optim.update(warmup_steps=100, weight_decay=0.0)
    lr = 2e-4
  if "lowrank" in flags:
    c.lowrank.update(method="svd", rank=32)
    c.optim.lr = lr / 4  # every parameter trains
    return c
  c.lora.update(method="lora", rank=16, alpha=32.0, dropout=0.05 if model != "tiny" else 0.0)
  if "qlora" in flags:
    c.lora.base = "nf4"
  c.optim.lr = lr
  return c
