"""models.structure: its rules describe the models' parameter trees (encoder and decoder,
scanned or not), and compress uses only what it is given: the same pruning and student init
work on a tree with other names and a matching set of rules."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from compress import distill, prune

from prune_helpers import draw, leaves, numpy_tree

S = models.structure()


def first(rules, name):
  return next((value for pattern, value in rules if re.search(pattern, name)), None)


@pytest.mark.parametrize(
  "preset, overrides",
  [
    ("tiny", {}),
    ("tiny", dict(scan_layers=True)),
    ("tiny", dict(n_kv_heads=2, gated_mlp=True, use_bias=False, scan_layers=True)),
    ("tiny-encoder", {}),
    ("tiny-encoder", dict(scan_layers=True, head="classify")),
  ],
  ids=str,
)
def test_the_rules_describe_the_models_trees(preset, overrides):
  cfg = models.get_preset(preset, n_layers=2, **overrides)
  assert models.structure(cfg) == S
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = leaves(nn.unbox(jax.eval_shape(models.build(cfg).init, jax.random.key(0), ids)))
  shapes = {name.removeprefix("params/"): x.shape for name, x in shapes.items()}
  h, k, f, e = cfg.n_heads, cfg.resolved_kv_heads, cfg.d_ff, cfg.d_model
  scanned = cfg.scan_layers
  tops = {name.split("/")[0] for name in shapes}
  assert {t for t in tops if t.startswith(S.layers)} == (
    {S.layers} if scanned else {f"{S.layers}_{i}" for i in range(2)}
  )
  n_heads = n_neurons = 0
  for name, shape in shapes.items():
    layer = name.startswith(f"{S.layers}/")
    assert not layer or shape[0] == 2, name  # scanned: the layers on axis 0
    own = shape[1:] if layer else shape  # one layer's shape
    if re.search(S.weights, name):
      assert len(own) >= 2 and not re.search(S.embeddings, name), name
      axis = first(S.contracting, name)
      inputs = {"out": cfg.resolved_head_dim, "wo": f}.get(name.split("/")[-2], e)
      assert shape[axis] == inputs, name  # out [H, D, E]: along D; every other: its input
    else:
      assert re.search(S.embeddings, name) or len(own) == 1 or name.endswith("bias"), name
    axes = first(S.heads, name)
    if axes is not None:
      kept = tuple(d for a, d in enumerate(shape) if a not in {x % len(shape) for x in axes})
      assert kept[-1] == (k if re.search(r"/(key|value)/", name) else h), name
      n_heads += 1
    axes = first(S.neurons, name)
    if axes is not None:
      assert np.delete(shape, axes)[-1] == f, name
      n_neurons += 1
  assert n_heads == 4 * (1 if scanned else 2)
  assert n_neurons == (3 if cfg.gated_mlp else 2) * (1 if scanned else 2)


# A tree with other names: blocks_{i}/self_attention/{q,k,v,o}/w and ffn/{up,down}/w.

H, D, E, F = 4, 4, 8, 12
OTHER = dict(
  layers="blocks",
  heads=((r"self_attention/(q|k|v)/w$", (-3, -1)), (r"self_attention/o/w$", (-2, -1))),
  neurons=((r"ffn/up/w$", (-2,)), (r"ffn/down/w$", (-1,))),
  contracting=((r"self_attention/(q|k|v)/w$", -3), (r".", -2)),
)


def block(seed):
  shapes = {
    "self_attention": {p: {"w": (E, H, D)} for p in "qkv"} | {"o": {"w": (H, D, E)}},
    "ffn": {"up": {"w": (E, F)}, "down": {"w": (F, E)}},
    "norm": {"gain": (E,)},
  }
  return draw(shapes, seed=seed)


def other_tree(n_layers, seed=0, scanned=False):
  blocks = [block(seed + i) for i in range(n_layers)]
  tree = {"tok": {"table": draw({"t": (16, E)}, seed=seed + 99)["t"]}}
  if scanned:
    return tree | {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
  return tree | {f"blocks_{i}": b for i, b in enumerate(blocks)}


def test_heads_and_neurons_of_a_tree_with_other_names_are_pruned_whole():
  tree = other_tree(2)
  heads = prune.parse_granularity("heads", heads=OTHER["heads"])
  pruned = numpy_tree(jax.jit(lambda p: prune.one_shot_prune(p, 0.5, granularity=heads))(tree))
  params = numpy_tree(tree)
  for i in range(2):
    attn, before = pruned[f"blocks_{i}"]["self_attention"], params[f"blocks_{i}"]
    dead = [(attn[p]["w"] == 0).all(axis=(0, 2)) for p in "qkv"]
    dead.append((attn["o"]["w"] == 0).all(axis=(1, 2)))
    assert all(np.array_equal(d, dead[0]) for d in dead) and dead[0].sum() == 2  # whole heads
    score = sum(np.abs(before["self_attention"][p]["w"]).sum(axis=(0, 2)) for p in "qkv")
    score += np.abs(before["self_attention"]["o"]["w"]).sum(axis=(1, 2))
    np.testing.assert_array_equal(np.flatnonzero(dead[0]), np.sort(np.argsort(score)[:2]))
    for p in "qkv":  # the surviving heads keep their values
      kept = attn[p]["w"][:, ~dead[0]]
      np.testing.assert_array_equal(kept, before["self_attention"][p]["w"][:, ~dead[0]])
    for name, x in leaves(before["ffn"]).items():
      np.testing.assert_array_equal(leaves(pruned[f"blocks_{i}"]["ffn"])[name], x)
  np.testing.assert_array_equal(pruned["tok"]["table"], params["tok"]["table"])

  neurons = prune.parse_granularity("neurons", neurons=OTHER["neurons"])
  pruned = numpy_tree(prune.one_shot_prune(tree, 0.25, granularity=neurons))
  ffn = pruned["blocks_0"]["ffn"]
  dead = (ffn["up"]["w"] == 0).all(axis=0)
  np.testing.assert_array_equal(dead, (ffn["down"]["w"] == 0).all(axis=1))
  assert dead.sum() == 3  # 0.25 * 12 neurons


def test_scanned_tree_with_other_names_is_pruned_layer_by_layer():
  heads = prune.parse_granularity("heads", heads=OTHER["heads"])
  flat = numpy_tree(prune.one_shot_prune(other_tree(2), 0.5, granularity=heads))
  stacked = numpy_tree(
    prune.one_shot_prune(
      other_tree(2, scanned=True), 0.5, granularity=heads, stacked=f"^{OTHER['layers']}/"
    )
  )
  for i in range(2):
    for name, x in leaves(flat[f"blocks_{i}"]).items():
      np.testing.assert_array_equal(leaves(stacked["blocks"])[name][i], x, err_msg=name)

  # The generic selector (every matrix) counts a stack's rank per layer: its norms' gains
  # [layers, E] are vectors, not matrices.
  tree = other_tree(2, scanned=True)
  pruned = numpy_tree(prune.one_shot_prune(tree, 0.5, stacked=f"^{OTHER['layers']}/"))
  np.testing.assert_array_equal(pruned["blocks"]["norm"]["gain"], tree["blocks"]["norm"]["gain"])
  assert np.mean(pruned["tok"]["table"] == 0) == 0.5
  assert all(np.mean(x == 0) == 0.5 for x in pruned["blocks"]["ffn"]["up"]["w"])  # per layer


def test_n_m_follows_the_given_input_axes():
  tree = other_tree(1)
  g = prune.parse_granularity("2:4", nm_axes=OTHER["contracting"])
  pruned = numpy_tree(prune.one_shot_prune(tree, granularity=g, select=r"/w$"))
  q = np.moveaxis(pruned["blocks_0"]["self_attention"]["q"]["w"], 0, -1)  # E = 8 last
  assert np.all((q.reshape(H, D, 2, 4) != 0).sum(-1) == 2)
  o = np.moveaxis(pruned["blocks_0"]["self_attention"]["o"]["w"], -2, -1)  # the catch-all: D
  assert np.all((o != 0).sum(-1) == 2)
  up = pruned["blocks_0"]["ffn"]["up"]["w"].T  # (F, E)
  assert np.all((up.reshape(F, 2, 4) != 0).sum(-1) == 2)
  with pytest.raises(ValueError, match=r"self_attention/k/w \(8, 4, 4\): which axis"):
    prune.one_shot_prune(tree, granularity="2:4", select=r"/w$")


@pytest.mark.parametrize("scan", [(False, False), (True, True), (False, True)], ids=str)
def test_student_init_under_another_layers_key(scan):
  teacher, student = other_tree(4, 0, scan[0]), other_tree(2, 10, scan[1])
  out = distill.init_from_teacher(student, teacher, {1: 3}, OTHER["layers"])
  assert jax.tree.structure(out) == jax.tree.structure(student)

  def layer(p, i):
    return jax.tree.map(lambda x: x[i], p["blocks"]) if "blocks" in p else p[f"blocks_{i}"]

  jax.tree.map(np.testing.assert_array_equal, layer(out, 1), layer(teacher, 3))
  jax.tree.map(np.testing.assert_array_equal, layer(out, 0), layer(student, 0))
  np.testing.assert_array_equal(out["tok"]["table"], teacher["tok"]["table"])
