"""Tasks: the batches a run trains on, its loss, and what its eval reports.

Losses return *sums* ("loss", "weight", and in eval "accuracy", summed over tokens or
examples) so that the train step can divide once, exactly, whatever the padding,
microbatching or sharding (see parallel/step.py).
"""

from collections.abc import Callable
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.data import markov as data_lib
from experiments.data import encoder as encoder_data, tfds as tfds_data


def argmax_is(logits_BxLxV, targets_BxL):
  """BxL bool: `jnp.argmax(logits, -1) == targets` (ties go to the first index) for finite
  logits; a row holding NaN counts as wrong. The first index holding the maximum, one
  min-reduction beside the max the cross-entropy takes too: XLA's CPU argmax, a reduction over
  (value, index) pairs, cost as much as the cross-entropy with its gradient (vocabulary 32k)."""
  max_BxLx1 = jnp.max(logits_BxLxV, -1, keepdims=True)
  index_BxLxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
  vocab = logits_BxLxV.shape[-1]
  first_BxL = jnp.min(jnp.where(logits_BxLxV == max_BxLx1, index_BxLxV, vocab), -1)
  return first_BxL == targets_BxL


def token_sums(logits_BxLxV, targets_BxL, weights_BxL, accuracy: bool = True) -> dict:
  """Summed cross-entropy and weight over the weighted tokens, and with `accuracy` the correct
  predictions. Train steps leave the accuracy out (an eval metric): exact, it reads all BxLxV
  logits once more, about 10% of the tiny decoder's CPU step at vocabulary 32k
  (experiments/bench/nanodo.py)."""
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  sums = {"loss": jnp.sum(ce_BxL * weights_BxL), "weight": jnp.sum(weights_BxL)}
  if accuracy:
    correct_BxL = argmax_is(logits_BxLxV, targets_BxL).astype(jnp.float32)
    sums["accuracy"] = jnp.sum(correct_BxL * weights_BxL)
  return sums


def _lm_targets(batch):
  return batch["targets"], batch["weights"]


def _classify_targets(batch):  # one "token" per example; "weights" 0 marks a padding row
  if "weights" in batch:
    return batch["label"][:, None], batch["weights"][:, None]
  return batch["label"][:, None], jnp.ones(batch["label"].shape + (1,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  batch: Callable[[int, str], dict]  # (step, split) -> this process's slice, NumPy
  summarize: Callable[[dict], dict]  # summed eval sums -> eval row
  tokens_per_step: int  # global tokens per train step (for tokens/s)
  targets: Callable[[dict], tuple] = _lm_targets  # batch -> (targets BxL, weights BxL)
  input_keys: tuple = ()  # the batch keys the model takes as keyword inputs
  eval_steps: int | None = None  # batches that cover the eval split (None: synthetic data)

  def forward(self, model, variables, batch, rng, train, capture: bool = False):
    """(logits BxLxV, sown intermediates) of the model on a batch; a classifier's BxC logits
    come as Bx1xC. `variables` is {"params": ..., other collections}; `capture` records the
    model's intermediates (hidden states, attention probabilities) for distillation."""
    out = model.apply(
      variables,
      batch["inputs"],
      deterministic=not train,
      rngs={"dropout": rng} if train else {},
      mutable=["intermediates"] if capture else False,
      **{k: batch[k] for k in self.input_keys},
    )
    logits, state = out if capture else (out, {})
    logits = logits[:, None] if logits.ndim == 2 else logits
    return logits, state.get("intermediates", {})

  def sums(self, logits_BxLxV, batch, accuracy: bool = True) -> dict:
    return token_sums(logits_BxLxV, *self.targets(batch), accuracy=accuracy)

  def loss(self, model, variables, batch, rng, train):
    """(summed loss, sums): what parallel.make_train_step differentiates and divides once;
    the accuracy in eval only (token_sums)."""
    sums = self.sums(self.forward(model, variables, batch, rng, train)[0], batch, not train)
    return sums["loss"], sums

  def token_mask(self, batch):
    """BxL: the real (non-padding) tokens, for losses over every position."""
    if "attention_mask" in batch:
      return batch["attention_mask"]
    return self.targets(batch)[1]


def _ratios(sums: dict) -> dict:
  w = max(float(sums["weight"]), 1.0)
  return {"eval_loss": float(sums["loss"]) / w, "eval_accuracy": float(sums["accuracy"]) / w}


def markov_source(config: ml_collections.ConfigDict) -> data_lib.MarkovSource:
  """The synthetic language `config.data.markov` describes. Its ids are the byte tokenizer's,
  or, for an LM whose vocabulary cannot hold those (`model.vocab_size` <= 126 with the 64
  symbols), the symbols' indices 0..n_symbols-1: the same language relabelled, with the same
  optimum. MLM and classification keep the bytes: their [MASK], [CLS] and [SEP] are the
  tokenizer's."""
  source = data_lib.MarkovSource(**config.data.markov)
  if config.task == "lm" and config.model.vocab_size <= source.symbol_ids.max():
    source.relabel(np.arange(source.n_symbols))
  return source


def vocab_needed(config: ml_collections.ConfigDict, tokenizer) -> tuple[int, str]:
  """(size, what holds the ids): the smallest vocabulary of a model that reads the data
  `config` describes. An LM on the synthetic language reads its symbols (no tokenizer makes
  them: `markov_source`); everything else reads the tokenizer's ids."""
  if config.data.get("source", "markov") == "markov" and config.task == "lm":
    n = config.data.markov.get("n_symbols", 64)
    return n, f"the synthetic language's {n} symbols (data.markov.n_symbols)"
  return tokenizer.vocab_size, f"the tokenizer's vocabulary ({tokenizer.vocab_size} ids)"


def make_task(
  config: ml_collections.ConfigDict, tokenizer, process_index: int = 0, process_count: int = 1
) -> Task:
  """The task named by `config.task`: "lm", "mlm" or "classify", on the data
  `config.data.source` names: "markov" (the synthetic language) or "tfds"."""
  t, d = config.train, config.data
  source_name = d.get("source", "markov")
  if source_name == "tfds":
    task = _tfds_task(config, tokenizer, process_index, process_count)
    eval_steps(config, task)
    return task
  if source_name != "markov":
    raise ValueError(f"data.source={source_name!r}: choose 'markov' or 'tfds'.")
  if d.get("tokenizer", "byte") != "byte":
    raise ValueError(
      f"data.source='markov' is a language of bytes: data.tokenizer={d.tokenizer!r} needs "
      "data.source='tfds' (or set data.tokenizer='byte')."
    )
  if not config.eval.steps:
    raise ValueError("eval.steps=0 (the whole eval split) needs data.source='tfds'.")
  source = markov_source(config)
  slicing = dict(process_index=process_index, process_count=process_count)
  # data.stream: which independent sample of the language the train steps read (eval is fixed)
  offset = int(d.get("stream", 0)) << 40

  def sizes(split):
    return (t.batch_size, t.seq_len) if split == "train" else (config.eval.batch_size, t.seq_len)

  def at(s, split):
    return s + offset if split == "train" else s

  if config.task == "lm":
    optimum = source.optimal_loss(t.seq_len)

    def summarize(sums):
      row = _ratios(sums)
      return {**row, "excess_loss": row["eval_loss"] - optimum}

    return Task(
      "lm",
      lambda s, split: source.batch(at(s, split), *sizes(split), split=split, **slicing),
      summarize,
      t.batch_size * t.seq_len,
    )

  if config.task == "mlm":

    def batch(s, split):
      return encoder_data.mlm_batch(
        source,
        at(s, split),
        *sizes(split),
        split=split,
        mask_id=tokenizer.mask_id,
        vocab_size=tokenizer.vocab_size,
        n_special=tokenizer.n_special,
        **slicing,
      )

    return Task("mlm", batch, _ratios, t.batch_size * t.seq_len, input_keys=("attention_mask",))

  if config.task == "classify":
    cls_source = encoder_data.ClassifySource(source=source, **d.classify)

    def summarize(sums):
      row = _ratios(sums)
      row["accuracy"] = row.pop("eval_accuracy")
      return {**row, "bayes_accuracy": cls_source.bayes_accuracy}

    return Task(
      "classify",
      lambda s, split: cls_source.batch(at(s, split), *sizes(split), split=split, **slicing),
      summarize,
      t.batch_size * t.seq_len,
      targets=_classify_targets,
      input_keys=("attention_mask", "token_type_ids"),
    )

  raise ValueError(f"task={config.task!r}: choose 'lm', 'mlm' or 'classify'.")


def _tfds_task(config, tokenizer, process_index: int, process_count: int) -> Task:
  """The task on a TFDS dataset (experiments/data/tfds.py): lm / mlm on packed text (lm1b,
  c4/en), classify on glue/<task>."""
  t, d = config.train, config.data.tfds.to_dict()
  name, text_key, mask_prob = d.pop("name"), d.pop("text_key"), d.pop("mask_prob")
  kwargs = dict(
    batch_size=t.batch_size,
    eval_batch_size=config.eval.batch_size,
    seq_len=t.seq_len,
    process_index=process_index,
    process_count=process_count,
    **d,
  )
  tokens = t.batch_size * t.seq_len
  is_glue = name.startswith("glue/")
  if config.task in ("lm", "mlm"):
    if is_glue:
      raise ValueError(f"task={config.task!r} reads documents: {name} is for 'classify'.")
    source = tfds_data.TextSource(
      name, tokenizer, task=config.task, text_key=text_key, mask_prob=mask_prob, **kwargs
    )
    if config.task == "mlm":
      return Task("mlm", source.batch, _ratios, tokens, input_keys=("attention_mask",))

    def summarize(sums):
      row = _ratios(sums)
      return {**row, "eval_perplexity": math.exp(min(row["eval_loss"], 100.0))}

    return Task("lm", source.batch, summarize, tokens)
  if config.task == "classify":
    if not is_glue:
      raise ValueError(f"task='classify' reads glue/<task>, not data.tfds.name={name!r}.")
    _, num_labels = tfds_data.glue_task(name)
    if config.model.num_labels != num_labels:
      raise ValueError(
        f"{name} has {num_labels} classes: set model.num_labels={num_labels} "
        f"(it is {config.model.num_labels})."
      )
    source = tfds_data.GlueSource(name, tokenizer, **kwargs)

    def summarize(sums):
      row = _ratios(sums)
      row["accuracy"] = row.pop("eval_accuracy")
      return row

    return Task(
      "classify",
      source.batch,
      summarize,
      tokens,
      targets=_classify_targets,
      input_keys=("attention_mask", "token_type_ids"),
      eval_steps=source.eval_steps,
    )
  raise ValueError(f"task={config.task!r}: choose 'lm', 'mlm' or 'classify'.")


def eval_steps(config: ml_collections.ConfigDict, task: Task) -> int:
  """The eval batches a run evaluates on: eval.steps, or when it is 0 the task's whole eval
  split (`task.eval_steps`)."""
  if config.eval.steps:
    return config.eval.steps
  if task.eval_steps is None:
    raise ValueError(
      f"eval.steps=0 means the whole eval split, which the {task.name!r} data does not count "
      "(GLUE classification does): set eval.steps > 0."
    )
  return task.eval_steps


def sum_eval(sums_list: list[dict]) -> dict:
  """Adds per-batch eval sums on the host (float64, so long evals do not lose precision)."""
  host = jax.device_get(sums_list)
  return {k: sum(float(s[k]) for s in host) for k in host[0]}
