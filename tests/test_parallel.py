"""Sharded training on 8 simulated CPU devices equals the 1-device run, and shards as told."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import experiment, train
from experiments.configs import classify, lm
from experiments.metrics import read_metrics
from steps import run_steps


def tiny(mesh=(1, 1, 1), rules="fsdp_tp", config=lm, **model):
  """The tiny run on `mesh` with `rules`, 6 steps long (the learning rate warms up over them):
  the checkpoint test's runs are the run_steps cases' (1, 8, 1) "fsdp" and (2, 1, 4) "tp"
  configs, so the init and the train step compile once for both."""
  c = config.get_config("tiny")
  c.train.steps = 6
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.sharding.rules = rules
  c.model.update(model)
  return c


@functools.cache
def reference(config_name="lm", **model):
  config = {"lm": lm, "classify": classify}[config_name]
  return run_steps(tiny(config=config, **model), devices=jax.devices()[:1])[0]


@pytest.mark.parametrize(
  "mesh, rules",
  [
    ((8, 1, 1), "dp"),
    ((1, 8, 1), "fsdp"),
    ((2, 1, 4), "tp"),
    ((2, 2, 2), "fsdp_tp"),
  ],
)
def test_sharded_losses_equal_one_device(mesh, rules):
  losses, _, _ = run_steps(tiny(mesh, rules))
  np.testing.assert_allclose(losses, reference(), atol=1e-5, rtol=0)


def test_sharded_encoder_classifier_equals_one_device():
  c = tiny((2, 2, 2), config=classify)
  losses, _, _ = run_steps(c)
  np.testing.assert_allclose(losses, reference("classify"), atol=1e-5, rtol=0)


def test_scanned_remat_llama_style_sharded_equals_one_device():
  llama = dict(
    norm="rmsnorm",
    positions="rotary",
    gated_mlp=True,
    activation="silu",
    use_bias=False,
    n_kv_heads=2,
    tie_embeddings=False,
    scan_layers=True,
    remat_policy="full",
  )
  losses, _, _ = run_steps(tiny((2, 2, 2), **llama))
  np.testing.assert_allclose(losses, reference(**llama), atol=1e-5, rtol=0)


def test_params_and_optimizer_state_carry_the_rules_shardings():
  _, state, _ = run_steps(tiny((2, 2, 2)), steps=1)
  wi = state["params"]["layers_0"]["mlp"]["wi"]["kernel"]  # (embed, mlp)
  query = state["params"]["layers_0"]["attn"]["query"]["kernel"]  # (embed, heads, head_dim)
  embedding = state["params"]["embed"]["embedding"]  # (vocab, embed)
  assert wi.sharding.spec == P("fsdp", "tensor")
  assert query.sharding.spec == P("fsdp", "tensor", None)
  assert embedding.sharding.spec == P("tensor", "fsdp")
  # Adam's moments shard exactly like their parameters.
  adam = state["opt"][1][0]
  for moment in (adam.mu, adam.nu):
    jax.tree.map(
      lambda m, p: np.testing.assert_equal(m.sharding.spec, p.sharding.spec),
      moment,
      state["params"],
    )
  assert state["step"].sharding.is_fully_replicated


def test_fsdp_shards_bytes_eightfold():
  _, state, _ = run_steps(tiny((1, 8, 1), "fsdp"), steps=1)
  leaves = jax.tree.leaves({"params": state["params"], "opt": state["opt"]})
  total = sum(x.nbytes for x in leaves)
  replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
  device = jax.devices()[0]
  on_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)
  assert replicated < 0.05 * total  # only norms, some biases and counters
  assert on_device <= total / 8 + replicated
  assert on_device >= (total - replicated) / 8


def test_checkpoint_restores_onto_another_mesh(tmp_path):
  def config(mesh, rules, **train_overrides):
    c = tiny(mesh, rules)
    c.train.update(log_every=1, checkpoint_every=3, **train_overrides)
    c.eval.update(every=3, steps=1)
    return c

  train.train_and_evaluate(config((1, 8, 1), "fsdp"), str(tmp_path / "whole"))
  # Save on fsdp=8, stop; resume on data=2 x tensor=4 (tensor-parallel rules).
  moved = str(tmp_path / "moved")
  train.train_and_evaluate(config((1, 8, 1), "fsdp", stop_after_steps=3), moved)
  train.train_and_evaluate(config((2, 1, 4), "tp"), moved)
  whole, moved = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "moved")
  assert [r["step"] for r in whole] == [r["step"] for r in moved]
  for a, b in zip(whole, moved):
    key = "loss" if "loss" in a else "eval_loss"
    assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.parametrize(
  "mesh, model, batch, message",
  [
    ((16, 1, 1), {}, 16, "8 are available"),
    ((3, 1, 1), {}, 16, "8 are available"),
    ((1, 1, 8), {}, 16, "does not divide"),  # 4 heads over tensor=8
    ((8, 1, 1), {}, 12, "train.batch_size=12"),
    ((1, 1, 8), dict(n_heads=8, d_model=128, vocab_size=270), 16, "embed/embedding"),
  ],
)
def test_bad_mesh_input_fails_before_compiling(no_compile, mesh, model, batch, message):
  c = tiny(mesh, **model)
  c.train.batch_size = batch

  with pytest.raises(ValueError, match=message):
    exp = experiment.build(c)
    exp.shard_shapes()
