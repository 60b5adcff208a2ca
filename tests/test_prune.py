"""Properties of compress.prune's selection: exact top-k (ties, weights, sharded), the
sparsity each granularity and distribution reaches, N:M, scanned stacks and input errors.
Optimizers and optax wrappers: tests/test_prune_optax.py; export and report:
tests/test_prune_export.py.

Arrays are drawn with numpy (jax's RNG is slow to compile on CPU); each case compiles one jitted
function, reused across sparsities by passing the sparsity traced.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import parallel
from compress import prune

from prune_helpers import (
  HEADS,
  MATRICES,
  NEURONS,
  SCANNED,
  SELECT,
  TABLES,
  draw,
  f32,
  jit_step,
  leaves,
  n_m,
  n_prune,
  numpy_tree,
  pruner,
  selected,
  stable_smallest,
  tiny_shapes,
)


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
  pruned = selected(numpy_tree(pruner(granularity=HEADS)(tiny, 0.5)))
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

  pruned = selected(numpy_tree(pruner(granularity=NEURONS)(tiny, 0.3)))
  wi, wo = pruned[mlp + "wi/kernel"], pruned[mlp + "wo/kernel"]
  dead = (wi == 0).all(axis=0)
  np.testing.assert_array_equal(dead, (wo == 0).all(axis=1))
  np.testing.assert_array_equal(~dead, (wi != 0).all(axis=0))
  np.testing.assert_array_equal(~dead, (wo != 0).all(axis=1))
  assert np.sum(dead) == n_prune(0.3, 512)
  score = np.abs(params[mlp + "wi/kernel"]).sum(0) + np.abs(params[mlp + "wo/kernel"]).sum(1)
  np.testing.assert_array_equal(np.flatnonzero(dead), stable_smallest([score], np.sum(dead)))
  np.testing.assert_array_equal(pruned[attn + "query/kernel"], params[attn + "query/kernel"])


# N:M.


def nm_groups(x, m, axis):
  x = np.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def test_2_4_keeps_at_most_2_of_every_4_along_the_input_axis(tiny):
  _, tiny = tiny
  nm = n_m("2:4")
  params = selected(numpy_tree(tiny))
  pruned = selected(numpy_tree(pruner(granularity=nm, **SELECT)(tiny, None)))
  for name, x in pruned.items():
    axis = nm.axis(name, x.ndim)
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
      init(prune.pruning(granularity=n_m("2:3"), **SELECT)),
      r"N:M 2:3 on layers_0/attn/key/kernel \(128, 4, 32\): M=3 does not divide its axis -3",
    ),
    (
      init(prune.pruning(granularity="2:4", **SELECT)),
      r"N:M 2:4 on layers_0/attn/key/kernel \(128, 4, 32\): which axis is its input\?",
    ),
    (init(prune.pruning(0.5, select="nothing_matches")), r"'nothing_matches'.* no parameter"),
    (lambda: prune.cubic(start=10, end=5, every=1), r"ends \(end=5\) before it starts"),
    (lambda: prune.cubic(start=0, end=10, every=3), r"end - start = 10 is not a multiple of"),
    (lambda: prune.pruning(0.5, score="movement"), r"score reads the gradients: wrap"),
    (lambda: prune.pruning(0.5, granularity="diagonal"), r"granularity 'diagonal': use"),
    (lambda: prune.pruning(0.5, granularity="heads"), r"'heads' needs the model's heads rules"),
    (lambda: prune.parse_granularity("neurons"), r"prune.parse_granularity\('neurons', neuro"),
    (
      lambda: prune.pruning(0.5, granularity=HEADS, distribution="erk"),
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
    "N:M-without-axes",
    "no-parameter",
    "end<start",
    "not-a-multiple",
    "movement-chained",
    "granularity",
    "heads-without-rules",
    "neurons-without-rules",
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
  state = jax.eval_shape(prune.pruning(granularity=n_m("2:4"), **SELECT).init, tiny_params())
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
  kw = dict(granularity=HEADS if granularity == "heads" else granularity)
  flat = numpy_tree(pruner(**kw, **SELECT, distribution=distribution)(params, 0.5))
  stacked = numpy_tree(pruner(**kw, **SCANNED, distribution=distribution)(scanned, 0.5))
  for i in range(2):
    for name, x in leaves(flat[f"layers_{i}"]).items():
      np.testing.assert_array_equal(leaves(stacked["layers"])[name][i], x, err_msg=name)
