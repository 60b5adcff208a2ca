"""compress.oneshot.gptq against a plain float64 numpy GPTQ (the paper's Algorithm 1 without lazy
batches, per input with the full U, act-order and dead inputs as the reference code), its grid,
block-size and jit invariance, its gain over round-to-nearest, and its input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.oneshot.gptq import gptq, rtn

N_IN, N_OUT = 16, 8


def reference_gptq(w, h, scale, bits, group_of=None, damp=0.01, act_order=False):
  """GPTQ as in the reference `fasterquant`, kernels [in, out], one input at a time."""
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  n = w.shape[0]
  group_of = np.zeros(n, int) if group_of is None else np.asarray(group_of)
  qmax = 2 ** (bits - 1) - 1
  dead = np.flatnonzero(np.diag(h) == 0)
  h[dead, dead] = 1
  w[dead] = 0
  perm = np.arange(n)
  if act_order:
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h, group_of = w[perm], h[perm][:, perm], group_of[perm]
  h += damp * np.mean(np.diag(h)) * np.eye(n)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, U^T U = H^-1
  q = np.zeros_like(w)
  for i in range(n):
    s = scale[group_of[i]]
    q[i] = s * np.clip(np.round(w[i] / s), -qmax, qmax)
    err = (w[i] - q[i]) / u[i, i]
    w[i:] -= u[i, i:, None] * err[None, :]
  return q[np.argsort(perm)]


def layer(seed, n_in=N_IN, n_out=N_OUT, tokens=256, outliers=0, dead=0):
  """(X [tokens, in] correlated, with `outliers` channels x20 and `dead` all-zero ones, W)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, n_in)) @ (np.eye(n_in) + rng.normal(size=(n_in, n_in)) / 2)
  x[:, rng.permutation(n_in)[:outliers]] *= 20
  x[:, rng.permutation(n_in)[:dead]] = 0
  return x, rng.normal(size=(n_in, n_out))


def absmax_scale(w, bits, group_of=None, n_groups=1):
  """[n_groups, out]: each group's max |w| over its inputs / qmax."""
  group_of = np.zeros(len(w), int) if group_of is None else group_of
  amax = np.stack([np.abs(w[group_of == g]).max(0) for g in range(n_groups)])
  return amax / (2 ** (bits - 1) - 1)


def strided_groups(n_in, n_groups, seed=0):
  """A non-contiguous group layout: ids shuffled over the inputs."""
  return np.random.default_rng(seed).permutation(np.arange(n_in) % n_groups)


CASES = {  # name: (groups, act_order, dead inputs, block)
  "per_channel": (None, False, 0, 4),
  "partial_block": (None, False, 0, 5),
  "groups": (4, False, 0, 8),
  "act_order": (None, True, 0, 5),
  "dead": (None, False, 3, 16),
  "groups_act_order_dead": (4, True, 2, 3),
  "block_over_in": (2, True, 0, 64),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_float64_reference(name):
  n_groups, act_order, n_dead, block = CASES[name]
  x, w = layer(seed=len(name), outliers=2, dead=n_dead)
  h = x.T @ x
  group_of = None if n_groups is None else strided_groups(N_IN, n_groups)
  scale = absmax_scale(w, 3, group_of, n_groups or 1)
  want = reference_gptq(w, h, scale, 3, group_of, act_order=act_order)
  with jax.enable_x64(True):
    got = gptq(w, h, scale, 3, group_of, block=block, act_order=act_order)
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
  if n_dead:
    assert np.all(got[np.diag(h) == 0] == 0)
  assert not np.allclose(got, rtn(w, scale, 3, group_of))  # the updates do change the result


def test_block_size_invariance():
  x, w = layer(seed=1, outliers=2, dead=1)
  group_of = strided_groups(N_IN, 4)
  scale = absmax_scale(w, 4, group_of, 4)
  with jax.enable_x64(True):
    small = gptq(w, x.T @ x, scale, 4, group_of, block=4, act_order=True)
    whole = gptq(w, x.T @ x, scale, 4, group_of, block=N_IN, act_order=True)
  np.testing.assert_allclose(small, whole, rtol=1e-10)


def test_jit_equals_no_jit():
  x, w = layer(seed=2, outliers=2)
  x, w = x.astype(np.float32), w.astype(np.float32)
  group_of = strided_groups(N_IN, 2)
  scale = absmax_scale(w, 4, group_of, 2).astype(np.float32)
  args = (w, x.T @ x, scale, 4, group_of)
  jitted = jax.jit(gptq, static_argnames=("bits", "block", "act_order"))(
    *args, block=6, act_order=True
  )
  with jax.disable_jit():
    eager = gptq(*args, block=6, act_order=True)
  assert jitted.dtype == eager.dtype == jnp.float32
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_values_on_grid(bits):
  x, w = layer(seed=bits, outliers=2)
  group_of = strided_groups(N_IN, 4)
  scale = absmax_scale(w, bits, group_of, 4) * 0.7  # some weights clip
  qmax = 2 ** (bits - 1) - 1
  for w_hat in (
    gptq(w, x.T @ x, scale, bits, group_of, act_order=True),
    rtn(w, scale, bits, group_of),
  ):
    assert w_hat.dtype == jnp.float32
    q = np.asarray(w_hat, np.float64) / scale[group_of]
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)
    assert np.abs(np.round(q)).max() == qmax  # the clipped ones sit at the edge, none beyond
  np.testing.assert_allclose(
    rtn(w, scale, bits, group_of),
    scale[group_of] * np.clip(np.round(w / scale[group_of]), -qmax, qmax),
    rtol=1e-6,
  )


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_output_error_than_rtn(bits, act_order):
  """The paper's claim on a layer with correlated inputs and 4 outlier channels (x20)."""
  x, w = layer(seed=0, n_in=64, n_out=32, tokens=1024, outliers=4)
  x, w = x.astype(np.float32), w.astype(np.float32)
  scale = absmax_scale(w, bits)

  def out_error(w_hat):
    return np.linalg.norm(x.astype(np.float64) @ (w - np.asarray(w_hat, np.float64)))

  ratio = out_error(gptq(w, x.T @ x, scale, bits, act_order=act_order)) / out_error(
    rtn(w, scale, bits)
  )
  assert ratio < 0.9, ratio


def _good():
  x, w = layer(seed=3)
  return w, x.T @ x, absmax_scale(w, 4, strided_groups(N_IN, 2), 2), strided_groups(N_IN, 2)


@pytest.mark.parametrize(
  "change, match",
  [
    ({"bits": 1}, "bits=1"),
    ({"bits": 9}, "bits=9"),
    ({"scale": np.ones(N_OUT)}, r"scale_GxO has shape \(8,\)"),
    ({"scale": np.ones((2, N_OUT + 1))}, r"scale_GxO has shape \(2, 9\)"),
    ({"group_of": None}, r"scale_GxO has shape \(2, 8\).*\(1, 8\)"),
    ({"group_of": np.zeros(N_IN - 1, int)}, r"group_of_I has shape \(15,\).*\(16,\)"),
    ({"group_of": np.full(N_IN, 2)}, r"ids in \[2, 2\].*\[0, 1\]"),
    ({"group_of": np.full(N_IN, -1)}, r"ids in \[-1, -1\].*\[0, 1\]"),
    ({"group_of": np.zeros(N_IN)}, "integer group ids"),
    ({"scale": np.zeros((2, N_OUT))}, r"scale_GxO\[0, 0\] = 0.0.*positive"),
    ({"scale": -np.ones((2, N_OUT))}, r"scale_GxO\[0, 0\] = -1.0.*positive"),
  ],
)
def test_bad_input(change, match, no_compile):
  w, h, scale, group_of = _good()
  kw = {"bits": 4, "scale": scale, "group_of": group_of} | change
  with pytest.raises(ValueError, match=match):
    rtn(w, kw["scale"], kw["bits"], kw["group_of"])
  with pytest.raises(ValueError, match=match):
    gptq(w, h, kw["scale"], kw["bits"], kw["group_of"])


def test_bad_hessian_or_block(no_compile):
  w, h, scale, group_of = _good()
  with pytest.raises(ValueError, match=r"Hessian has shape \(15, 15\).*\(16, 16\)"):
    gptq(w, h[1:, 1:], scale, 4, group_of)
  with pytest.raises(ValueError, match="block=0"):
    gptq(w, h, scale, 4, group_of, block=0)
