"""Low-rank factorization in the models and the train loop: a factorized model computes with
its factors, it starts as the truncated SVD of the trained model, it shards, and it composes
with QAT and distillation; bad settings fail before compiling."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import models
from compress import lowrank
from experiments import experiment
from experiments.configs import lm
from steps import run_steps

SELECT = r"attn/(query|key|value|out)/kernel$|mlp/(wi|wg|wo)/kernel$"


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_factorized_model_at_full_rank_is_the_dense_model(scan):
  """Every block kernel factorized at full rank: the same logits as the dense model (1e-5);
  at a lower rank, the logits of the dense model on the merged (truncated) kernels."""
  mc = models.get_preset(
    "tiny", d_model=32, d_ff=64, n_heads=2, vocab_size=64, max_len=16, scan_layers=scan
  )
  ids = jnp.arange(24).reshape(2, 12) % 64
  dense = models.build(mc)
  params = nn.meta.unbox(dense.init(jax.random.PRNGKey(0), ids)["params"])
  stacked = r"^layers/" if scan else None
  s = models.structure(mc)
  for rank, exact in ((32, True), (8, False)):
    choices = lowrank.plan(params, SELECT, rank=rank, n_in=s.inputs, stacked=stacked)
    factored = lowrank.factorize_tree(params, choices)
    model = models.build(mc, dot_general_cls=lowrank.FactorizedDot(lowrank.layer_ranks(choices)))
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)))
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == jax.tree.map(
      lambda x: x.shape, factored
    )
    y = model.apply({"params": factored}, ids)
    merged = lowrank.merge_tree(factored, stacked)
    np.testing.assert_allclose(y, dense.apply({"params": merged}, ids), atol=1e-5, rtol=0)
    if exact:
      np.testing.assert_allclose(y, dense.apply({"params": params}, ids), atol=1e-5, rtol=0)


def _config(base_dir, **fields):
  c = lm.get_config("tiny")
  c.init_from = str(base_dir)
  c.lowrank.update(**{"method": "svd", **fields})
  return c


def test_starts_as_the_truncated_svd_and_fine_tunes(tiny_lm_run):
  """From the trained run at 60% of the selected parameters (global budget): the state holds
  the factors of the loaded kernels (their product is the Eckart-Young truncation), the
  counts add up, and fine-tuning lowers the loss."""
  base_dir, _, _ = tiny_lm_run
  c = _config(base_dir, budget=0.6)
  exp = experiment.build(c, devices=jax.devices()[:1])
  state, shardings = exp.init_state()
  run = experiment.Run(exp, "", shardings, jax.devices()[:1])
  state = run.init(c.init_from)
  (m,) = exp.methods
  state = m.prepare(run, state, fresh=True)
  (loaded,) = _dense(c)
  p = state["params"]["layers_0"]["mlp"]["wi"]
  w = loaded["layers_0"]["mlp"]["wi"]["kernel"]
  u, v = np.asarray(p["kernel_u"]), np.asarray(p["kernel_v"])
  s_all = np.linalg.svd(np.asarray(w), compute_uv=False)
  err = np.linalg.norm(u @ v - np.asarray(w))
  np.testing.assert_allclose(err, np.sqrt((s_all[u.shape[1] :] ** 2).sum()), rtol=1e-4)
  before, after = lowrank.count_params(m.choices)
  assert after <= 0.6 * before
  sizes = [
    x.size for k, x in _flat(state["params"]).items() if k.endswith(("kernel_u", "kernel_v"))
  ]
  assert sum(sizes) == after
  train_step, _ = run.jit_steps()
  losses = []
  for i in range(6):
    state, metrics = train_step(state, exp.batch(i), run.frozen)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0], losses


def _dense(c):
  """The trained dense params (host) the factorization started from."""
  import os

  import parallel

  d = copy.deepcopy(c)
  d.lowrank.method = "none"
  exp = experiment.build(d, devices=jax.devices()[:1])
  state, _ = exp.init_state()
  params = parallel.load_params(os.path.join(c.init_from, "checkpoints"), state["params"])
  return (params,)


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep="/")


def test_sharded_factorized_qat_and_distillation_equal_one_device(tiny_lm_run):
  """Factorized + 4-bit QAT (both factors quantized: two QuantDots per layer) + KD from the
  dense run as the teacher: the first steps' losses on a 2x2x2 mesh equal one device's."""
  base_dir, base_config, _ = tiny_lm_run

  def config():
    c = _config(base_dir, rank=16)
    c.quant.update(method="qat", bits=4)
    c.distill.update(method="kd", teacher_workdir=str(base_dir))
    c.teacher = copy.deepcopy(base_config)
    return c

  one, state, _ = run_steps(config(), 3, jax.devices()[:1])
  c = config()
  c.mesh.update(data=2, fsdp=2, tensor=2)
  sharded, _, _ = run_steps(c, 3)
  np.testing.assert_allclose(sharded, one, atol=5e-5, rtol=0)
  wi = state["collections"]["quant"]["layers_0"]["mlp"]["wi"]
  assert {"QuantDot_0", "QuantDot_1"} <= set(wi), set(wi)


@pytest.mark.parametrize(
  "fields,message",
  [
    (dict(rank=0), r"Set exactly one of them"),
    (dict(rank=-2), r"lowrank.rank=-2"),
    (dict(rank=600), r"lowrank.rank=600"),
    (dict(energy=1.5), r"lowrank.energy=1.5"),
    (dict(budget=1.0), r"lowrank.budget=1.0"),
    (dict(rank=4, energy=0.9), r"Set exactly one of them"),
    (dict(rank=4, select="nothing$"), r"lowrank.select='nothing\$' matched no kernel"),
  ],
)
def test_bad_lowrank_config_fails_before_compiling(tiny_lm_run, no_compile, fields, message):
  with pytest.raises(ValueError, match=message):
    experiment.build(_config(tiny_lm_run[0], **fields))


def test_lowrank_needs_a_trained_run(no_compile):
  c = lm.get_config("tiny")
  c.lowrank.update(method="svd", rank=4)
  with pytest.raises(ValueError, match="factorizes a trained model: set --config.init_from"):
    experiment.build(c)
  c.init_from = "hf:gpt2"
  with pytest.raises(ValueError, match="lowrank reads the dense kernels from a run"):
    experiment.build(c)
