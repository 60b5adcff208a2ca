"""compress.quant's optax side: weight-decay masks and labels, the split optimizer for LSQ
step sizes, and keep_on_grid."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
from compress import quant
from compress.quant import Policy, QuantConfig

from quant_helpers import SMALL, f32, leaves, param_shapes, quant_model, random_ids


# The optax side.


def lsq_model_params():
  """Parameter shapes of a decoder with LSQ layers (step sizes among the params)."""
  cfg = models.get_preset("tiny", **SMALL)
  policy = Policy.of((r"lm_head", None), (r"attn", QuantConfig(lsq=True)), (r".*", QuantConfig()))
  return param_shapes(quant_model(cfg, policy, "train"), random_ids(cfg.vocab_size))


def test_decay_mask_and_labels_single_out_matrices_and_step_sizes():
  tree = lsq_model_params()
  shapes = leaves(tree)
  kinds = {name: name.rsplit("/", 1)[-1] for name in shapes}
  assert set(kinds.values()) == {
    "kernel",
    "bias",
    "scale",
    "embedding",
    "w_step",
    "a_step",
    "b_step",
  }
  assert any(kind == "w_step" and shapes[name].ndim == 3 for name, kind in kinds.items())
  assert shapes["layers_0/attn/query/bias"].ndim == 2  # (heads, head_dim): a bias all the same
  mask, labels = leaves(quant.decay_mask(tree)), leaves(quant.labels(tree))
  for name, kind in kinds.items():
    assert labels[name] == ("steps" if kind in quant.STEP_NAMES else "weights"), name
    assert mask[name] is (kind in ("kernel", "embedding")), name


def small_tree(seed=0):
  """Params shaped like a dense layer with LSQ steps, a 1-D bias, a norm and a table."""
  shapes = {
    "embed": {"embedding": (16, 8)},
    "wi": {"kernel": (8, 2, 4), "bias": (8,), "QuantDot_0": {"w_step": (1, 2, 4), "a_step": ()}},
    "wo": {"kernel": (8, 8), "bias": (8,)},
    "norm": {"scale": (8,)},
  }
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda shape: f32(rng.normal(size=shape) + 0.5),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def test_split_optimizer_leaves_step_sizes_unchanged():
  params = small_tree()

  def update(tx, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  @jax.jit
  def run(grads):
    split = quant.split_optimizer(optax.adamw(1e-2, mask=quant.decay_mask), optax.sgd(0.0))
    decay = quant.split_optimizer(
      optax.adamw(1e-2, weight_decay=0.1, mask=quant.decay_mask), optax.sgd(0.0)
    )
    return update(split, grads), update(decay, jax.tree.map(jnp.zeros_like, grads))

  new, decayed = map(leaves, jax.tree.map(np.asarray, run(small_tree(seed=1))))
  for name, old in leaves(jax.tree.map(np.asarray, params)).items():
    kind = name.rsplit("/", 1)[-1]
    if kind in quant.STEP_NAMES:
      np.testing.assert_array_equal(new[name], old, err_msg=name)
      np.testing.assert_array_equal(decayed[name], old, err_msg=name)
    else:
      assert np.all(new[name] != old), name  # adam moves every entry by about the lr
      # Zero gradients: only the decoupled weight decay acts, on matrices only.
      factor = 1 - 1e-3 if kind in ("kernel", "embedding") else 1.0
      np.testing.assert_allclose(decayed[name], old * factor, rtol=1e-6, err_msg=name)


def test_keep_on_grid_holds_kernels_on_a_4_bit_grid():
  params = small_tree()

  @jax.jit
  def run(grads):
    results = []
    for tx in (optax.chain(optax.adam(0.1), quant.keep_on_grid(bits=4, select=r"kernel$")), optax.adam(0.1)):
      p, state = params, tx.init(params)
      for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
      results.append(p)
    return results

  results = run([small_tree(seed) for seed in range(1, 5)])
  on_grid, plain = map(leaves, jax.tree.map(np.asarray, results))
  kernels = [name for name in on_grid if name.endswith("kernel")]
  assert len(kernels) == 2
  for name, w in on_grid.items():
    if name not in kernels:
      np.testing.assert_array_equal(w, plain[name], err_msg=name)  # not selected: plain adam
      continue
    codes = w / (np.abs(w).max() / 7)  # the per-tensor symmetric 4-bit grid
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=name)
    assert np.abs(codes).max() == pytest.approx(7) and len(np.unique(np.round(codes))) <= 15
    plain_codes = plain[name] / (np.abs(plain[name]).max() / 7)
    assert np.abs(plain_codes - np.round(plain_codes)).max() > 0.1  # adam alone is off grid
  with pytest.raises(ValueError, match="params"):
    quant.keep_on_grid(bits=4, select=r"kernel$").update(small_tree(), optax.EmptyState())
