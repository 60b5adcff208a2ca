"""The fields every config has; each experiment's file changes only what differs."""

import dataclasses

import ml_collections

import models
from experiments import compression, distillation


def base_config(preset: str, task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU. Parameters stay float32.
  c.task = task  # "lm" | "mlm" | "classify"
  c.init_from = ""  # a workdir whose latest checkpoint initializes the matching parameters

  c.model = ml_collections.ConfigDict(dataclasses.asdict(models.get_preset(preset)))
  del c.model.dtype  # set from the top-level dtype
  c.model.preset = preset

  c.data = ml_collections.ConfigDict()
  c.data.source = "markov"  # "markov" (synthetic, below) | "tfds" (data.tfds)
  c.data.tokenizer = "byte"  # "byte" | a Hugging Face tokenizer: Hub name or local directory
  # The built-in synthetic language (experiments/data.py): an order-2 Markov source over
  # 64 printable symbols with an exactly known entropy rate.
  c.data.markov = ml_collections.ConfigDict(dict(n_symbols=64, order=2, seed=0))
  c.data.stream = 0  # markov: which independent sample of the language the train steps read
  # A TFDS dataset (experiments/tfds_data.py): packed text for lm / mlm (lm1b, c4/en),
  # glue/<task> for classify.
  c.data.tfds = ml_collections.ConfigDict(
    dict(
      name="",  # e.g. "lm1b", "c4/en", "glue/sst2"
      data_dir="",  # where the prepared dataset lives ("": TFDS's default, ~/tensorflow_datasets)
      train_split="train",
      eval_split="",  # "": validation (validation_matched for glue/mnli, test for lm1b)
      text_key="text",  # the documents' feature (lm / mlm)
      shuffle_buffer=10_000,  # examples (documents) shuffled after the files
      seed=0,  # the order of the data, and the MLM masks
      mask_prob=0.15,  # mlm: the fraction of tokens selected
    )
  )

  c.train = ml_collections.ConfigDict(
    dict(
      steps=10_000,
      batch_size=256,
      seq_len=128,
      microbatches=1,
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoint=True,
      stop_after_steps=0,
      data_batches=0,
    )
  )  # stop_after_steps > 0: end this invocation after that many steps (time-sliced jobs).
  # data_batches > 0: train on that many distinct batches only (step s uses batch
  # s % data_batches): a low-data run; 0: a fresh batch every step. Eval batches are unaffected.
  c.eval = ml_collections.ConfigDict(dict(every=1000, steps=16, batch_size=256))
  c.optim = ml_collections.ConfigDict(
    dict(
      name="adamw",
      lr=3e-4,
      warmup_steps=500,
      schedule="cosine",
      final_lr_fraction=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
    )
  )

  # The mesh covers all devices: -1 takes the devices the other axes leave.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-slice TPU / multi-node GPU: how many slices (nodes) each axis spans.
  c.mesh.dcn = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(rules="fsdp_tp"))  # a parallel.RULES preset
  c.quant = compression.quant_section()  # method "none": float; "qat" / "ptq" quantize
  c.prune = compression.prune_section()  # method "none": dense; "gradual" / "oneshot" / ...
  c.distill = distillation.section()  # method "none": no teacher; "kd": config.teacher
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """The `:tiny` variant's run settings: seconds to minutes on two CPU cores."""
  c.train.update(steps=steps, batch_size=16, seq_len=64, log_every=25, checkpoint_every=200)
  c.eval.update(every=50, steps=4, batch_size=64)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.0)
  return c
