"""The fields every config has; each experiment's file changes only what differs."""

import dataclasses
import difflib
import functools
import inspect

import ml_collections

import models
from experiments import methods
from experiments.data import encoder as encoder_data
from experiments.data import markov as data_lib

# Sections that are whole run configs of their own (a classifier's MLM pretraining run, the
# teacher a student distills from): their keys are checked against the same schema.
RUN_SECTIONS = ("pretrain", "teacher")


def base_config(preset: str, task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype; "bfloat16" on TPU/GPU. Parameters stay float32.
  c.task = task  # "lm" | "mlm" | "classify" | "span" (extractive QA) | "tokens" (tagging)
  c.init_from = ""  # a workdir whose latest checkpoint initializes the matching parameters

  c.model = ml_collections.ConfigDict(dataclasses.asdict(models.get_preset(preset)))
  del c.model.dtype  # set from the top-level dtype
  del c.model.pipeline_stages, c.model.pipeline_microbatches  # mesh.stage, train.microbatches
  c.model.preset = preset

  c.data = ml_collections.ConfigDict()
  c.data.source = "markov"  # "markov" (synthetic, below) | "tfds" (data.tfds)
  c.data.tokenizer = "byte"  # "byte" | a Hugging Face tokenizer: Hub name or local directory
  # The built-in synthetic language (experiments/data/markov.py): an order-2 Markov source over
  # 64 printable symbols with an exactly known entropy rate.
  c.data.markov = ml_collections.ConfigDict(dict(n_symbols=64, order=2, seed=0))
  c.data.stream = 0  # markov: which independent sample of the language the train steps read
  # A TFDS dataset (experiments/data/tfds.py): packed text for lm / mlm (lm1b, c4/en),
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
      checkpoint_digest=True,
      stop_after_steps=0,
      data_batches=0,
      nonfinite="skip",
      max_nonfinite=10,
    )
  )  # stop_after_steps > 0: end this invocation after that many steps (time-sliced jobs).
  # nonfinite: a step with a non-finite loss or gradient never updates the model; "skip" goes
  # on (and stops once more than max_nonfinite steps were skipped), "stop" stops at the first.
  # The count is the `nonfinite_steps` column of metrics.jsonl. checkpoint_digest: each
  # checkpoint holds a digest of its arrays, checked on restore (parallel/digest.py).
  # data_batches > 0: train on that many distinct batches only (step s uses batch
  # s % data_batches): a low-data run; 0: a fresh batch every step. Eval batches are unaffected.
  # agreement_with: a run directory (its newest checkpoint) whose greedy continuations a
  # decoder's exports are compared with (`*_greedy_agreement`); "": the export's own float
  # weights (quant), none (prune).
  c.eval = ml_collections.ConfigDict(dict(every=1000, steps=16, batch_size=256, agreement_with=""))
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

  # The mesh covers all devices: -1 takes the devices the other axes leave. stage > 1:
  # pipeline parallelism over the scanned layers, in train.microbatches microbatches.
  c.mesh = ml_collections.ConfigDict(dict(stage=1, data=-1, fsdp=1, tensor=1))
  # Multi-slice TPU / multi-node GPU: how many slices (nodes) each axis spans.
  c.mesh.dcn = ml_collections.ConfigDict(dict(stage=1, data=1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(rules="fsdp_tp"))  # a parallel.RULES preset
  for method in methods.registry():  # config.quant, config.prune, config.distill, ...
    c[method.name] = method.section()  # method="none": off
  return c


def shrink_for_cpu(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """The `:tiny` variant's run settings: seconds to minutes on two CPU cores."""
  c.train.update(steps=steps, batch_size=16, seq_len=64, log_every=25, checkpoint_every=200)
  c.eval.update(every=50, steps=4, batch_size=64)
  c.optim.update(lr=3e-3, warmup_steps=50, weight_decay=0.0)
  return c


def bert_finetune(c: ml_collections.ConfigDict, lr: float, epochs: int, epoch: int, **optim):
  """Devlin et al.'s fine-tuning schedule, for the full-scale (BERT-base) runs: `epochs`
  epochs of `epoch` steps with a checkpoint and a whole-split eval (eval batch 128) each
  epoch; AdamW at `lr` with 10% warmup, linear decay to 0 and weight decay 0.01. `optim`: other
  optim fields (e.g. GLUE's b2 and eps)."""
  c.train.update(steps=epochs * epoch, checkpoint_every=epoch)
  c.eval.update(every=epoch, steps=0, batch_size=128)
  c.optim.update(
    lr=lr,
    warmup_steps=c.train.steps // 10,
    schedule="linear",
    final_lr_fraction=0.0,
    weight_decay=0.01,
    **optim,
  )
  return c


def _keyword_args(fn, *skip) -> dict:
  params = inspect.signature(fn).parameters.values()
  return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY and p.name not in skip}


def schema() -> dict[str, bool]:
  """{dotted key: whether it is a section} of every key a run config may hold: base_config's
  (with every registered method's section), the synthetic sources' keyword arguments
  (data.markov, data.classify) and RUN_SECTIONS."""
  return _schema(methods.names())


# SQuAD features and postprocessing (task "span" on data.tfds.name "squad/v1.1"); the
# synthetic span task's answers are at most data.span.max_answer long.
SQUAD = dict(doc_stride=128, max_query_len=64, max_answer=30, n_best=20)


@functools.cache
def _schema(method_names: tuple) -> dict[str, bool]:
  c = base_config("tiny", task="lm")
  c.data.markov.update(_keyword_args(data_lib.MarkovSource))
  c.data.classify = _keyword_args(encoder_data.ClassifySource, "source")
  c.data.span = _keyword_args(encoder_data.SpanSource, "source")
  c.data.tags = _keyword_args(encoder_data.TagSource, "source")
  c.data.squad = SQUAD
  return {**dict.fromkeys(RUN_SECTIONS, True), **flat_keys(c)}


def defaults(config: ml_collections.ConfigDict) -> dict:
  """{dotted key: value} of the config a run of this preset and task starts from: what a run
  written before a key existed held, e.g. a field added to the model or a method since."""

  def flat(node, prefix=""):
    out = {}
    for k, v in node.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out

  return flat(base_config(config.model.preset, config.task).to_dict())


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, bool]:
  """{dotted key: whether it is a section} of every key in `config`."""
  out = {}
  for k, v in config.items():
    out[prefix + k] = isinstance(v, ml_collections.ConfigDict)
    if out[prefix + k]:
      out.update(flat_keys(v, f"{prefix}{k}."))
  return out


# Other codebases' names for keys here: what `closest` suggests for them.
ALIASES = {
  "learning_rate": "lr",
  "lr_schedule": "schedule",
  "wd": "weight_decay",
  "clip": "grad_clip",
  "clip_norm": "grad_clip",
  "warmup": "warmup_steps",
  "num_steps": "steps",
  "max_steps": "steps",
  "train_steps": "steps",
  "batch": "batch_size",
  "seq_length": "seq_len",
  "max_seq_len": "seq_len",
  "num_layers": "n_layers",
  "n_layer": "n_layers",
  "num_hidden_layers": "n_layers",
  "num_heads": "n_heads",
  "n_head": "n_heads",
  "num_attention_heads": "n_heads",
  "num_kv_heads": "n_kv_heads",
  "num_key_value_heads": "n_kv_heads",
  "hidden_size": "d_model",
  "d_embed": "d_model",
  "emb_dim": "d_model",
  "intermediate_size": "d_ff",
  "mlp_dim": "d_ff",
  "vocab": "vocab_size",
  "max_position_embeddings": "max_len",
  "mode": "method",
  "bits_w": "bits",
  "weight_bits": "bits",
  "activation_bits": "act_bits",
  "a_bits": "act_bits",
}


def closest(key: str, keys) -> list[str]:
  """The valid keys `key` most likely meant: the same name in other sections (`dtype` for
  `model.dtype`), a known alias (`optim.learning_rate` -> `optim.lr`), else a close name in
  its section, else a close dotted key."""
  parent, _, name = key.rpartition(".")
  same = [k for k in keys if k.rpartition(".")[2] == name]
  if same:
    return same[:2]
  alias = ALIASES.get(name)
  if alias:
    matches = [k for k in keys if k.rpartition(".")[2] == alias]
    here = [k for k in matches if k.rpartition(".")[0] == parent]
    if here or matches:
      return (here or matches)[:2]
  siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
  close = difflib.get_close_matches(name, list(siblings), n=1)
  return [siblings[close[0]]] if close else difflib.get_close_matches(key, list(keys), n=1)


def check_keys(config: ml_collections.ConfigDict, prefix: str = ""):
  """Refuses a key no config file defines: set on an unlocked ConfigDict (`c.train.setps = 3`
  in a notebook) it would be ignored, the run silently using the default."""
  keys = schema()

  def walk(node, path):
    for k, v in node.items():
      key = path + k
      if key not in keys:
        close = " or ".join(prefix + c for c in closest(key, keys))
        hint = f" (did you mean {close}?)" if close else ""
        raise ValueError(
          f"Unknown config key {prefix}{key}{hint}: nothing reads it. Fix the name, or add "
          "the key to experiments/configs/common.py if the code reads it."
        )
      if k in RUN_SECTIONS and not path:
        if v:
          check_keys(v, f"{prefix}{key}.")
      elif keys[key] and isinstance(v, (ml_collections.ConfigDict, dict)):
        walk(v, key + ".")

  walk(config, "")
