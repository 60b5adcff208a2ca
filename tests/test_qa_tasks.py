"""The synthetic QA and tagging tasks, the span metrics against plain numpy, and the tasks'
eval outputs (sums, predictions, scores) through make_task."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from experiments import scores, tasks
from experiments.configs import ner as ner_config, squad as squad_config
from experiments.data import encoder, markov
from experiments.data.tokenizer import ByteTokenizer

SOURCE = markov.MarkovSource()
TOK = ByteTokenizer()


def test_span_answers_are_the_question_keys_segment():
  span = encoder.SpanSource(SOURCE, n_keys=3, max_answer=5)
  b = span.batch(3, 8, 40, split="eval")
  for ids, (s, e), types in zip(b["inputs"], b["targets"], b["token_type_ids"]):
    assert ids[s] == ids[1]  # the question's key opens the answer ...
    assert ids[e] == span.closer_id  # ... the first closer after it ends it
    assert span.closer_id not in ids[s:e] and 3 <= s < e < 39 and e - s <= 5 + 1
    assert (types[3:] == 1).all() and (types[:3] == 0).all()
    assert np.sum(np.isin(ids, span.key_ids)) == 3 + 1  # 3 keys in the context, 1 asked
  np.testing.assert_array_equal(  # a pure function of (step, row): process slices concatenate
    np.concatenate(
      [
        span.batch(3, 8, 40, split="eval", process_index=i, process_count=2)["targets"]
        for i in (0, 1)
      ]
    ),
    b["targets"],
  )


def test_tags_follow_the_openers():
  tags = encoder.TagSource(SOURCE, n_types=2, max_entities=3, max_len=3)
  b = tags.batch(0, 8, 32)
  names = tags.label_names
  for ids, t, w in zip(b["inputs"], b["targets"], b["weights"]):
    assert w[0] == w[-1] == 0 and (w[1:-1] == 1).all()
    for i in range(1, 31):
      if names[t[i]].startswith("B-"):
        assert ids[i - 1] == tags.opener_ids[int(names[t[i]][-1])]
      if names[t[i]].startswith("I-"):
        assert names[t[i - 1]][2:] == names[t[i]][2:]
    n_open = np.sum(np.isin(ids, tags.opener_ids))
    assert (
      n_open
      == np.sum(ids == tags.closer_id)
      == len(scores.entities(list(np.asarray(names)[t[1:-1]])))
    )


def test_too_short_sequences_name_the_keys():
  with pytest.raises(ValueError, match="train.seq_len=20.*data.span"):
    encoder.SpanSource(SOURCE).batch(0, 2, 20)
  with pytest.raises(ValueError, match="train.seq_len=10.*data.tags"):
    encoder.TagSource(SOURCE).batch(0, 2, 10)


def _numpy_best(start, end, allowed, max_answer):
  best, arg = -np.inf, None
  for i, j in itertools.product(range(len(start)), repeat=2):
    if allowed[i] and allowed[j] and i <= j < i + max_answer and start[i] + end[j] > best:
      best, arg = start[i] + end[j], (i, j)
  return arg


def test_best_spans_and_span_metrics_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 2, 12)).astype(np.float32)
  allowed = rng.random((6, 12)) < 0.7
  pred = np.asarray(tasks.best_spans(jnp.asarray(logits), jnp.asarray(allowed), 4))
  for b in range(6):
    assert tuple(pred[b]) == _numpy_best(logits[b, 0], logits[b, 1], allowed[b], 4)
  pred = jnp.array([[2, 4], [2, 4], [5, 5], [0, 1]])
  target = jnp.array([[2, 4], [3, 6], [7, 8], [0, 1]])
  sums = tasks.span_sums(pred, target, jnp.array([1.0, 1.0, 1.0, 0.0]))
  f1 = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)  # overlap 3..4: 2 of 3 predicted, 2 of 4 true
  np.testing.assert_allclose([sums["exact"], sums["f1"], sums["examples"]], [1, 1 + f1, 3], 1e-6)


@pytest.mark.parametrize("arg", ["tiny"])
def test_eval_outputs_score_a_model(arg):
  """make_task's span and tokens tasks on the tiny configs: sums, predictions and the scores
  of an untrained model are well formed; perfect logits score 100 / 1.0."""
  for config in (squad_config.get_config(arg), ner_config.get_config(arg)):
    config.train.update(batch_size=4, seq_len=48)
    task = tasks.make_task(config, TOK)
    batch = {k: jnp.asarray(v) for k, v in task.batch(0, "eval").items()}
    targets, weights = task.targets(batch)
    width = 48 if task.name == "span" else config.model.num_labels
    perfect = 20.0 * jax.nn.one_hot(targets, width)
    model = lambda logits: type("M", (), {"apply": lambda self, *a, **k: logits})()  # noqa: E731
    sums, preds = task.eval_outputs(model(perfect), {}, batch)
    row = task.summarize(tasks.sum_eval([sums]))
    if task.score:
      row.update(task.score([jax.device_get(preds)]))
    if task.name == "span":
      assert row["exact_match"] == row["f1"] == 100.0
    else:
      assert row["f1"] == row["precision"] == row["recall"] == 1.0
      assert row["token_accuracy"] == 1.0
    assert row["eval_loss"] < 1e-3


def test_task_and_head_must_agree():
  config = squad_config.get_config("tiny")
  config.model.head = "classify"
  with pytest.raises(ValueError, match="model.head='span'"):
    tasks.make_task(config, TOK)
  config = ner_config.get_config("tiny")
  config.model.num_labels = 5
  with pytest.raises(ValueError, match="model.num_labels=7"):
    tasks.make_task(config, TOK)


def test_span_head_distillation_outputs():
  from experiments.methods import distill

  mc = models.get_preset("tiny-encoder", head="span", num_labels=2)
  assert distill._n_outputs(mc) == 0


def test_output_width_counts_the_per_token_heads():
  from experiments import throughput

  assert throughput.output_width(models.get_preset("tiny-encoder", head="span", num_labels=2)) == 2
  assert throughput.output_width(models.get_preset("tiny", head="tokens", num_labels=5)) == 5
