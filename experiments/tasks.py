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
from experiments import scores
from experiments.configs import common
from experiments.data import encoder as encoder_data, ner as ner_data, squad as squad_data
from experiments.data import tfds as tfds_data


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


def best_spans(logits_Bx2xL, allowed_BxL, max_answer: int):
  """Bx2 int32 (start, end): the highest start + end logit over spans with start <= end <
  start + max_answer, both at allowed positions (the context): run_qa's choice over all
  pairs rather than its n-best start and end lists (the same argmax)."""
  start_BxL, end_BxL = logits_Bx2xL[:, 0].astype(jnp.float32), logits_Bx2xL[:, 1]
  L = start_BxL.shape[1]
  i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
  ok_BxLxL = (j >= i) & (j < i + max_answer) & allowed_BxL[:, :, None] & allowed_BxL[:, None, :]
  score_BxLxL = jnp.where(ok_BxLxL, start_BxL[:, :, None] + end_BxL[:, None, :], -jnp.inf)
  flat_B = jnp.argmax(score_BxLxL.reshape(len(score_BxLxL), -1), -1)
  return jnp.stack([flat_B // L, flat_B % L], 1).astype(jnp.int32)


def span_sums(pred_Bx2, targets_Bx2, weights_B) -> dict:
  """Summed exact match and token-overlap F1 of predicted spans (end inclusive) against the
  targets, and the examples counted: SQuAD's EM / F1 on token positions."""
  (ps, pe), (ts, te) = pred_Bx2.T, targets_Bx2.T
  overlap = jnp.maximum(0, jnp.minimum(pe, te) - jnp.maximum(ps, ts) + 1)
  precision, recall = overlap / jnp.maximum(pe - ps + 1, 1), overlap / jnp.maximum(te - ts + 1, 1)
  f1 = jnp.where(overlap > 0, 2 * precision * recall / jnp.maximum(precision + recall, 1e-9), 0.0)
  exact = (ps == ts) & (pe == te)
  return {
    "exact": jnp.sum(exact * weights_B),
    "f1": jnp.sum(f1 * weights_B),
    "examples": jnp.sum(weights_B),
  }


def _lm_targets(batch):
  return batch["targets"], batch["weights"]


def _span_targets(batch):  # start and end: two "tokens" per example, over the positions
  return batch["targets"], jnp.repeat(batch["weights"][:, None], 2, axis=1)


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
  # Metrics that need whole predictions (SQuAD's text spans, NER's entities, GLUE's MCC / F1):
  # `predict` (logits, batch -> arrays, in the eval step) and `score` (each eval batch's
  # predictions on the host, in order -> eval row entries).
  predict: Callable[[jax.Array, dict], dict] | None = None
  score: Callable[[list], dict] | None = None
  extra_sums: Callable[[jax.Array, dict], dict] | None = None  # more eval sums, e.g. span EM
  # More eval splits, evaluated beside "eval" with the same step: {split: batches covering it}
  # (`batch(step, split)` reads them); the eval row carries each one's metrics with the split
  # as prefix (MNLI's "eval_mm": eval_mm_accuracy, eval_mm_loss; `extra_eval_row`).
  extra_evals: dict = dataclasses.field(default_factory=dict)

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

  def eval_outputs(self, model, variables, batch) -> tuple[dict, dict]:
    """(eval sums, predictions) of one eval batch: what the eval step returns."""
    logits = self.forward(model, variables, batch, None, False)[0]
    sums = self.sums(logits, batch)
    if self.extra_sums:
      sums.update(self.extra_sums(logits, batch))
    return sums, (self.predict(logits, batch) if self.predict else {})

  def token_mask(self, batch):
    """BxL: the real (non-padding) tokens, for losses over every position."""
    if "attention_mask" in batch:
      return batch["attention_mask"]
    return self.targets(batch)[1]


def _ratios(sums: dict) -> dict:
  w = max(float(sums["weight"]), 1.0)
  return {"eval_loss": float(sums["loss"]) / w, "eval_accuracy": float(sums["accuracy"]) / w}


HEAD = {"classify": "classify", "span": "span", "tokens": "tokens"}  # the head each task reads


def _check_head(config):
  want = HEAD.get(config.task)
  if want and config.model.get("head") != want:
    raise ValueError(
      f"task={config.task!r} reads the model's {want!r} head, but model.head="
      f"{config.model.get('head')!r}: set model.head={want!r}."
    )


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
  """The task named by `config.task` (TASKS: "lm", "mlm", "classify", "span", "tokens"), on
  the data `config.data.source` names: "markov" (the synthetic language) or "tfds"."""
  _check_head(config)
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
      return {**_classify_summary(sums), "bayes_accuracy": cls_source.bayes_accuracy}

    return _classify_task(
      lambda s, split: cls_source.batch(at(s, split), *sizes(split), split=split, **slicing),
      t.batch_size * t.seq_len,
      summarize=summarize,
    )

  if config.task == "span":
    span = encoder_data.SpanSource(source, **d.get("span", {}))
    return _span_task(
      lambda s, split: span.batch(at(s, split), *sizes(split), split=split, **slicing),
      t.batch_size * t.seq_len,
      span.max_answer + 2,  # the key and closer are in the span
    )

  if config.task == "tokens":
    tags = encoder_data.TagSource(source, **d.get("tags", {}))
    _check_labels(config, len(tags.label_names), "data.tags.n_types (2 per type + 'O')")
    return _tokens_task(
      lambda s, split: tags.batch(at(s, split), *sizes(split), split=split, **slicing),
      t.batch_size * t.seq_len,
      predict=_tag_predict,
      score=lambda preds: _tag_score(preds, tags.label_names),
    )

  raise ValueError(f"task={config.task!r}: choose one of {', '.join(TASKS)}.")


TASKS = ("lm", "mlm", "classify", "span", "tokens")
SPAN_INPUTS = ("attention_mask", "token_type_ids")


def _check_labels(config, n: int, what: str):
  if config.model.num_labels != n:
    raise ValueError(
      f"The data has {n} labels ({what}): set model.num_labels={n} "
      f"(it is {config.model.num_labels})."
    )


def _span_extra(max_answer: int):
  """Eval sums of the best span in the context (token_type_ids 1) against the targets."""

  def extra(logits_Bx2xL, batch):
    allowed = (batch["token_type_ids"] == 1) & (batch["attention_mask"] > 0)
    pred = best_spans(logits_Bx2xL, allowed, max_answer)
    return span_sums(pred, batch["targets"], batch["weights"])

  return extra


def _span_summary(sums: dict) -> dict:
  """Loss (the mean of the start and end cross-entropies, as BertForQuestionAnswering's),
  position accuracy, and EM / F1 in percent over token positions."""
  row = _ratios(sums)
  n = max(float(sums["examples"]), 1.0)
  return {**row, "exact_match": 100 * sums["exact"] / n, "f1": 100 * sums["f1"] / n}


def _tag_summary(sums: dict) -> dict:
  row = _ratios(sums)
  row["token_accuracy"] = row.pop("eval_accuracy")
  return row


def _tag_predict(logits_BxLxC, batch):
  return {
    "tags": jnp.argmax(logits_BxLxC, -1).astype(jnp.int32),
    "targets": batch["targets"],
    "weights": batch["weights"],
  }


def _tag_score(preds: list, label_names) -> dict:
  """Entity-level precision / recall / F1 (seqeval's) over the weighted positions of each row."""
  names = np.asarray(label_names)
  true, pred = [], []
  for p in preds:
    for tags, targets, weights in zip(p["tags"], p["targets"], p["weights"]):
      keep = weights > 0
      true.append(list(names[targets[keep]]))
      pred.append(list(names[np.minimum(tags[keep], len(names) - 1)]))
  s = scores.ner_scores(true, pred)
  return {"precision": s["precision"], "recall": s["recall"], "f1": s["f1"]}


def _classify_summary(sums: dict) -> dict:
  row = _ratios(sums)
  row["accuracy"] = row.pop("eval_accuracy")
  return row


def _classify_task(batch, tokens: int, summarize=_classify_summary, **kwargs) -> Task:
  """Sequence classification over `batch` (labels, weight-0 padding rows); `kwargs`: Task's
  other fields (eval_steps, predict, score)."""
  return Task(
    "classify",
    batch,
    summarize,
    tokens,
    targets=_classify_targets,
    input_keys=("attention_mask", "token_type_ids"),
    **kwargs,
  )


def _span_task(batch, tokens: int, max_answer: int, **kwargs) -> Task:
  """Extractive QA over `batch` (start / end targets), with EM / F1 sums of the best span of
  at most `max_answer` tokens; `kwargs`: Task's other fields (eval_steps, predict, score)."""
  return Task(
    "span",
    batch,
    _span_summary,
    tokens,
    targets=_span_targets,
    input_keys=SPAN_INPUTS,
    extra_sums=_span_extra(max_answer),
    **kwargs,
  )


def _tokens_task(batch, tokens: int, predict, score, **kwargs) -> Task:
  """Token classification (tagging) over `batch`, scored on the host from `predict`'s outputs
  by `score`; `kwargs`: Task's other fields (eval_steps)."""
  return Task(
    "tokens",
    batch,
    _tag_summary,
    tokens,
    input_keys=SPAN_INPUTS,
    predict=predict,
    score=score,
    **kwargs,
  )


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
  if config.task == "span":
    return _squad_task(config, name, tokenizer, kwargs)
  if config.task == "tokens":
    source = ner_data.NerSource(name, tokenizer, **kwargs)
    _check_labels(config, len(source.label_names), f"{name}'s tags")
    return _tokens_task(
      source.batch,
      tokens,
      predict=lambda logits, batch: {"tags": jnp.argmax(logits, -1).astype(jnp.int32)},
      score=lambda preds: source.score([p["tags"] for p in preds]),
      eval_steps=source.eval_steps,
    )
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
    glue_name = name.removeprefix("glue/")

    def score(preds):  # the task's own GLUE metrics (MCC for CoLA, F1 for MRPC / QQP)
      p = {k: np.concatenate([x[k] for x in preds]) for k in preds[0]}
      real = p["weight"] > 0
      glue = scores.glue_scores(glue_name, p["pred"][real], p["label"][real])
      return {k: v for k, v in glue.items() if k != "accuracy"}  # the row has it

    return _classify_task(
      source.batch,
      tokens,
      eval_steps=source.eval_steps,
      predict=_classify_predict,
      score=score,
      extra_evals=source.extra_eval_steps,
    )
  raise ValueError(f"task={config.task!r}: choose 'lm', 'mlm' or 'classify'.")


def _classify_predict(logits_Bx1xC, batch):
  label_Bx1, weight_Bx1 = _classify_targets(batch)
  return {
    "pred": jnp.argmax(logits_Bx1xC[:, 0], -1).astype(jnp.int32),
    "label": label_Bx1[:, 0],
    "weight": weight_Bx1[:, 0],
  }


def _squad_task(config, name: str, tokenizer, kwargs: dict) -> Task:
  """Extractive QA on TFDS squad/v1.1 (experiments/data/squad.py): run_qa's windows, scored
  with the official EM / F1 after the n-best postprocessing (data.squad)."""
  q = {**common.SQUAD, **config.data.get("squad", {})}
  if not name.startswith("squad"):
    raise ValueError(f"task='span' reads squad/v1.1, not data.tfds.name={name!r}.")
  source = squad_data.SquadSource(
    name, tokenizer, doc_stride=q["doc_stride"], max_query_len=q["max_query_len"], **kwargs
  )
  return _span_task(
    source.batch,
    config.train.batch_size * config.train.seq_len,
    q["max_answer"],
    eval_steps=source.eval_steps,
    predict=lambda logits, batch: {"logits": logits.astype(jnp.float32)},
    score=lambda preds: source.score(
      [p["logits"] for p in preds], n_best=q["n_best"], max_answer_length=q["max_answer"]
    ),
  )


def eval_steps(config: ml_collections.ConfigDict, task: Task, split: str = "eval") -> int:
  """The eval batches a run evaluates on: eval.steps, or when it is 0 the task's whole eval
  split (`task.eval_steps`; an extra eval split's: `task.extra_evals[split]`)."""
  if config.eval.steps:
    return config.eval.steps
  if split != "eval":
    return task.extra_evals[split]
  if task.eval_steps is None:
    raise ValueError(
      f"eval.steps=0 means the whole eval split, which the {task.name!r} data does not count "
      "(GLUE classification does): set eval.steps > 0."
    )
  return task.eval_steps


def extra_eval_row(split: str, row: dict) -> dict:
  """An extra eval split's row (`Task.extra_evals`) under its prefix: "eval_mm" turns
  eval_loss into eval_mm_loss and accuracy into eval_mm_accuracy."""
  return {f"{split}_{k.removeprefix('eval_')}": v for k, v in row.items()}


def sum_eval(sums_list: list[dict]) -> dict:
  """Adds per-batch eval sums on the host (float64, so long evals do not lose precision)."""
  host = jax.device_get(sums_list)
  return {k: sum(float(s[k]) for s in host) for k in host[0]}
