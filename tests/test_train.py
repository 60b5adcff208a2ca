"""End-to-end: the real train loop on shrunk real configs.

These test the loop itself on one device (fast); tests/test_parallel.py covers meshes.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import tasks, train
from experiments.configs import classify, lm
from experiments.metrics import read_metrics


def run(config, workdir):
  return train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])


def tiny_lm(steps=200, every=50, **train_overrides):
  """The tiny LM checkpointing and evaluating every `every` steps, logging twice as often."""
  c = lm.get_config("tiny")
  c.train.update(steps=steps, checkpoint_every=every, log_every=every // 2, **train_overrides)
  c.eval.update(every=every, steps=2)
  return c


def evals(workdir):
  return [r for r in read_metrics(workdir) if "eval_loss" in r]


def test_lm_learns(tiny_lm_run):
  """The tiny LM trained 150 steps, evaluated every 50 (conftest.py, shared with other files)."""
  workdir, c, final = tiny_lm_run
  rows = evals(workdir)
  assert [r["step"] for r in rows] == [50, 100, 150]
  first, last = rows[0]["excess_loss"], rows[-1]["excess_loss"]
  assert last < 0.75 * first, (first, last)
  assert final["excess_loss"] == last
  train_rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(25, 151, 25))
  for key in ("loss", "learning_rate", "tokens_per_sec"):
    assert all(np.isfinite(r[key]) for r in train_rows), key
  # accuracy is an eval metric: a train step does not pay for an argmax over the vocabulary
  assert not any("accuracy" in r for r in train_rows)
  assert all(0 < r["eval_accuracy"] < 1 for r in rows)
  assert os.listdir(workdir / "tensorboard")
  written = json.load(open(workdir / "config.json"))
  assert written["model"]["d_model"] == c.model.d_model
  assert written["versions"]["jax"] == jax.__version__  # what the numbers came from


def test_accuracy_is_argmax_also_with_ties():
  """tasks.argmax_is (the eval's accuracy) is jnp.argmax's first index of the maximum, on
  logits where ties are the rule; a row holding NaN counts as wrong."""
  rng = np.random.default_rng(0)
  for vocab in (2, 3, 264):
    logits = rng.integers(0, 3, (50, 7, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (50, 7))
    expected = np.asarray(jax.numpy.argmax(logits, -1)) == targets
    np.testing.assert_array_equal(tasks.argmax_is(logits, targets), expected)
    assert 0 < expected.mean() < 1 or vocab == 264
  assert not tasks.argmax_is(np.array([[[1.0, np.nan, 3.0]]]), np.array([[2]]))[0, 0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """30 steps of the tiny LM, checkpointed and evaluated every 10 (workdir, last eval row): the
  run the resumed and the microbatched runs must equal."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, run(tiny_lm(steps=30, every=10), workdir)


def test_resume_equals_uninterrupted_past_an_unreadable_checkpoint(uninterrupted, tmp_path, caplog):
  """A run stopped after 20 steps (stop_after_steps) whose latest checkpoint (20) is then
  damaged resumes from 10, says so, sets 20 aside, and ends bit for bit where the
  uninterrupted run ends."""
  full_dir, full = uninterrupted
  split = tmp_path / "split"
  run(tiny_lm(steps=30, every=10, stop_after_steps=20), str(split))
  assert max(r["step"] for r in read_metrics(split)) == 20
  for root, _, files in os.walk(split / "checkpoints" / "20"):  # the array data, truncated
    for name in files:
      if os.path.basename(root) == "d":
        open(os.path.join(root, name), "wb").close()
  with caplog.at_level("WARNING", logger="absl"):
    resumed = run(tiny_lm(steps=30, every=10), str(split))
  assert "Resumed from step 10, the newest checkpoint that reads back" in caplog.text
  assert os.listdir(tmp_path / "split" / "checkpoints.unreadable") == ["20"]
  assert resumed["eval_loss"] == full["eval_loss"]
  strip = lambda rows: [
    {k: v for k, v in r.items() if "per_" not in k and k != "mfu"} for r in rows
  ]  # noqa: E731
  assert strip(read_metrics(full_dir)) == strip(read_metrics(split))


def test_microbatches_equal_full_batch(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  b = run(tiny_lm(steps=30, every=10, microbatches=4), str(tmp_path / "b"))
  assert b["eval_loss"] == pytest.approx(full["eval_loss"], abs=1e-5)
  a, b = evals(full_dir), evals(tmp_path / "b")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [10, 20, 30]
  for ra, rb in zip(a, b):
    assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], abs=1e-5), ra["step"]


def test_classify_pretrain_then_finetune(tmp_path):
  c = classify.get_config("tiny")
  c.pretrain.train.update(steps=50, checkpoint_every=50)
  c.pretrain.eval.update(every=50, steps=1)
  c.train.update(steps=75, checkpoint_every=75)  # observed: 0.84 (0.86 after 150 steps)
  c.eval.update(every=75, steps=4)
  final = run(c, str(tmp_path))
  assert evals(tmp_path / "pretrain")  # the MLM stage ran in its own workdir
  # Chance is 0.5; the Bayes rate is 0.9. A model that learned the rule lands between.
  assert 0.7 < final["accuracy"] <= final["bayes_accuracy"] + 0.05, final


def test_init_from_copies_matching_params(tmp_path):
  from parallel import Checkpointer

  c = classify.get_config("tiny")
  c.pretrain.train.update(steps=5, checkpoint_every=5)
  c.pretrain.eval.update(every=5, steps=1)
  c.train.update(steps=0, checkpoint_every=1)  # no fine-tuning: the initialized model, saved
  c.eval.update(every=1, steps=1)
  run(c, str(tmp_path))

  def params(workdir):
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    p = ckpt.manager.restore(ckpt.latest_step())["default"]["params"]
    ckpt.close()
    return p

  pre, fine = params(tmp_path / "pretrain"), params(tmp_path)
  assert "mlm_head" in pre and "classifier" in fine and "classifier" not in pre
  shared = set(pre) & set(fine)
  assert {"embed", "layers_0"} <= shared
  for k in shared:
    jax.tree.map(np.testing.assert_array_equal, pre[k], fine[k])


@pytest.mark.parametrize(
  "override, message",
  [
    (dict(model=dict(d_model=130)), "divisible"),
    (dict(model=dict(vocab_size=32)), "vocab"),  # the synthetic language has 64 symbols
    (dict(model=dict(preset="nope")), "preset"),
    (dict(mesh=dict(data=16)), "devices"),
    (dict(train=dict(batch_size=30, microbatches=4)), "microbatch"),
  ],
)
def test_bad_input_fails_before_compiling(tmp_path, no_compile, override, message):
  c = tiny_lm(steps=2)
  for section, values in override.items():
    c[section].update(values)

  with pytest.raises(ValueError, match=message):
    run(c, str(tmp_path))


def test_unknown_preset_in_config_arg():
  with pytest.raises(ValueError, match="preset"):
    lm.get_config("gpt5")


def test_workdir_with_other_model_is_refused(tiny_lm_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_lm_run[0], workdir)  # a copy of a finished run: it must stay unchanged
  c = tiny_lm(steps=2)
  c.model.n_layers = 3
  with pytest.raises(ValueError, match="n_layers: 2 -> 3"):
    run(c, str(workdir))
