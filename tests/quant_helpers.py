"""Ids, params drawn with numpy and quantized models shared by the compress.quant tests."""

import functools

import flax.linen as nn
import jax
import numpy as np

import models
from compress.quant import QuantDot
from compress.tree import path_name


B, L = 2, 8


def f32(x):
  """A float32 device array (device_put: jnp.asarray would compile a conversion per shape)."""
  return jax.device_put(np.asarray(x, np.float32))


def random_ids(vocab, seed=0, shape=(B, L)):
  return jax.device_put(np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32))


def quant_model(cfg, policy, mode):
  """A model whose dense layers and attention einsums all go through QuantDot(mode)."""
  return models.build(
    cfg,
    dot_general_cls=functools.partial(QuantDot, policy, mode),
    attn_dot_general_cls=functools.partial(QuantDot, policy, mode, "act_act"),
  )


def draw(shapes, std=0.1, seed=0):
  """Params with the structure of `shapes`, drawn with numpy. Biases are nonzero, norm scales
  are not one; LSQ steps are positive: weight steps absmax / 127 per group, activation 0.05."""
  rng = np.random.RandomState(seed)
  flat = {tuple(k.key for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  out = {}
  for keys, x in flat.items():
    noise = rng.normal(size=x.shape).astype(np.float32)
    out[keys] = 1 + 0.1 * noise if keys[-1] == "scale" else std * noise
  for keys, x in flat.items():
    if keys[-1] == "w_step":
      kernel = out[keys[:-2] + ("kernel",)]
      axes = tuple(a for a in range(x.ndim) if x.shape[a] == 1 and kernel.shape[a] > 1)
      out[keys] = np.max(np.abs(kernel), axis=axes, keepdims=True) / 127
    elif keys[-1] in ("a_step", "b_step"):
      out[keys] = np.full(x.shape, 0.05, np.float32)
  leaves = [f32(out[keys]) for keys in flat]
  return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def param_shapes(model, ids):
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]


def leaves(tree):
  """{"a/b/c": leaf} of a nested dict."""
  return {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# A one-layer decoder small enough to compile fast, with an untied output layer.
SMALL = dict(
  vocab_size=64, d_model=64, n_heads=2, d_ff=128, max_len=16, n_layers=1, tie_embeddings=False
)
