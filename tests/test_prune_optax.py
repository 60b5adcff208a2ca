"""compress.prune as an optax transform: the cubic schedule step by step, masks that hold
under AdamW, inside MultiSteps / inject_hyperparams / apply_if_finite and after the QAT
transforms, and the movement and random scores."""

import jax
import numpy as np
import optax
import pytest

from compress import prune, quant

from prune_helpers import (
  MATRICES,
  SELECT,
  draw,
  f32,
  jit_step,
  n_prune,
  numpy_tree,
  selected,
  stable_smallest,
)


# The cubic schedule, step by step.


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
    quant.keep_on_grid(8, select=r"kernel$"),
    prune.pruning(s, prune.cubic(start=0, end=4, every=2), **SELECT),  # not the steps
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
