"""The method interface (experiments/methods): the loop names no method, a method defined
outside the package (the README's "Adding a method" example) runs through the loop, and
one-shot pruning by a gradient score reads real gradients."""

import inspect
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from compress import prune
from experiments import experiment, methods, train
from experiments.configs import lm
from experiments.configs import prune as prune_configs
from steps import run_steps


def test_the_train_loop_names_no_method():
  source = inspect.getsource(train.train_and_evaluate) + inspect.getsource(train._train)
  assert not re.search(r"prune|quant|distill|teacher|lsq", source, re.IGNORECASE)
  assert len(source.splitlines()) <= 100
  names = [m.name for m in methods.registry()]
  assert names[:6] == ["distill", "lowrank", "oneshot", "prune", "quant", "lora"], names


class L1(methods.Method):
  """An L1 penalty on every parameter: `--config.l1.method=l1 --config.l1.weight=1e-5`."""

  name = "l1"

  @staticmethod
  def section():
    return ml_collections.ConfigDict(dict(method="none", weight=1e-5))  # "none" | "l1"

  def __init__(self, config):
    super().__init__(config)
    if self.c.method != "l1" or not self.c.weight >= 0:
      raise ValueError(f"l1: method must be 'none' or 'l1', weight >= 0 (got {self.c}).")

  def loss(self, run, loss):
    def with_l1(params, extra, batch, rng, collections, frozen):
      total, sums = loss(params, extra, batch, rng, collections, frozen)
      norm = sum(jnp.abs(w).sum() for w in jax.tree.leaves(params))
      total = total + self.c.weight * norm * sums["weight"]  # sums: per token, summed
      return total, {**sums, "loss": total, "l1": norm * sums["weight"]}

    return with_l1

  def eval_fields(self, run, state):
    return {"l1": float(sum(jnp.abs(w).sum() for w in jax.tree.leaves(state["params"])))}


@pytest.fixture
def l1_method():
  methods.register(L1)
  yield L1
  methods._REGISTERED.remove(L1)


def tiny(steps=2):
  c = lm.get_config("tiny")
  c.train.update(steps=steps, batch_size=8, seq_len=16, log_every=1, checkpoint_every=steps)
  c.eval.update(every=steps, steps=1, batch_size=8)
  return c


def test_a_registered_method_runs_through_the_loop(l1_method, tmp_path):
  c = tiny()
  assert c.l1.method == "none"  # every config has the section, off
  plain, state, _ = run_steps(c, 1, jax.devices()[:1])
  c.l1.update(method="l1", weight=1e-3)
  with_l1, _, exp = run_steps(c, 1, jax.devices()[:1])
  norm = sum(
    float(np.abs(np.asarray(w)).sum()) for w in jax.tree.leaves(exp.init_state()[0]["params"])
  )
  assert with_l1[0] == pytest.approx(plain[0] + 1e-3 * norm, rel=1e-5)
  row = train.train_and_evaluate(c, str(tmp_path))
  assert row["l1"] > 0 and "eval_loss" in row
  c.l1.weight = -1.0
  with pytest.raises(ValueError, match="weight >= 0"):
    experiment.build(c)


@pytest.mark.parametrize("score", ["saliency", "movement"])
def test_oneshot_gradient_scores_read_the_gradients(tiny_lm_run, score):
  """prune.method=oneshot with train.steps=0 and a gradient score: the mask keeps the
  largest scores of the mean gradient over prune.calib_batches batches (the same ranking in
  NumPy), not positions."""
  dense_dir, _, _ = tiny_lm_run
  c = prune_configs.get_config("oneshot")
  del c.pretrain
  c.update(init_from=str(dense_dir))
  c.prune.update(score=score, sparsity=0.5, calib_batches=2)
  exp = experiment.build(c, devices=jax.devices()[:1])
  abstract, shardings = exp.shard_shapes()
  run = experiment.Run(exp, "", shardings)
  state = run.init(c.init_from)
  before = jax.tree.map(np.asarray, state["params"])

  def loss(p, b):
    total, sums = exp.task.loss(exp.model, {"params": p}, b, None, False)
    return total, sums["weight"]

  grads = [jax.grad(loss, has_aux=True)(state["params"], exp.batch(i)) for i in range(2)]
  mean = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), grads[0][0], grads[1][0])
  mean = jax.tree.map(lambda g: g / (float(grads[0][1]) + float(grads[1][1])), mean)
  after = exp.method("prune").prepare(run, state, fresh=True)["params"]
  kernel = ("layers_0", "mlp", "wi", "kernel")
  w, g, pruned = (np.asarray(_at(t, kernel)) for t in (before, mean, after))
  s = np.abs(w * g) if score == "saliency" else -g * w
  expect = s > np.sort(s, axis=None)[s.size // 2 - 1]
  np.testing.assert_array_equal(pruned != 0, expect)
  assert (pruned == 0).mean() == 0.5


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_a_gradient_score_without_gradients_is_refused():
  params = {"w": jnp.ones((8, 8))}
  with pytest.raises(ValueError, match="reads the gradients"):
    prune.one_shot_prune(params, 0.5, score="saliency", select="w")
