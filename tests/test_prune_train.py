"""Pruning through the train loop: sharded == one device, masks sharded like their params,
QAT + pruning + KD resumed == uninterrupted, sparse export, one-shot without training, bad
config."""

import json

import jax
import numpy as np
import pytest

from compress import prune
from experiments import experiment, train
from experiments.configs import lm, prune as prune_configs
from experiments.metrics import read_metrics
from parallel import load_variables
from steps import run_steps


def pruned_steps(mesh, devices=None, steps=3, **section):
  c = lm.get_config("tiny")
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.prune.update(method="oneshot", start=0, sparsity=0.8, **section)
  return run_steps(c, steps, devices)[:2]


def spec(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


@pytest.mark.parametrize(
  "section", [dict(distribution="global"), dict(granularity="2:4")], ids=["global", "2:4"]
)
def test_sharded_pruning_equals_one_device(section):
  """Masks chosen on the (2, 2, 2) mesh (the global threshold by distributed bisection)
  equal those of one device, and so do the losses; each mask shards like its weight."""
  one, state1 = pruned_steps((1, 1, 1), jax.devices()[:1], **section)
  sharded, state8 = pruned_steps((2, 2, 2), **section)
  np.testing.assert_allclose(sharded, one, atol=2e-5, rtol=0)
  (m1,), (m8,) = prune.masks_of(state1["opt"]), prune.masks_of(state8["opt"])
  keep = [x for x in jax.tree.leaves(m8)]
  assert len(keep) == 12 and all(x.dtype == np.bool_ for x in keep)
  for a, b in zip(jax.tree.leaves(m1), keep):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  flat = jax.tree_util.tree_flatten_with_path(state8["params"])[0]
  masks = jax.tree.structure(state8["params"]).flatten_up_to(m8)
  for (path, w), m in zip(flat, masks):
    if isinstance(m, jax.Array):
      assert spec(m) == spec(w), (jax.tree_util.keystr(path), spec(m), spec(w))
      assert not np.asarray(w)[~np.asarray(m)].any()  # pruned weights are exactly zero
  rep = prune.report(state8["params"], m8)
  assert rep["selected"]["sparsity"] == pytest.approx(0.8 if "distribution" in section else 0.5)


@pytest.mark.parametrize(
  "mesh, rules", [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 1, 4), "tp"), ((2, 2, 2), "fsdp_tp")]
)
def test_masks_shard_like_their_params_under_every_preset(mesh, rules):
  c = lm.get_config("tiny")
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.sharding.rules = rules
  c.prune.update(method="gradual", start=0, end=100, every=10)
  abstract, _ = experiment.build(c).shard_shapes()
  (masks,) = prune.masks_of(abstract["opt"])
  params = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  n = 0
  for (path, w), m in zip(params, jax.tree.structure(abstract["params"]).flatten_up_to(masks)):
    if isinstance(m, jax.ShapeDtypeStruct):
      assert m.dtype == np.bool_ and m.shape == w.shape
      assert m.sharding.spec == w.sharding.spec, jax.tree_util.keystr(path)
      n += 1
  assert n == 12  # q, k, v, out, wi, wo kernels of 2 layers; tied embedding not pruned


def qat_prune_config(teacher_dir, **train_kw):
  """Gradual global pruning + int8 QAT + KD from a wider teacher, with a hidden-state loss
  through a learned projection (128 -> 256): all three compressions in one data-parallel run over 8 devices.

  12 steps: the masks change at steps 2 (s_i = 0), 4, 6 and 8 (s_f); the run checkpoints and
  evaluates after 6 and 12, and stops after 6 when asked (train_kw).
  """
  c = prune_configs.get_config("tiny")
  c.train.update(steps=12, checkpoint_every=6, log_every=2, **train_kw)
  c.eval.update(every=6, steps=2)
  c.prune.update(start=2, end=8, every=2, distribution="global")
  c.quant.update(method="qat", export=False)  # the integer export: tests/test_quant_train.py
  c.teacher = lm.get_config("tiny")
  c.teacher.model.update(d_model=256, d_ff=1024)
  c.teacher.train.update(steps=6, checkpoint_every=6)  # trained first, by the loop
  c.teacher.eval.update(every=6, steps=2)
  c.distill.update(
    method="kd", teacher_workdir=str(teacher_dir), task_weight=0.5, hidden_weight=1.0
  )
  return c


def test_qat_pruning_and_kd_resume_equals_uninterrupted_and_exports(tmp_path):
  """Pruning (gradual, global), QAT and distillation in one run: it trains; the masks, the
  QAT state, the pruning counters and the distillation projection checkpoint and resume bit
  for bit; the sparse export (without the projection) evaluates the model."""
  teacher = tmp_path / "teacher"
  full = train.train_and_evaluate(qat_prune_config(teacher), str(tmp_path / "full"))
  split = tmp_path / "split"
  train.train_and_evaluate(qat_prune_config(teacher, stop_after_steps=6), str(split))
  assert max(r["step"] for r in read_metrics(split)) == 6
  resumed = train.train_and_evaluate(qat_prune_config(teacher), str(split))
  assert resumed["eval_loss"] == full["eval_loss"]
  a, b = read_metrics(tmp_path / "full"), read_metrics(split)
  for key in ("loss", "task_loss", "kd_loss", "hidden_loss"):
    assert [r.get(key) for r in a] == [r.get(key) for r in b]
  logged = [r for r in a if "kd_loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12]
  assert logged[-1]["task_loss"] < logged[0]["task_loss"] - 0.3  # it trains
  assert logged[-1]["kd_loss"] < logged[0]["kd_loss"]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  proj = jax.ShapeDtypeStruct((128, 256), np.float32, sharding=one)
  saved = load_variables(str(split / "checkpoints"), {"extra": {"distill": {"projection": proj}}})
  assert np.abs(np.asarray(saved["extra"]["distill"]["projection"])).sum() > 0
  # Exact sparsity (ties counted), exported sparse weights reload to the same model.
  rep = json.load(open(tmp_path / "full" / "sparsity.json"))
  size = rep["selected"]["size"]
  assert full["sparsity"] == 1 - (size - round(0.9 * size)) / size
  assert full["sparse_eval_loss"] == full["eval_loss"]
  assert full["sparse_bytes"] < 0.3 * full["float32_bytes"]  # the embedding table stays dense
  assert len(rep["layers"]) == 12 and rep["selected"]["sparsity"] == full["sparsity"]
  # The cubic schedule updates at steps 2 (s_i = 0), 4, 6 and 8 (s_f): the eval after
  # 6 steps sees the update at 4, 0.9 * (1 - (1 - 2 / 6)^3).
  evals = {r["step"]: r["sparsity"] for r in a if "eval_loss" in r}
  assert evals[6] == pytest.approx(0.9 * (1 - (1 - 2 / 6) ** 3), abs=2e-5)
  assert evals[12] == full["sparsity"]


def test_oneshot_without_training(tiny_lm_run, tmp_path):
  """prune.py:oneshot (train.steps=0) of the trained dense model (conftest.py's tiny_lm_run,
  trained on one device, loaded onto the 8 through init_from as the config's pretrain stage
  would be), pruned 2:4 on the 8 devices."""
  dense_dir, _, dense = tiny_lm_run
  c = prune_configs.get_config("oneshot")
  del c.pretrain  # the trained model: init_from, which is what a pretrain stage sets
  c.init_from = str(dense_dir)
  c.eval.steps = 2
  c.prune.granularity = "2:4"
  out = train.train_and_evaluate(c, str(tmp_path))
  assert out["sparsity"] == pytest.approx(0.5)
  assert out["eval_loss"] > dense["eval_loss"]  # pruned without retraining: worse
  assert out["sparse_eval_loss"] == out["eval_loss"]


@pytest.mark.parametrize(
  "update, message",
  [
    (dict(method="gradual", sparsity=1.0, end=100), r"\[0, 1\)"),
    (dict(method="gradual", sparsity=-0.5, end=100), r"\[0, 1\)"),
    (dict(method="oneshot", granularity="5:4"), "1 <= N <= M"),
    (dict(method="gradual", start=300, end=100), "ends .* before it starts"),
    (dict(method="gradual", start=0, end=100, every=30), "multiple of every"),
    (dict(method="gradual", start=0, end=10_000), "not before train.steps"),
    (dict(method="magnitude"), "choose one of"),
    (dict(method="oneshot", distribution="erk", granularity="heads"), "erk"),
  ],
)
def test_bad_prune_config_fails_before_compiling(no_compile, update, message):
  c = lm.get_config("tiny")
  c.prune.update(update)

  with pytest.raises(ValueError, match=message):
    experiment.build(c, devices=jax.devices()[:1])


@pytest.mark.parametrize(
  "update, message",
  [
    (dict(select="nothing_matches"), "matches no parameter"),
    (dict(granularity="2:3"), r"layers_0/attn/key/kernel .* M=3 does not divide"),
  ],
)
def test_prune_shape_errors_are_named_before_compiling(no_compile, update, message):
  c = lm.get_config("tiny")
  c.prune.update(method="oneshot", **update)

  exp = experiment.build(c, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=message):
    exp.shard_shapes()
