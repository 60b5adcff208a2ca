"""GPT-2 small language modelling on real text from TFDS: lm1b or c4/en, GPT-2's tokenizer.

    python -m experiments.train --config experiments/configs/lm_tfds.py:lm1b --workdir /tmp/lm1b
    python -m experiments.train --config experiments/configs/lm_tfds.py:c4 --workdir /tmp/c4
    python -m experiments.train --config experiments/configs/lm_tfds.py:c4,hf --workdir /tmp/c4hf
    python -m experiments.train --config experiments/configs/lm_tfds.py:lm1b,tiny --workdir /tmp/t

- `lm1b`: sentences packed into rows of 128 tokens, global batch 512 (65k tokens a step), 20k
  steps (about 1.5 epochs); evaluated on 100 batches of the test split (lm1b has no
  validation split).
- `c4`: c4/en documents packed into rows of 1024 tokens, global batch 256 (262k tokens a step)
  in 2 microbatches with full rematerialization, 40k steps (10.5B tokens); evaluated on 20
  batches of the validation split.
- `hf`: continued training from GPT-2's weights (`init_from = "hf:gpt2"`) at lr 1e-4 instead
  of from scratch.
- `tiny`: the tiny decoder with the byte tokenizer, 20 steps: a CPU check of the pipeline.

Hardware: a TPU v4-8 or v5e-8 (or 8 GPUs): bfloat16, parameters and optimizer state sharded
over all devices (mesh fsdp=-1); the batches split over 4 or 8 devices. The data must be
prepared in `data.tfds.data_dir` (`tfds build lm1b --data_dir=DIR`; c4 needs Apache Beam
to prepare, or an existing copy); set --config.data.tfds.data_dir=DIR (a gs:// path works).
"""

from experiments.configs import common

DATASETS = ("lm1b", "c4")
FLAGS = ("hf", "tiny")


def get_config(arg: str | None = None):
  dataset, *flags = (arg or "lm1b").split(",")
  if dataset not in DATASETS or set(flags) - set(FLAGS):
    raise ValueError(f"lm_tfds.py:{arg}: choose one of {DATASETS}, then flags from {FLAGS}.")
  tiny = "tiny" in flags
  c = common.base_config("tiny" if tiny else "gpt2-small", task="lm")
  c.data.source = "tfds"
  c.data.tfds.name = "c4/en" if dataset == "c4" else "lm1b"
  if tiny:
    common.shrink_for_cpu(c, steps=20)
    c.train.update(log_every=5, checkpoint_every=20)
    c.eval.update(every=10, steps=2, batch_size=16)
    c.data.tfds.shuffle_buffer = 100
    return c
  c.dtype = "bfloat16"
  c.data.tokenizer = "gpt2"
  c.mesh.update(data=1, fsdp=-1)
  c.optim.update(lr=6e-4, b2=0.95, weight_decay=0.1)
  if dataset == "lm1b":
    c.train.update(steps=20_000, batch_size=512, seq_len=128)
    c.optim.warmup_steps = 1000
    c.eval.update(every=2000, steps=100, batch_size=512)
    c.data.tfds.eval_split = "test"
  else:
    c.train.update(steps=40_000, batch_size=256, seq_len=1024, microbatches=2)
    c.model.remat_policy = "full"
    c.optim.warmup_steps = 2000
    c.eval.update(every=2000, steps=20, batch_size=256)
    c.data.tfds.shuffle_buffer = 2000  # c4 documents are long: fewer of them fill memory
  c.train.update(log_every=100, checkpoint_every=2000)
  if "hf" in flags:
    c.init_from = "hf:gpt2"
    c.optim.update(lr=1e-4, warmup_steps=500)
  return c
