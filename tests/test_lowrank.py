"""Low-rank factorization: the Eckart-Young optimum, exact full rank, energy and budget ranks
(against brute force), tree round trips, zero-padded stacks, counts, and the errors."""

import itertools
import math

import jax
import numpy as np
import pytest

from compress import lowrank


def _gaussian(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _frobenius(x):
  return float(np.sqrt(np.sum(np.square(np.asarray(x, np.float64)))))


# (shape, n_in, stacked): [E, F]; query [E, H, D]; attention out [H, D, E]; a stack [L, E, F].
KERNELS = [((6, 5), 1, False), ((6, 2, 3), 1, False), ((2, 3, 4), 2, False), ((3, 6, 5), 1, True)]


@pytest.mark.parametrize("shape,n_in,stacked", KERNELS)
def test_factorize_reaches_eckart_young(shape, n_in, stacked):
  w = _gaussian(shape)
  lead = int(stacked)
  in_shape, out_shape = shape[lead : lead + n_in], shape[lead + n_in :]
  w_LxMxN = w.astype(np.float64).reshape(
    (shape[0] if stacked else 1, math.prod(in_shape), math.prod(out_shape))
  )
  s_LxK = np.linalg.svd(w_LxMxN, compute_uv=False)
  for r in range(1, s_LxK.shape[1]):
    u, v = lowrank.factorize(w, r, n_in, stacked)
    assert u.shape == shape[:lead] + in_shape + (r,)
    assert v.shape == shape[:lead] + (r,) + out_shape
    err = _frobenius(np.asarray(lowrank.reconstruct(u, v, stacked)) - w)
    np.testing.assert_allclose(err, np.sqrt(np.sum(s_LxK[:, r:] ** 2)), rtol=1e-5)
    # Per layer too: each layer of a stack is factorized on its own.
    if stacked:
      for layer in range(shape[0]):
        w_hat = lowrank.reconstruct(u[layer], v[layer])
        np.testing.assert_allclose(
          _frobenius(np.asarray(w_hat) - w[layer]), np.sqrt(np.sum(s_LxK[layer, r:] ** 2)), 1e-5
        )


@pytest.mark.parametrize("shape,n_in,stacked", KERNELS)
def test_full_rank_is_exact(shape, n_in, stacked):
  w = _gaussian(shape, seed=1)
  k = lowrank.spectrum(w, n_in, stacked).shape[-1]
  u, v = lowrank.factorize(w, k, n_in, stacked)
  np.testing.assert_allclose(lowrank.reconstruct(u, v, stacked), w, rtol=0, atol=1e-5)


def test_factors_split_the_singular_values_evenly():
  w = _gaussian((7, 4), seed=2)
  u, v = lowrank.factorize(w, 3, 1)
  s = np.linalg.svd(w.astype(np.float64), compute_uv=False)[:3]
  # u = U sqrt(S), v = sqrt(S) V^T: both have column / row norms sqrt(s).
  np.testing.assert_allclose(np.linalg.norm(np.asarray(u), axis=0), np.sqrt(s), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), np.sqrt(s), rtol=1e-5)


def test_jit_agrees_with_eager():
  w = _gaussian((8, 6), seed=3)
  eager = lowrank.reconstruct(*lowrank.factorize(w, 3, 1))
  jitted = jax.jit(lambda w: lowrank.reconstruct(*lowrank.factorize(w, 3, 1)))(w)
  np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-5)


def test_stack_pads_smaller_ranks_with_zeros():
  w = _gaussian((3, 6, 5), seed=4)
  ranks = [1, 4, 2]
  u, v = lowrank.factorize(w, ranks, 1, stacked=True)
  assert u.shape == (3, 6, 4) and v.shape == (3, 4, 5)
  for layer, r in enumerate(ranks):
    assert not np.any(np.asarray(u[layer, :, r:])) and not np.any(np.asarray(v[layer, r:]))
    u_l, v_l = lowrank.factorize(w[layer], r, 1)
    np.testing.assert_allclose(u[layer, :, :r], u_l, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
      lowrank.reconstruct(u, v, stacked=True)[layer], lowrank.reconstruct(u_l, v_l), atol=1e-6
    )


# ------------------------------------------------------------------------ ranks


def _energy(s, r):
  e = np.square(np.asarray(s, np.float64))
  return e[:r].sum() / e.sum()


def test_rank_for_energy_is_the_least_that_meets_it():
  rng = np.random.default_rng(5)
  for trial in range(20):
    s = np.sort(rng.exponential(size=rng.integers(1, 12)))[::-1]
    for energy in (1e-6, 0.3, 0.5, 0.9, 0.99, rng.uniform(), 1.0):
      r = lowrank.rank_for_energy(s, energy)
      assert 1 <= r <= len(s)
      assert _energy(s, r) >= energy
      assert r == 1 or _energy(s, r - 1) < energy
  assert lowrank.rank_for_energy(np.array([3.0, 0.0, 0.0]), 1.0) == 1
  assert lowrank.rank_for_energy(np.zeros(4), 0.5) == 1


def test_max_useful_rank():
  for rows, cols in [(4, 4), (6, 5), (1, 7), (100, 300), (2, 2)]:
    r = lowrank.max_useful_rank(rows, cols)
    assert r * (rows + cols) < rows * cols or r == 0
    assert (r + 1) * (rows + cols) >= rows * cols
  assert lowrank.max_useful_rank(4, 4) == 1 and lowrank.max_useful_rank(1, 7) == 0


def _brute_force(spectra, budget, min_rank):
  """The best energy over every combination of ranks that fits the budget."""
  keys = list(spectra)
  best = -1.0
  ranges = [range(min_rank, len(spectra[k][0]) + 1) for k in keys]
  for ranks in itertools.product(*ranges):
    cost = sum(r * (spectra[k][1] + spectra[k][2]) for k, r in zip(keys, ranks))
    if cost <= budget:
      best = max(best, sum(np.sum(np.square(spectra[k][0][:r])) for k, r in zip(keys, ranks)))
  return best


def _kept(spectra, ranks):
  return sum(np.sum(np.square(spectra[k][0][: ranks[k]])) for k in spectra)


def _cost(spectra, ranks):
  return sum(ranks[k] * (spectra[k][1] + spectra[k][2]) for k in spectra)


@pytest.mark.parametrize("min_rank", [0, 1])
def test_budget_greedy_is_optimal_for_equal_layers(min_rank):
  rng = np.random.default_rng(6)
  for trial in range(15):
    n = rng.integers(2, 4)
    spectra = {f"l{i}": (np.sort(rng.exponential(size=5))[::-1], 5, 7) for i in range(n)}
    budget = int(rng.integers(n * 12 * min_rank, n * 5 * 12 + 1))
    ranks = lowrank.ranks_for_budget(spectra, budget, min_rank=min_rank)
    assert _cost(spectra, ranks) <= budget
    assert min(ranks.values()) >= min_rank
    np.testing.assert_allclose(_kept(spectra, ranks), _brute_force(spectra, budget, min_rank))


def test_budget_greedy_within_one_component_on_random_layers():
  rng = np.random.default_rng(7)
  for trial in range(30):
    n = rng.integers(2, 4)
    spectra = {}
    for i in range(n):
      rows, cols = (int(x) for x in rng.integers(1, 6, size=2))
      spectra[("w", i)] = (np.sort(rng.exponential(size=min(rows, cols)))[::-1], rows, cols)
    need = sum(r + c for _, r, c in spectra.values())
    budget = int(rng.integers(need, sum(r * c for _, r, c in spectra.values()) + need + 1))
    ranks = lowrank.ranks_for_budget(spectra, budget)
    assert _cost(spectra, ranks) <= budget and min(ranks.values()) >= 1
    best = _brute_force(spectra, budget, 1)
    largest = max(np.max(s) ** 2 for s, _, _ in spectra.values())
    assert best - largest - 1e-9 <= _kept(spectra, ranks) <= best + 1e-9


def test_budget_prefers_energy_per_parameter():
  # Same s**2 per component, but layer "small" costs 4 a component, "big" 20: small fills first.
  spectra = {"big": (np.ones(10), 10, 10), "small": (np.ones(2), 2, 2)}
  assert lowrank.ranks_for_budget(spectra, 20 + 8 + 20) == {"big": 2, "small": 2}
  assert lowrank.ranks_for_budget(spectra, 20 + 8 + 19) == {"big": 1, "small": 2}


# ------------------------------------------------------------------------ trees


def _tree(seed=0):
  """An unscanned two-layer tree: query [E, H, D], out [H, D, E], wi [E, F], plus non-kernels."""
  E, H, D, F = 8, 2, 3, 12
  layer = lambda i: {  # noqa: E731
    "attn": {
      "query": {"kernel": _gaussian((E, H, D), seed + 10 * i)},
      "out": {"kernel": _gaussian((H, D, E), seed + 10 * i + 1)},
    },
    "mlp": {
      "wi": {"kernel": _gaussian((E, F), seed + 10 * i + 2), "bias": np.zeros(F, np.float32)},
    },
    "norm": {"scale": np.ones(E, np.float32)},
  }
  return {"layers_0": layer(0), "layers_1": layer(1), "embed": {"embedding": _gaussian((5, E))}}


def _scanned_tree(seed=0):
  L, E, F = 3, 8, 12
  return {
    "layers": {
      "mlp": {"wi": {"kernel": _gaussian((L, E, F), seed)}, "bias": np.zeros((L, F), np.float32)}
    },
    "head": {"kernel": _gaussian((E, 5), seed + 1)},
  }


N_IN = ((r"attn/out/kernel$", 2),)


def test_plan_fixed_rank_and_counts_by_hand():
  params = _tree()
  choices = lowrank.plan(params, r"(mlp/wi|attn/out)/kernel$", rank=2, n_in=N_IN)
  assert set(choices) == {f"layers_{i}/{k}/kernel" for i in (0, 1) for k in ("mlp/wi", "attn/out")}
  out = choices["layers_0/attn/out/kernel"]
  assert (out.rank, out.rows, out.cols, out.n_in, out.ranks) == (2, 6, 8, 2, (2,))
  assert (out.params_before, out.params_after) == (48, 2 * (6 + 8))
  wi = choices["layers_1/mlp/wi/kernel"]
  assert (wi.rows, wi.cols, wi.params_before, wi.params_after) == (8, 12, 96, 40)
  s = lowrank.spectrum(params["layers_1"]["mlp"]["wi"]["kernel"], 1)
  np.testing.assert_allclose(wi.energy_kept, _energy(s, 2), rtol=1e-6)
  # Two layers of each: 2 * (48 + 96) before, 2 * (28 + 40) after; FLOPs twice as many.
  assert lowrank.count_params(choices) == (288, 136)
  assert lowrank.flops_per_token(choices) == (576, 272)


def test_tree_round_trip_at_full_rank():
  params = _tree(seed=3)
  choices = lowrank.plan(params, r"kernel$", energy=1.0, n_in=N_IN)
  assert all(c.rank == min(c.rows, c.cols) for c in choices.values())
  factored = lowrank.factorize_tree(params, choices)
  mlp = factored["layers_0"]["mlp"]["wi"]
  assert list(mlp) == ["kernel_u", "kernel_v", "bias"]
  assert mlp["kernel_u"].shape == (8, 8) and mlp["kernel_v"].shape == (8, 12)
  out = factored["layers_1"]["attn"]["out"]
  assert out["kernel_u"].shape == (2, 3, 6) and out["kernel_v"].shape == (6, 8)
  assert factored["embed"] is params["embed"]  # not a kernel of the selection: untouched
  merged = lowrank.merge_tree(factored)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_tree_truncated_matches_factorize():
  params = _tree(seed=4)
  choices = lowrank.plan(params, r"layers_1/attn/out/kernel$", rank=3, n_in=N_IN)
  merged = lowrank.merge_tree(lowrank.factorize_tree(params, choices))
  w = params["layers_1"]["attn"]["out"]["kernel"]
  want = lowrank.reconstruct(*lowrank.factorize(w, 3, 2))
  np.testing.assert_allclose(merged["layers_1"]["attn"]["out"]["kernel"], want, atol=1e-6)
  assert merged["layers_0"]["attn"]["out"]["kernel"] is params["layers_0"]["attn"]["out"]["kernel"]


def test_stacked_plan_pads_and_round_trips():
  params = _scanned_tree()
  w = params["layers"]["mlp"]["wi"]["kernel"]
  s_LxK = lowrank.spectrum(w, 1, stacked=True)
  choices = lowrank.plan(params, r"wi/kernel$", energy=0.8, stacked=r"^layers/")
  c = choices["layers/mlp/wi/kernel"]
  assert c.stacked and c.ranks == tuple(lowrank.rank_for_energy(s, 0.8) for s in s_LxK)
  assert c.rank == max(c.ranks) and c.params_after == 3 * c.rank * (8 + 12)
  factored = lowrank.factorize_tree(params, choices)
  assert factored["layers"]["mlp"]["wi"]["kernel_u"].shape == (3, 8, c.rank)
  merged = lowrank.merge_tree(factored, stacked=r"^layers/")
  for layer, r in enumerate(c.ranks):
    want = lowrank.reconstruct(*lowrank.factorize(w[layer], r, 1))
    np.testing.assert_allclose(merged["layers"]["mlp"]["wi"]["kernel"][layer], want, atol=1e-6)
  # At full rank the stack comes back exactly.
  full = lowrank.plan(params, r"kernel$", energy=1.0, stacked=r"^layers/")
  merged = lowrank.merge_tree(lowrank.factorize_tree(params, full), stacked=r"^layers/")
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_plan_budget_stays_within_budget():
  params = _scanned_tree(seed=5)
  for budget in (0.25, 0.5, 0.9):  # 0.25: 82 of 328 parameters, rank 1 everywhere needs 73
    choices = lowrank.plan(params, r"kernel$", budget=budget, stacked=r"^layers/")
    before, _ = lowrank.count_params(choices)
    assert before == 3 * 8 * 12 + 8 * 5
    used = sum(sum(c.ranks) * (c.rows + c.cols) for c in choices.values())  # unpadded
    assert used <= math.floor(budget * before)
    assert all(min(c.ranks) >= 1 for c in choices.values())


# ------------------------------------------------------------------------ errors


def _raises(key, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=key):
    fn(*args, **kwargs)


@pytest.mark.parametrize("rank", [0, -1, 6, 2.0, True])
def test_factorize_bad_rank(rank):
  _raises(r"lowrank\.rank", lowrank.factorize, _gaussian((6, 5)), rank, 1)


def test_bad_inputs_name_their_key():
  w, params = _gaussian((6, 5)), _tree()
  _raises(r"lowrank\.rank", lowrank.factorize, _gaussian((3, 6, 5)), [1, 2], 1, stacked=True)
  for n_in in (0, 2, 1.0):
    _raises(r"lowrank\.n_in", lowrank.factorize, w, 2, n_in)
  for energy in (-0.1, 1.5, "0.5"):
    _raises(r"lowrank\.energy", lowrank.rank_for_energy, [3.0, 1.0], energy)
  _raises(r"lowrank\.budget", lowrank.ranks_for_budget, {"a": (np.ones(3), 3, 4)}, 6)
  # plan: each key's own problem, and exactly one of rank / energy / budget.
  for kwargs in ({"rank": -2}, {"rank": 9}, {"rank": 1.5}):
    _raises(r"lowrank\.rank", lowrank.plan, params, r"mlp/wi/kernel$", **kwargs)
  for energy in (-0.5, 1.01):
    _raises(r"lowrank\.energy", lowrank.plan, params, r"kernel$", energy=energy)
  for budget in (-0.5, 1.0, 1.5, 1):
    _raises(r"lowrank\.budget", lowrank.plan, params, r"kernel$", budget=budget)
  _raises(r"exactly one", lowrank.plan, params, r"kernel$")
  _raises(r"exactly one", lowrank.plan, params, r"kernel$", rank=2, energy=0.9)
  _raises(r"exactly one", lowrank.plan, params, r"kernel$", energy=0.9, budget=0.5)
  _raises(r"lowrank\.n_in", lowrank.plan, params, r"out/kernel$", rank=1, n_in=((r"out", 3),))
  _raises(r"lowrank\.n_in", lowrank.plan, params, r"kernel$", rank=1, n_in=(r"out", 2))
  with pytest.raises(ValueError, match=r"lowrank\.select='nope' matched no kernel") as e:
    lowrank.plan(params, "nope", rank=1)
  assert "layers_0/attn/query/kernel" in str(e.value) and "bias" not in str(e.value)
  # A stacked tree's 2-D leaves are per-layer vectors, not kernels.
  with pytest.raises(ValueError, match=r"lowrank\.select"):
    lowrank.plan(_scanned_tree(), r"bias", rank=1, stacked=r"^layers/")
  # The budget cannot hold rank 1 everywhere.
  _raises(r"lowrank\.budget", lowrank.plan, params, r"kernel$", budget=0.01, n_in=N_IN)
