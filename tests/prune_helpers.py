"""Arrays, trees and jitted pruners shared by the compress.prune tests."""

import functools
import re

import flax.linen as nn
import jax
import numpy as np
import optax

import models
from compress import prune


def f32(x):
  """A float32 device array (device_put: jnp.asarray would compile a conversion per shape)."""
  return jax.device_put(np.asarray(x, np.float32))


def leaves(tree):
  """{"a/b/c": leaf} of a nested dict, in flattening order (the order pruning selects in)."""
  return {
    "/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)): x
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def numpy_tree(tree):
  return jax.tree.map(np.asarray, tree)


def draw(shapes, seed=0, ties=False, std=1.0):
  """Arrays shaped like `shapes` (ShapeDtypeStructs or tuples). `ties`: nonzero integer values
  in +-{1, 2, 3, 4}, so magnitudes tie everywhere and no weight is zero before pruning."""
  rng = np.random.RandomState(seed)

  def one(x):
    shape = x if isinstance(x, tuple) else x.shape
    if ties:
      return f32(rng.randint(1, 5, size=shape) * rng.choice([-1, 1], size=shape))
    return f32(std * rng.normal(size=shape))

  return jax.tree.map(one, shapes, is_leaf=lambda x: isinstance(x, tuple))


# The models' layout, passed to compress.prune as plain data (compress knows no names).
S = models.structure()
SELECT = dict(select=S.weights)  # the weight matrices (kernels), as the experiments select
SCANNED = dict(select=S.weights, stacked=f"^{S.layers}/")
HEADS = prune.parse_granularity("heads", heads=S.heads)
NEURONS = prune.parse_granularity("neurons", neurons=S.neurons)


def n_m(spec):
  """An N:M granularity on the models' kernels, e.g. n_m("2:4")."""
  return prune.parse_granularity(spec, nm_axes=S.contracting)


def tiny_shapes(**overrides):
  cfg = models.get_preset("tiny", **overrides)
  model = models.build(cfg)
  ids = np.zeros((1, 8), np.int32)
  return model, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]


def selected(tree, pattern=S.weights):
  return {n: x for n, x in leaves(tree).items() if re.search(pattern, n) and np.ndim(x) >= 2}


def stable_smallest(scores, k):
  """Positions (into the concatenated flattened scores) of the k smallest, ties by position."""
  flat = np.concatenate([np.ravel(s) for s in scores])
  return np.sort(np.argsort(flat, kind="stable")[:k])


def n_prune(s, size):
  k = s * size
  assert abs(k - np.floor(k) - 0.5) > 1e-3, "choose sizes away from the rounding boundary"
  return round(k)


@functools.cache
def pruner(**kwargs):
  """One-shot pruning jitted once per granularity / distribution (the sparsity is traced)."""
  return jax.jit(lambda params, s: prune.one_shot_prune(params, s, **kwargs))


TABLES = r"kernel$|embedding$"  # the 6 kernels and both embedding tables (as in the export)

# Small matrices for the optimizer tests (one selection each to compile).
MATRICES = {"a": {"kernel": (16, 24)}, "b": {"kernel": (36, 8)}, "c": {"bias": (8,)}}


def jit_step(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step
