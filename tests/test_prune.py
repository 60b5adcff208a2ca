"""Properties of compress.prune: exact selection (ties, weights, sharded), the sparsity each
granularity and distribution reaches, the cubic schedule, masks that hold under optimizers and
optax wrappers, sparse export, the report and input errors.

Arrays are drawn with numpy (jax's RNG is slow to compile on CPU); each case compiles one jitted
function, reused across sparsities by passing the sparsity traced.
"""

import functools
import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import models
import parallel
from compress import prune, quant


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


def tiny_shapes(**overrides):
  cfg = models.get_preset("tiny", **overrides)
  model = models.build(cfg)
  ids = np.zeros((1, 8), np.int32)
  return model, nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]


def selected(tree, pattern=r"kernel$"):
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


# Exact selection: prune.smallest is a stable top-k without sorting.

SHAPES = [(7, 5), (3,), (4, 2, 3)]  # 62 elements
SIZES = [int(np.prod(s)) for s in SHAPES]
WEIGHTS = (1, 4, 3)  # units per element of each array: 35 + 12 + 72 = 119


def score_cases():
  rng = np.random.RandomState(1)
  yield "ints", [rng.randint(-3, 4, size=s).astype(np.float32) for s in SHAPES]
  signed_zeros = [np.where(rng.rand(*s) < 0.5, -0.0, 0.0).astype(np.float32) for s in SHAPES]
  signed_zeros[1][:] = [1.0, -0.0, -2.0]
  yield "signed-zeros", signed_zeros  # -0.0 and 0.0 are the same score
  yield "all-equal", [np.full(s, 2.5, np.float32) for s in SHAPES]
  yield "distinct", [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  big = [
    rng.choice([-np.inf, -1e30, 1e-38, 3.0, np.inf], size=s).astype(np.float32) for s in SHAPES
  ]
  yield "extremes", big


def test_smallest_is_a_stable_top_k_over_all_arrays():
  smallest = jax.jit(prune.smallest)
  total = sum(SIZES)
  n_cases = 0
  for name, scores in score_cases():
    for k in (0, 1, 17, 31, 35, 38, total - 1, total):
      marked = np.concatenate([np.ravel(m) for m in smallest([f32(s) for s in scores], k)])
      assert marked.dtype == bool
      np.testing.assert_array_equal(
        np.flatnonzero(marked), stable_smallest(scores, k), err_msg=f"{name} k={k}"
      )
      n_cases += 1
  assert n_cases == 40


def test_weighted_smallest_takes_the_shortest_stable_prefix_reaching_k():
  smallest = jax.jit(functools.partial(prune.smallest, weights=WEIGHTS))
  units = np.concatenate([np.full(n, w) for n, w in zip(SIZES, WEIGHTS)])
  total = int(units.sum())
  for name, scores in score_cases():
    flat = np.concatenate([np.ravel(s) for s in scores])
    order = np.argsort(flat, kind="stable")
    for k in (0, 1, 3, 4, 5, 36, 50, 100, total - 1, total):
      marked = np.concatenate([np.ravel(m) for m in smallest([f32(s) for s in scores], k)])
      taken = units[marked].sum()
      assert taken >= k, (name, k)
      if k:  # without the last marked element (in stable order) fewer than k units remain
        last = order[np.flatnonzero(marked[order]).max()]
        assert taken - units[last] < k, (name, k)
      # The marked set is a prefix of the stable order: exactly the reference.
      n = int(np.searchsorted(np.cumsum(units[order]), k)) + 1 if k else 0
      np.testing.assert_array_equal(np.flatnonzero(marked), np.sort(order[:n]), f"{name} {k}")


# The sparsity each distribution and granularity reaches, exactly (ties included).

SPARSITIES = (0.1, 0.5, 0.77)


# The tiny decoder with one layer; pruned with these selectors, each compiled once.
TABLES = r"kernel$|embedding$"  # the 6 kernels and both embedding tables (as in the export)
SOME = r"attn/(query|out)/kernel$|mlp/wi/kernel$"  # (128, 4, 32), (4, 32, 128), (128, 512)


@pytest.fixture(scope="module")
def tiny():
  """(model, params with tied magnitudes: every value +-1..4)."""
  model, shapes = tiny_shapes(n_layers=1)
  return model, draw(shapes, seed=3, ties=True)


def test_uniform_prunes_exactly_the_smallest_of_every_parameter(tiny):
  _, tiny = tiny
  params = numpy_tree(tiny)
  chosen = selected(params, TABLES)
  assert len(chosen) == 8
  for s in SPARSITIES:
    pruned = leaves(numpy_tree(pruner(select=TABLES)(tiny, s)))
    for name, x in leaves(params).items():
      if name not in chosen:  # biases and norms
        np.testing.assert_array_equal(pruned[name], x, err_msg=name)
        continue
      zeros = np.flatnonzero(pruned[name].ravel() == 0)
      assert len(zeros) == n_prune(s, x.size), (name, s)
      np.testing.assert_array_equal(zeros, stable_smallest([np.abs(x)], len(zeros)))
      kept = pruned[name] != 0
      np.testing.assert_array_equal(pruned[name][kept], x[kept])


def test_global_prunes_exactly_the_smallest_over_all_selected(tiny):
  _, tiny = tiny
  # wi's magnitudes 2, 4, 6, 8 (the rest: 1, 2, 3, 4; ties across layers too).
  mlp = tiny["layers_0"]["mlp"]
  tiny = {**tiny, "layers_0": {**tiny["layers_0"], "mlp": {**mlp, "wi": {**mlp["wi"]}}}}
  tiny["layers_0"]["mlp"]["wi"]["kernel"] = f32(2 * np.asarray(mlp["wi"]["kernel"]))
  params = numpy_tree(tiny)
  chosen = selected(params, SOME)
  total = sum(x.size for x in chosen.values())
  for s in SPARSITIES:
    pruned = leaves(numpy_tree(pruner(select=SOME, distribution="global")(tiny, s)))
    zeros = np.flatnonzero(np.concatenate([pruned[name].ravel() for name in chosen]) == 0)
    assert len(zeros) == n_prune(s, total), s
    reference = stable_smallest([np.abs(x) for x in chosen.values()], len(zeros))
    np.testing.assert_array_equal(zeros, reference)
    wi = np.mean(pruned["layers_0/mlp/wi/kernel"] == 0)
    others = [np.mean(pruned[name] == 0) for name in chosen if "wi" not in name]
    assert wi < s - 0.05 and max(others) > s  # one threshold, not a sparsity per layer
    for name, x in leaves(params).items():
      if name not in chosen:
        np.testing.assert_array_equal(pruned[name], x, err_msg=name)


# In size order, and in decreasing sum(shape) / prod(shape) (ERK's density) order too.
ERK_SHAPES = [(8, 8), (16, 32), (32, 64), (64, 64), (4, 32, 64), (128, 256)]


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_erk_sparsities_keep_the_target_and_spare_small_layers(target):
  sparsity = np.asarray(prune.erk_sparsities(ERK_SHAPES, target), np.float64)
  sizes = np.array([np.prod(s) for s in ERK_SHAPES])
  raw = np.array([sum(s) / np.prod(s) for s in ERK_SHAPES])
  assert np.all(np.diff(sizes) > 0) and np.all(np.diff(raw) < 0)
  assert np.all((sparsity >= 0) & (sparsity < 1))
  assert abs(np.sum(sparsity * sizes) / sizes.sum() - target) <= 1e-5
  dense = sparsity == 0
  assert np.all(np.diff(sparsity) >= 0) and np.all(np.diff(sparsity[~dense]) > 0)  # smaller: less
  # Density proportional to sum(shape) / prod(shape) with one factor, capped at 1: the dense
  # layers are the ones that factor would give a density of at least 1.
  eps = (1 - sparsity)[~dense] / raw[~dense]
  np.testing.assert_allclose(eps, eps[0], rtol=1e-4)
  assert np.all(raw[dense] * eps[0] >= 1 - 1e-5) and np.all(raw[~dense] * eps[0] < 1)
  assert dense.sum() == {0.5: 4, 0.9: 1, 0.99: 0}[target]


def test_erk_reaches_each_layers_sparsity_exactly(tiny):
  _, tiny = tiny
  chosen = selected(numpy_tree(tiny), SOME)
  shapes = [x.shape for x in chosen.values()]
  total = sum(x.size for x in chosen.values())
  for s in (0.5, 0.9):
    targets = np.asarray(prune.erk_sparsities(shapes, s))
    pruned = selected(numpy_tree(pruner(select=SOME, distribution="erk")(tiny, s)), SOME)
    counts = [int(np.sum(x == 0)) for x in pruned.values()]
    expected = [n_prune(t, x.size) for t, x in zip(targets, chosen.values())]
    assert counts == expected, s
    assert abs(sum(counts) - s * total) <= len(counts)
    wi, query = pruned["layers_0/mlp/wi/kernel"], pruned["layers_0/attn/query/kernel"]
    assert np.mean(wi == 0) > np.mean(query == 0) + 0.001  # 128x512 sparser than 128x4x32


def test_blocks_are_all_zero_or_all_nonzero(tiny):
  _, tiny = tiny
  s, (r, c) = 0.5, (4, 8)
  pruned = selected(numpy_tree(pruner(select=SOME, granularity="4x8")(tiny, s)), SOME)
  assert len(pruned) == 3
  for name, x in pruned.items():
    *lead, rows, cols = x.shape
    blocks = (x.reshape(*lead, rows // r, r, cols // c, c) != 0).sum(axis=(-3, -1))
    assert set(np.unique(blocks)) == {0, r * c}, name
    assert np.sum(blocks == 0) == n_prune(s, blocks.size), name


def test_heads_and_neurons_are_pruned_whole(tiny):
  _, tiny = tiny
  params = selected(numpy_tree(tiny))
  attn, mlp = "layers_0/attn/", "layers_0/mlp/"
  pruned = selected(numpy_tree(pruner(granularity="heads")(tiny, 0.5)))
  qkv = [pruned[attn + p + "/kernel"] for p in ("query", "key", "value")]
  out = pruned[attn + "out/kernel"]
  alive = np.stack([(x != 0).all(axis=(0, 2)) for x in qkv] + [(out != 0).all(axis=(1, 2))])
  dead = np.stack([(x == 0).all(axis=(0, 2)) for x in qkv] + [(out == 0).all(axis=(1, 2))])
  assert np.all(alive | dead) and np.all(alive == alive[0])
  assert np.sum(dead[0]) == 2  # round(0.5 * 4 heads)
  score = sum(np.abs(params[attn + p + "/kernel"]).sum(axis=(0, 2)) for p in ("query", "key"))
  score += np.abs(params[attn + "value/kernel"]).sum(axis=(0, 2))
  score += np.abs(params[attn + "out/kernel"]).sum(axis=(1, 2))
  np.testing.assert_array_equal(np.flatnonzero(dead[0]), stable_smallest([score], 2))
  for name in (mlp + "wi/kernel", mlp + "wo/kernel"):
    np.testing.assert_array_equal(pruned[name], params[name])  # heads only

  pruned = selected(numpy_tree(pruner(granularity="neurons")(tiny, 0.3)))
  wi, wo = pruned[mlp + "wi/kernel"], pruned[mlp + "wo/kernel"]
  dead = (wi == 0).all(axis=0)
  np.testing.assert_array_equal(dead, (wo == 0).all(axis=1))
  np.testing.assert_array_equal(~dead, (wi != 0).all(axis=0))
  np.testing.assert_array_equal(~dead, (wo != 0).all(axis=1))
  assert np.sum(dead) == n_prune(0.3, 512)
  score = np.abs(params[mlp + "wi/kernel"]).sum(0) + np.abs(params[mlp + "wo/kernel"]).sum(1)
  np.testing.assert_array_equal(np.flatnonzero(dead), stable_smallest([score], np.sum(dead)))
  np.testing.assert_array_equal(pruned[attn + "query/kernel"], params[attn + "query/kernel"])


# The cubic schedule, step by step.

MATRICES = {"a": {"kernel": (16, 24)}, "b": {"kernel": (36, 8)}, "c": {"bias": (8,)}}


def jit_step(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def zhu_gupta(t, final, initial, t0, dt, n):
  """s_t of Zhu & Gupta (2017), Eq. 1, held constant between the updates at t0 + i dt."""
  if t < t0:
    return 0.0
  i = min((t - t0) // dt, n)  # the last update at or before t
  return final + (initial - final) * (1 - i * dt / (n * dt)) ** 3


def test_cubic_schedule_follows_zhu_and_gupta_at_every_step():
  final, initial, t0, dt, n = 0.8, 0.3, 5, 5, 4
  tx = prune.pruning(final, prune.cubic(start=t0, end=t0 + n * dt, every=dt, initial=initial))
  params = draw(MATRICES, seed=4)
  state = jax.jit(tx.init)(params)
  step = jit_step(tx)
  seen = set()
  for t in range(40):
    grads = draw(MATRICES, seed=100 + t, std=0.01)
    params, state = step(params, state, grads)
    s_t = zhu_gupta(t, final, initial, t0, dt, n)
    for name, x in selected(numpy_tree(params)).items():
      assert np.sum(x == 0) == n_prune(s_t, x.size), (t, name, s_t)
    seen.add(round(s_t, 6))
    assert int(state.count) == t + 1
  assert len(seen) == 6  # 0, then the updates at 5, 10, ..., 25
  assert np.all(np.asarray(params["c"]["bias"]) != 0)


# Pruned weights stay exactly zero under adamw with weight decay.


@pytest.mark.parametrize("form", ["wrapping", "chained"])
def test_pruned_weights_stay_zero_under_adamw(form):
  s, adamw = 0.75, optax.adamw(1e-2, weight_decay=0.1)
  schedule = prune.cubic(start=10, end=50, every=10)
  if form == "wrapping":
    tx = prune.pruning(s, schedule, inner=adamw)
  else:
    tx = optax.chain(adamw, prune.pruning(s, schedule))
  params = draw(MATRICES, seed=6)
  first = numpy_tree(params)
  state = jax.jit(tx.init)(params)
  step = jit_step(tx)
  zeros = {n: np.zeros(x.shape, bool) for n, x in selected(first).items()}
  for t in range(100):
    params, state = step(params, state, draw(MATRICES, seed=200 + t))
    for name, x in selected(numpy_tree(params)).items():
      now = x == 0
      assert np.all(now[zeros[name]]), (t, name)  # once pruned, exactly zero from then on
      if t > 50:
        np.testing.assert_array_equal(now, zeros[name])  # masks fixed after the schedule ends
      zeros[name] = now
  last = numpy_tree(params)
  for name, x in selected(last).items():
    assert np.sum(x == 0) == n_prune(s, x.size), name
    kept = x != 0
    assert np.all(np.abs(x[kept] - first[name.split("/")[0]]["kernel"][kept]) > 1e-3)
  assert len(prune.masks_of(state)) == 1


# N:M.


def nm_groups(x, m, axis):
  x = np.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def test_2_4_keeps_at_most_2_of_every_4_along_the_input_axis(tiny):
  _, tiny = tiny
  nm = prune.NM(2, 4)
  params = selected(numpy_tree(tiny))
  pruned = selected(numpy_tree(pruner(granularity="2:4")(tiny, None)))
  for name, x in pruned.items():
    axis = nm.axis(name)
    assert axis == (-3 if "query" in name or "key" in name or "value" in name else -2)
    nonzero = (nm_groups(x, 4, axis) != 0).sum(-1)
    assert nonzero.max() <= 2 and np.all(nonzero == 2), name  # ties: exactly 2 (none were 0)
    # The 2 smallest magnitudes of each group are pruned (ties: the earlier element first).
    mags = np.abs(nm_groups(params[name], 4, axis))
    first = np.argsort(mags, axis=-1, kind="stable")[..., :2]
    expected = np.ones(mags.shape, bool)
    np.put_along_axis(expected, first, False, axis=-1)
    np.testing.assert_array_equal(nm_groups(x, 4, axis) != 0, expected, err_msg=name)


def test_gradual_n_m_passes_through_3_4_before_2_4():
  tx = prune.pruning(None, prune.cubic(start=0, end=30, every=10), granularity="2:4")
  params = draw(MATRICES, seed=7)
  state = jax.jit(tx.init)(params)
  step = jit_step(tx)
  pruned_per_group = []
  for t in range(35):
    params, state = step(params, state, draw(MATRICES, seed=300 + t, std=0.01))
    counts = set()
    for name, x in selected(numpy_tree(params)).items():
      counts |= set(np.unique((nm_groups(x, 4, -2) == 0).sum(-1)).tolist())
    assert len(counts) == 1, (t, counts)  # every group of every matrix alike
    pruned_per_group.append(counts.pop())
  # cubic: s = 0, 0.352, 0.481, 0.5 at steps 0, 10, 20, 30: floor(4 s) = 0, 1, 1, 2 pruned.
  assert pruned_per_group == [0] * 10 + [1] * 20 + [2] * 5


# Exact global selection under sharding: local counts and all-reduces, no gather.


def test_global_threshold_on_8_devices_equals_one_device_top_k():
  assert jax.device_count() == 8
  model, _ = tiny_shapes()
  mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
  rules = parallel.get_rules("fsdp_tp")
  # The shardings init_sharded gives, filled with tied values drawn with numpy (so ties are
  # broken across shards; and the model's init need not be compiled).
  ids = np.zeros((1, 8), np.int32)
  shapes, shardings = parallel.shard_shapes(
    lambda key: model.init(key, ids)["params"], mesh, rules, jax.random.key(0)
  )
  params = jax.device_put(numpy_tree(draw(shapes, seed=17, ties=True)), shardings)
  wi = params["layers_0"]["mlp"]["wi"]["kernel"]
  assert wi.sharding.shard_shape(wi.shape) == (32, 256)  # embed over fsdp, mlp over tensor
  s = 0.7
  tx = prune.pruning(s, distribution="global", select=TABLES, inner=optax.set_to_zero())

  @jax.jit
  def masks(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return prune.masks_of(tx.update(zeros, tx.init(params), params)[1])[0]

  hlo = masks.lower(params).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo  # counts are reduced, scores stay put
  out = masks(params)
  for name, m in selected(out, TABLES).items():  # the masks are sharded like the weights
    w = leaves(params)[name]
    assert m.sharding.is_equivalent_to(w.sharding, w.ndim), name
  kept = selected(numpy_tree(out), TABLES)
  weights = selected(numpy_tree(params), TABLES)
  assert list(kept) == list(weights) and len(kept) == 14
  total = sum(x.size for x in weights.values())
  pruned = np.flatnonzero(~np.concatenate([m.ravel() for m in kept.values()]))
  assert len(pruned) == n_prune(s, total)
  reference = stable_smallest([np.abs(x) for x in weights.values()], len(pruned))
  np.testing.assert_array_equal(pruned, reference)


# Inside optax wrappers and next to QAT.


def run_steps(tx, params, n, seed=400, nan_at=None):
  step = jit_step(tx)
  state = jax.jit(tx.init)(params)
  history = [numpy_tree(params)]
  for t in range(n):
    grads = jax.tree.map(np.array, draw(jax.tree.map(np.shape, params), seed=seed + t))
    if t == nan_at:
      grads["a"]["kernel"][0, 0] = np.nan
    params, state = step(params, state, jax.tree.map(f32, grads))
    history.append(numpy_tree(params))
  return params, state, history


# One matrix each (every pruned matrix adds a selection to compile).
MATRIX = {"a": {"kernel": (16, 24)}, "c": {"bias": (8,)}}
MATRIX_QAT = {"a": {"kernel": (32, 16), "QuantDot_0": {"w_step": (1, 16)}}, "c": {"bias": (8,)}}


def check_sparsity(params, state, s):
  kernels = selected(numpy_tree(params))
  for name, x in kernels.items():
    assert np.sum(x == 0) == n_prune(s, x.size), name
  (masks,) = prune.masks_of(state)
  masks = selected(numpy_tree(masks))
  assert list(masks) == list(kernels)
  for name, x in kernels.items():
    np.testing.assert_array_equal(masks[name], x != 0, err_msg=name)


def test_multi_steps_prunes_on_the_real_steps():
  s = 0.6
  inner = prune.pruning(s, prune.cubic(start=0, end=4, every=2), inner=optax.adamw(1e-2))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params, state, history = run_steps(tx, draw(MATRIX, seed=8), 12)
  for t in range(0, 12, 2):  # odd micro-steps only accumulate
    jax.tree.map(np.testing.assert_array_equal, history[t], history[t + 1])
    assert np.all(history[t + 2]["a"]["kernel"][history[t]["a"]["kernel"] == 0] == 0)
  check_sparsity(params, state, s)
  assert int(state.inner_opt_state.count) == 6


def test_inject_hyperparams_sets_the_sparsity_at_run_time():
  def make(learning_rate, sparsity):
    return prune.pruning(sparsity, prune.periodic(every=1), inner=optax.adamw(learning_rate))

  tx = optax.inject_hyperparams(make)(learning_rate=1e-2, sparsity=0.5)
  step = jit_step(tx)
  params = draw(MATRIX, seed=9)
  state = jax.jit(tx.init)(params)
  for s in (0.5, 0.8, 0.3):
    state.hyperparams["sparsity"] = f32(s)
    for t in range(3):
      params, state = step(params, state, draw(MATRIX, seed=500 + t))
    check_sparsity(params, state, s)


def test_apply_if_finite_skips_a_nan_step_and_keeps_the_masks():
  s = 0.6
  inner = prune.pruning(s, prune.cubic(start=0, end=4, every=2), inner=optax.adamw(1e-2))
  tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
  params, state, history = run_steps(tx, draw(MATRIX, seed=10), 10, nan_at=3)
  jax.tree.map(np.testing.assert_array_equal, history[3], history[4])  # the NaN step is skipped
  for before, after in zip(history[1:], history[2:]):
    for name, x in selected(before).items():
      assert np.all(selected(after)[name][x == 0] == 0), name
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
  assert int(state.total_notfinite) == 1 and int(state.inner_state.count) == 9
  check_sparsity(params, state, s)


def test_pruning_after_qat_transforms_keeps_zeros_on_the_int8_grid():
  s = 0.5
  tx = optax.chain(
    quant.split_optimizer(optax.adamw(1e-2), optax.adam(1e-3)),
    quant.keep_on_grid(8),
    prune.pruning(s, prune.cubic(start=0, end=4, every=2)),
  )
  start = draw(MATRIX_QAT, seed=11)
  params, state, history = run_steps(tx, start, 8)
  check_sparsity(params, state, s)
  for name, w in selected(numpy_tree(params)).items():
    codes = w / (np.abs(w).max() / 127)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=name)
    assert np.all(codes[w == 0] == 0) and len(np.unique(np.round(codes))) > 50
  step = np.asarray(params["a"]["QuantDot_0"]["w_step"])
  assert np.all(step != np.asarray(start["a"]["QuantDot_0"]["w_step"]))  # adam moves the steps


# Sparse export.


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("sparse")
  model, tied = tiny
  params = draw(jax.tree.map(lambda x: x.shape, tied), seed=12, std=0.02)
  pruned = pruner(select=TABLES)(params, 0.9)  # prune.one_shot_prune(params, 0.9, select=TABLES)
  prune.save(root / "sparse", pruned)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(root / "dense", params)
  return model, params, pruned, root


def test_sparse_checkpoint_is_small_and_loads_back_exactly(exported):
  model, params, pruned, root = exported
  sparse, dense = prune.disk_bytes(root / "sparse"), prune.disk_bytes(root / "dense")
  assert sparse <= 0.25 * dense, sparse / dense  # bitmask + values: 13.1% of float32
  rep = prune.report(pruned, select=r"kernel$|embedding$")
  assert abs(rep["selected"]["sparsity"] - 0.9) < 1e-4
  loaded = prune.load(root / "sparse")
  assert jax.tree.structure(loaded) == jax.tree.structure(pruned)
  for name, x in leaves(numpy_tree(pruned)).items():
    y = leaves(loaded)[name]
    assert y.dtype == x.dtype and y.shape == x.shape, name
    np.testing.assert_array_equal(y, x, err_msg=name)
  with open(root / "sparse" / "sparse.json") as f:
    formats = {name: info["format"] for name, info in json.load(f).items()}
  assert set(formats.values()) == {"bitmask"} and len(formats) == 8  # biases and norms: dense
  apply = jax.jit(model.apply)
  ids = jax.device_put(np.random.RandomState(0).randint(0, 264, (2, 16)).astype(np.int32))
  logits, loaded_logits = apply({"params": pruned}, ids), apply({"params": loaded}, ids)
  np.testing.assert_array_equal(loaded_logits, logits)
  assert np.abs(logits).max() > 0


def payload(directory):
  """Bytes of the arrays a checkpoint holds (on disk, orbax adds metadata and compresses)."""
  with ocp.StandardCheckpointer() as ckpt:
    arrays = ckpt.restore(directory / "arrays")
  return sum(np.asarray(x).nbytes for x in arrays.values())


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8)])
def test_n_m_checkpoint_round_trips_and_is_no_larger_than_the_bitmask(exported, n, m, tmp_path):
  _, params, _, _ = exported
  pruned = numpy_tree(pruner(granularity=f"{n}:{m}")(params, None))
  prune.save(tmp_path / "nm", pruned, nm=prune.NM(n, m))
  prune.save(tmp_path / "bitmask", pruned)
  loaded = prune.load(tmp_path / "nm")
  assert jax.tree.structure(loaded) == jax.tree.structure(pruned)
  for name, x in leaves(pruned).items():
    np.testing.assert_array_equal(leaves(loaded)[name], x, err_msg=name)
  with open(tmp_path / "nm" / "sparse.json") as f:
    formats = {name: info["format"] for name, info in json.load(f).items()}
  kernels = selected(pruned)
  assert sorted(formats) == sorted(kernels)  # the rest (tables, biases, norms) is dense
  # Bitmask: n values + m bits per group; N:M: n values + the number of the group's
  # n-of-m pattern in ceil(log2 C(m, n)) bits (2:4: 3 bits, 2:8: 5 bits).
  bits = (math.comb(m, n) - 1).bit_length()
  saving = sum(x.size // 8 - math.ceil(x.size // m * bits / 8) for x in kernels.values())
  assert payload(tmp_path / "bitmask") - payload(tmp_path / "nm") == saving
  assert saving > 0 and set(formats.values()) == {"nm"}


# The report.


def test_report_counts_match_numpy():
  rng = np.random.RandomState(13)
  tree = {
    "a": {"kernel": rng.normal(size=(6, 5)) * (rng.rand(6, 5) < 0.3), "bias": np.zeros(5)},
    "b": {"kernel": rng.normal(size=(4, 2, 3)) * (rng.rand(4, 2, 3) < 0.8)},
    "c": {"embedding": np.where(rng.rand(7, 2) < 0.5, 0.0, 1.0), "scale": np.ones(2)},
  }
  tree = jax.tree.map(f32, tree)
  flat = leaves(numpy_tree(tree))
  rep = prune.report(tree)
  assert list(rep["layers"]) == ["a/kernel", "b/kernel"]
  for name, r in rep["layers"].items():
    x = flat[name]
    assert r["shape"] == list(x.shape) and r["size"] == x.size, name
    assert r["nonzero"] == np.count_nonzero(x) and r["sparsity"] == pytest.approx(np.mean(x == 0))
  sel = [flat["a/kernel"], flat["b/kernel"]]
  assert rep["selected"]["nonzero"] == sum(np.count_nonzero(x) for x in sel)
  assert rep["selected"]["size"] == 30 + 24
  assert rep["selected"]["sparsity"] == pytest.approx(sum(np.sum(x == 0) for x in sel) / 54)
  assert rep["all"]["size"] == sum(x.size for x in flat.values())
  assert rep["all"]["nonzero"] == sum(np.count_nonzero(x) for x in flat.values())
  assert rep["all"]["sparsity"] == pytest.approx(
    sum(np.sum(x == 0) for x in flat.values()) / rep["all"]["size"]
  )
  rep = prune.report(tree, select=r"kernel$|embedding$", exclude=r"^b/")
  assert list(rep["layers"]) == ["a/kernel", "c/embedding"]
  text = prune.format_report(rep)
  assert "c/embedding" in text and f"{rep['selected']['sparsity']:.4f}" in text


# Scores.


def test_movement_accumulates_minus_gradient_times_weight():
  s, steps = 0.5, 6
  w = np.array([[0.1, 1.0], [-0.5, 0.3]], np.float32)  # 0.1 moves away from 0, 1.0 towards it
  params = {"l": {"kernel": f32(w)}}
  rng = np.random.RandomState(14)
  grads = [rng.normal(size=(2, 2)).astype(np.float32) * 0.1 for _ in range(steps)]
  for g in grads:
    g[0, 0], g[0, 1] = -abs(g[0, 0]) - 0.1, abs(g[0, 1]) + 0.1  # -g*w: > 0 for 0.1, < 0 for 1.0
  results = {}
  for score in ("movement", "magnitude"):
    tx = prune.pruning(s, prune.one_shot(at=steps - 1), inner=optax.sgd(0.0), score=score)
    step = jit_step(tx)
    p, state = params, tx.init(params)
    for g in grads:
      p, state = step(p, state, {"l": {"kernel": f32(g)}})
    results[score] = np.asarray(p["l"]["kernel"]), state
  pruned, state = results["movement"]
  expected = -sum(grads) * w
  np.testing.assert_allclose(state.scores["l"]["kernel"], expected, rtol=1e-5)
  np.testing.assert_array_equal(
    pruned == 0, np.isin(np.arange(4), stable_smallest([expected], 2)).reshape(2, 2)
  )
  assert pruned[0, 0] == w[0, 0] and pruned[0, 1] == 0  # 0.1 survives over 1.0
  magnitude = results["magnitude"][0]
  assert magnitude[0, 0] == 0 and magnitude[0, 1] == w[0, 1]  # by magnitude it is the reverse


def test_random_scores_prune_the_target_count():
  params = draw(MATRICES, seed=15)
  tx = prune.pruning(0.3, score="random", inner=optax.sgd(0.0))
  new, state = jit_step(tx)(params, jax.jit(tx.init)(params), draw(MATRICES, seed=16))
  old = numpy_tree(params)
  for name, x in selected(numpy_tree(new)).items():
    w = np.abs(old[name.split("/")[0]]["kernel"])
    zero = x == 0
    assert np.sum(zero) == n_prune(0.3, x.size), name
    # Unrelated to magnitude: pruned and kept weights are alike (magnitude: 0.18 vs 1.1).
    assert abs(w[zero].mean() - w[~zero].mean()) < 0.3, name
    assert np.sum(zero.ravel()[stable_smallest([w], np.sum(zero))]) < 0.6 * np.sum(zero), name


# Bad input.


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_rejected(s):
  with pytest.raises(ValueError, match=r"sparsity=.* must lie in \[0, 1\)"):
    prune.pruning(s)


@functools.cache
def tiny_params():
  return tiny_shapes(n_layers=1)[1]


def init(tx):
  return lambda: jax.eval_shape(tx.init, tiny_params())


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: prune.pruning(granularity="5:4"), r"N:M = 5:4: need 1 <= N <= M"),
    (
      init(prune.pruning(granularity="2:3")),
      r"N:M 2:3 on layers_0/attn/key/kernel \(128, 4, 32\): M=3 does not divide its axis -3",
    ),
    (init(prune.pruning(0.5, select="nothing_matches")), r"'nothing_matches'.* no parameter"),
    (lambda: prune.cubic(start=10, end=5, every=1), r"ends \(end=5\) before it starts"),
    (lambda: prune.cubic(start=0, end=10, every=3), r"end - start = 10 is not a multiple of"),
    (lambda: prune.pruning(0.5, score="movement"), r"score reads the gradients: wrap"),
    (lambda: prune.pruning(0.5, granularity="diagonal"), r"granularity 'diagonal': use"),
    (
      lambda: prune.pruning(0.5, granularity="heads", distribution="erk"),
      r"distribution='erk' sets per-matrix sparsities",
    ),
    (lambda: prune.pruning(0.5, distribution="layerwise"), r"distribution='layerwise'"),
    (lambda: prune.pruning(0.9, granularity="2:4"), r"sparsity=0.9 contradicts N:M 2:4"),
    (lambda: prune.pruning(0.5, score="taylor"), r"score='taylor'"),
    (lambda: prune.pruning(), r"needs a target sparsity"),
  ],
  ids=[
    "N>M",
    "M-does-not-divide",
    "no-parameter",
    "end<start",
    "not-a-multiple",
    "movement-chained",
    "granularity",
    "erk-heads",
    "distribution",
    "nm-sparsity",
    "score",
    "no-sparsity",
  ],
)
def test_invalid_arguments_are_rejected(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_n_m_that_divides_every_axis_is_accepted():
  state = jax.eval_shape(prune.pruning(granularity="2:4").init, tiny_params())
  masks = selected(state.masks)
  assert len(masks) == 6 and all(m.dtype == jnp.bool_ for m in masks.values())


# Edge cases: a cubic schedule of one update, NaN scores.


def test_cubic_ending_where_it_starts_prunes_to_the_target_at_that_step():
  schedule = prune.cubic(start=5, end=5, every=1)  # accepted: end >= start
  assert [bool(schedule.is_update(t)) for t in (4, 5, 6)] == [False, True, False]
  got = [float(schedule.sparsity(t, 0.8)) for t in (4, 5, 6, 100)]
  np.testing.assert_allclose(got, [0.0, 0.8, 0.8, 0.8], rtol=1e-6)


def test_order_key_ranks_every_nan_above_inf():
  x = f32([np.inf, np.nan, -np.nan, 0.0]) / f32([1, 1, 1, 0])  # 0 / 0 is -nan on x86
  keys = np.asarray(prune.order_key(x))
  assert np.all(keys[1:] > keys[0])


@pytest.mark.parametrize(
  "granularity, distribution",
  [("unstructured", "uniform"), ("unstructured", "erk"), ("heads", "uniform")],
)
def test_scanned_layers_are_pruned_layer_by_layer_as_unscanned(granularity, distribution):
  """A scanned stack (axis 0 = layer) gets the same masks as the same weights unscanned:
  uniform and ERK sparsity hold per layer, not over the stack."""
  _, shapes = tiny_shapes()
  params = draw(shapes, seed=5)
  scanned = {k: v for k, v in params.items() if not k.startswith("layers_")}
  scanned["layers"] = jax.tree.map(
    lambda a, b: np.stack([a, b]), params["layers_0"], params["layers_1"]
  )
  kw = dict(granularity=granularity, distribution=distribution)
  flat = numpy_tree(pruner(**kw)(params, 0.5))
  stacked = numpy_tree(pruner(**kw)(scanned, 0.5))
  for i in range(2):
    for name, x in leaves(flat[f"layers_{i}"]).items():
      np.testing.assert_array_equal(leaves(stacked["layers"])[name][i], x, err_msg=name)
