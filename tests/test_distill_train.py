"""Distillation through the train loop: sharded == one device (KD + hidden + attention terms),
the student initialized from every other teacher layer, the cached teacher top-k == the live
one, bad configs rejected before compiling. Pruning + QAT + KD in one resumed run:
tests/test_prune_train.py."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from experiments import experiment
from experiments.methods import distill as distill_method, teacher_cache
from experiments.configs import distill as distill_configs
from parallel import Checkpointer
from steps import run_steps


def small(c, steps):
  c.train.update(steps=steps, batch_size=16, seq_len=16, log_every=2, checkpoint_every=steps)
  c.eval.update(every=steps, steps=1, batch_size=16)
  return c


def config(arg="tiny", steps=3, teacher_dir="", mesh=(1, 1, 1), **distill):
  c = small(distill_configs.get_config(arg), steps)
  small(c.teacher, 4)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.distill.update(teacher_workdir=str(teacher_dir), **distill)
  return c


def save_teacher(c, directory):
  """A teacher run in `directory`: its initial state saved as its final checkpoint (random
  weights: the tests compare code paths, not how good the teacher is)."""
  exp = experiment.build(c.teacher, devices=jax.devices()[:1])
  state, _ = exp.init_state()
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  ckpt.save(c.teacher.train.steps, state)
  ckpt.close()
  return state


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
  directory = tmp_path_factory.mktemp("lm_teacher")
  save_teacher(config(), directory)
  return directory


def test_sharded_distillation_equals_one_device(lm_teacher):
  """KD (chunked over the sequence) + hidden-state + attention transfer, the teacher and the
  student both sharded over (data, fsdp, tensor) = (2, 2, 2): the same losses and params as
  on one device."""
  terms = dict(hidden_weight=1.0, attention_weight=0.5, layer_map="0:1,1:3", chunk=8)
  one, s1, _ = run_steps(config(teacher_dir=lm_teacher, **terms), 3, jax.devices()[:1])
  sharded, s8, exp = run_steps(config(teacher_dir=lm_teacher, mesh=(2, 2, 2), **terms), 3)
  np.testing.assert_allclose(sharded, one, atol=2e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  teacher, _ = exp.method("distill").load_teacher(exp)
  kernel = teacher["params"]["layers_0"]["attn"]["query"]["kernel"]
  assert len(kernel.sharding.device_set) == 8  # the teacher lives on the student's mesh


def test_loss_terms_and_their_weights(lm_teacher):
  """The objective is task_weight x task loss + the weighted terms; a student with its
  teacher's weights has KD = 0 and hidden-state loss 0 on the mapped layers."""
  c = config(teacher_dir=lm_teacher, task_weight=0.5, kd_weight=3.0, hidden_weight=2.0)
  c.model.n_layers = 4
  c.distill.update(init="0:0,1:1,2:2,3:3", layer_map="0:0,3:3")
  exp = experiment.build(c, devices=jax.devices()[:1])
  state, shardings = exp.init_state()
  d = exp.method("distill")
  teacher, _ = d.load_teacher(exp)
  run = experiment.Run(exp, "", shardings, frozen={"distill": teacher})
  params = d.prepare(run, state, fresh=True)["params"]
  assert run.loaded  # LSQ steps would be re-initialized from these weights
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loss = jax.jit(distill_method.make_loss(exp.task, exp.model, exp.model_config, d.teacher))
  batch, frozen = exp.batch(0), {"distill": teacher}
  total, sums = loss(params, {}, batch, jax.random.key(0), {}, frozen)
  assert abs(float(sums["kd_loss"])) < 1e-4 and abs(float(sums["hidden_loss"])) < 1e-4
  np.testing.assert_allclose(total, 0.5 * sums["task_loss"] + 3 * sums["kd_loss"], rtol=1e-5)
  moved = jax.tree.map(lambda x: x * 1.1, params)
  total, sums = loss(moved, {}, batch, jax.random.key(0), {}, frozen)
  assert float(sums["kd_loss"]) > 1e-3 and float(sums["hidden_loss"]) > 1e-3
  expected = 0.5 * sums["task_loss"] + 3 * sums["kd_loss"] + 2 * sums["hidden_loss"]
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_encoder_student_starts_from_every_other_teacher_layer(tmp_path):
  """DistilBERT's init: student layer i = teacher layer 2i, embeddings and heads copied."""
  c = config("encoder", teacher_dir=tmp_path)
  teacher_state = save_teacher(c, tmp_path)
  _, state, _ = run_steps(c, 0, jax.devices()[:1])
  t, s = teacher_state["params"], state["params"]
  assert sorted(k for k in s if k.startswith("layers_")) == ["layers_0", "layers_1"]
  for i in range(2):
    for a, b in zip(jax.tree.leaves(s[f"layers_{i}"]), jax.tree.leaves(t[f"layers_{2 * i}"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for key in ("embed", "pos_embed", "embed_norm", "mlm_head"):
    for a, b in zip(jax.tree.leaves(s[key]), jax.tree.leaves(t[key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cached_top_k_equals_the_live_teacher(lm_teacher, tmp_path):
  """Top-k logits cached on disk give the student's loss exactly as the live teacher's top k;
  the cache is reused when complete."""
  cached = config("cached", steps=2, teacher_dir=lm_teacher)
  exp = experiment.build(cached, devices=jax.devices()[:1])
  d = exp.method("distill")
  teacher, _ = d.load_teacher(exp)
  part = teacher_cache.cache_top_k(exp, d.teacher, teacher, str(tmp_path / "cache"))
  stamp = os.path.getmtime(os.path.join(part, "values.npy"))
  assert teacher_cache.cache_top_k(exp, d.teacher, teacher, str(tmp_path / "cache")) == part
  assert os.path.getmtime(os.path.join(part, "values.npy")) == stamp
  values = np.load(os.path.join(part, "values.npy"))
  assert values.shape == (2, 16, 16, 16) and not os.path.exists(part + ".tmp")

  live = experiment.build(
    config("tiny", teacher_dir=lm_teacher, top_k=16), devices=jax.devices()[:1]
  )
  params = live.init_state()[0]["params"]
  from_disk = dataclasses.replace(exp, task=teacher_cache.with_cache(exp.task, part))
  live_teacher = live.method("distill").teacher
  cached_loss = distill_method.make_loss(from_disk.task, exp.model, exp.model_config, d.teacher)
  live_loss = distill_method.make_loss(live.task, live.model, live.model_config, live_teacher)
  cached_loss, live_loss = jax.jit(cached_loss), jax.jit(live_loss)  # compiled once each
  for step in range(2):
    a, sums = cached_loss(params, {}, from_disk.batch(step), jax.random.key(0), {}, {})
    b, _ = live_loss(params, {}, live.batch(step), jax.random.key(0), {}, {"distill": teacher})
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(sums["kd_loss"]) > 0.01


def test_quantized_teacher(tmp_path):
  """A teacher run trained with QAT is loaded with its quantized forward: the same weights
  give other soft targets than the float teacher's."""
  c = config(teacher_dir=tmp_path)
  c.teacher.quant.update(method="qat", bits=4)
  save_teacher(c, tmp_path)
  exp = experiment.build(c, devices=jax.devices()[:1])
  teacher, _ = exp.method("distill").load_teacher(exp)
  batch = exp.batch(0)
  forward = jax.jit(lambda m, v: exp.task.forward(m, v, batch, None, False)[0], static_argnums=0)
  quantized = forward(exp.method("distill").teacher.model, teacher)
  c.teacher.quant.method = "none"
  float_exp = experiment.build(c, devices=jax.devices()[:1])
  floating = forward(float_exp.method("distill").teacher.model, teacher)
  assert np.isfinite(np.asarray(quantized)).all()
  assert 1e-4 < float(np.abs(quantized - floating).max()) < 1.0


@pytest.mark.parametrize(
  "update, message",
  [
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(temperature=-1.0), "must be > 0"),
    (dict(hidden_weight=1.0, layer_map="0:4"), r"teacher layer 4 points past the depth"),
    (dict(hidden_weight=1.0, layer_map="2:0"), r"student layer 2 .* past the depth"),
    (dict(init="every_other", hidden_weight=0.0), None),  # 2 of 4 layers: fits
    (dict(kind="kl"), "choose one of"),
    (dict(top_k=8, kind="jsd"), "forward KL only"),
    (dict(cache=True), "set distill.top_k > 0"),
    (dict(layer_map="0-1", hidden_weight=1.0), "pairs like"),
    (dict(chunk=5), "does not divide"),
  ],
)
def test_bad_distill_config_fails_before_compiling(no_compile, update, message):
  c = config(**update)
  if message is None:
    experiment.build(c, devices=jax.devices()[:1])
    return
  with pytest.raises(ValueError, match=message):
    experiment.build(c, devices=jax.devices()[:1])


def test_mismatched_teacher_fails_before_compiling(no_compile):
  c = config()
  c.teacher.model.vocab_size = 300
  with pytest.raises(ValueError, match=r"vocabulary \(264 outputs\) and the teacher's \(300\)"):
    experiment.build(c, devices=jax.devices()[:1])
  c = config(init="every_other")
  c.model.n_layers = 3
  with pytest.raises(ValueError, match="teacher layer 4 points past"):
    experiment.build(c, devices=jax.devices()[:1])
  c = config(init="every_other")
  c.model.d_ff = 256
  with pytest.raises(ValueError, match=r"model.d_ff differ \(256 vs 512\)"):
    experiment.build(c, devices=jax.devices()[:1])
  c = config()
  c.teacher.task = "mlm"
  with pytest.raises(ValueError, match="same task"):
    experiment.build(c, devices=jax.devices()[:1])
  c = config()
  del c.teacher
  with pytest.raises(ValueError, match="needs config.teacher"):
    experiment.build(c, devices=jax.devices()[:1])


def test_teacher_without_checkpoint_is_named(tmp_path):
  c = config(teacher_dir=tmp_path / "nothing")
  exp = experiment.build(c, devices=jax.devices()[:1])
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*nothing"):
    exp.method("distill").load_teacher(exp)
