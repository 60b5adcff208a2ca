"""Properties of the pure quantizers (compress/quant/quantizers.py): integer grids, 0 exact
on the asymmetric grid, error bounds, the STE, granularity, calibrators and LSQ's gradients.

They run eagerly: the bit widths share compiled ops, one jit per width would cost more.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from compress.quant import quantizers as qz


def f32(x):
  """A float32 device array (device_put: jnp.asarray would compile a conversion per shape)."""
  return jax.device_put(np.asarray(x, np.float32))


def numpy_out(f):
  """f with its outputs as numpy arrays (the tests then compute in numpy: no compiles)."""
  return functools.wraps(f)(lambda *a, **kw: jax.tree.map(np.asarray, f(*a, **kw)))


@numpy_out
def quantize_all(x, axes, symmetric, method="absmax", bits=tuple(range(2, 9))):
  """{bits: range, scale, zero, codes, fake_quant, dequantized codes} of x per group."""
  out = {}
  for b in bits:
    lo, hi = qz.calibrate(x, axes, bits=b, symmetric=symmetric, method=method, percentile=99.0)
    scale, zero = qz.scale_zero(lo, hi, b, symmetric)
    q = qz.quantize(x, scale, zero, b, symmetric)
    fake, deq = qz.fake_quant(x, scale, zero, b, symmetric), qz.dequantize(q, scale, zero)
    out[b] = dict(lo=lo, hi=hi, scale=scale, zero=zero, q=q, fake=fake, deq=deq)
  return out


def quantize_np(x, axes, symmetric, method="absmax", bits=tuple(range(2, 9))):
  """quantize_all, with the symmetric grid's zero point as zeros."""
  out = quantize_all(x, axes, symmetric, method, bits)
  for r in out.values():
    r["zero"] = np.zeros_like(r["scale"]) if r["zero"] is None else r["zero"]
  return out


def groups(x, granularity):
  """(x laid out for `granularity`, reduce axes): per tensor, per column, tiles of 4 rows."""
  if granularity == "tensor":
    return x, (0, 1)
  if granularity == "channel":
    return x, (0,)
  return qz.tile(x, 0, 4), (1,)


# The grid and calibrator tests share data shaped (64, 256), so their eager ops compile once.
SHAPE = (64, 256)


def column_data(seed=0, shape=SHAPE):
  """Columns with very different ranges, one all positive, one all negative (numpy)."""
  rng = np.random.RandomState(seed)
  x = rng.normal(size=shape) * np.geomspace(0.1, 10, shape[1])
  x[:, 0] = np.abs(x[:, 0]) + 0.5
  x[:, 1] = -np.abs(x[:, 1]) - 0.2
  return x.astype(np.float32)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "tile"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_and_fake_quant_lie_on_the_grid(granularity, symmetric):
  x, axes = groups(f32(column_data()), granularity)
  assert x.shape == ((16, 4, 256) if granularity == "tile" else SHAPE)
  for bits, r in quantize_np(x, axes, symmetric).items():
    q_min, q_max = qz.int_range(bits, symmetric)
    assert (q_min, q_max) == (-(2 ** (bits - 1)) + symmetric, 2 ** (bits - 1) - 1)
    group_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    assert r["scale"].shape == r["zero"].shape == group_shape
    assert np.all(r["scale"] > 0)
    np.testing.assert_array_equal(r["zero"], np.round(r["zero"]))
    q = r["q"]
    np.testing.assert_array_equal(q, np.round(q))
    assert q.min() >= q_min and q.max() <= q_max, bits
    if symmetric:  # absmax ranges use the whole grid
      assert np.abs(q).max() == q_max, bits
    else:
      assert (q.min(), q.max()) == (q_min, q_max), bits
    codes = r["fake"] / r["scale"] + r["zero"]  # fake_quant(x) = s (q - z)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    np.testing.assert_allclose(codes, q, atol=1e-4)
    np.testing.assert_array_equal(r["fake"], r["deq"])  # fake_quant is the dequantized codes
    assert np.abs(r["fake"] - np.asarray(x)).max() > 0  # not the identity


@numpy_out
def fake_quant_asymmetric(x, lo, hi):
  """{bits: (zero point, fake_quant(x))} on the asymmetric grid of the range [lo, hi]."""
  out = {}
  for bits in range(2, 9):
    scale, zero = qz.scale_zero(lo, hi, bits, False)
    out[bits] = zero, qz.fake_quant(x, scale, zero, bits, False)
  return out


@pytest.mark.parametrize("lo,hi", [(-0.37, 2.9), (0.5, 3.0), (-4.0, -1.25), (1e-3, 1e-3)])
def test_asymmetric_grid_represents_zero_exactly(lo, hi):
  """The range is widened to hold 0 and the zero point is an integer: 0 -> code z -> 0.0."""
  x = np.linspace(lo, hi, np.prod(SHAPE)).reshape(SHAPE)
  x[::5] = 0.0
  x = f32(x)
  per_tensor = [f32(np.full((1, 1), v)) for v in (lo, hi)]
  for bits, (zero, x_hat) in fake_quant_asymmetric(x, *per_tensor).items():
    q_min, q_max = qz.int_range(bits, False)
    assert zero == np.round(zero) and q_min <= zero <= q_max
    if lo > 0 or hi < 0:  # all positive / all negative: one end of the grid is 0
      assert zero == (q_min if lo > 0 else q_max)
    np.testing.assert_array_equal(x_hat[::5], 0.0)
    if bits == 8 and not lo < 0 < hi:  # the data are all far from 0 in steps: none is flushed
      assert np.all(x_hat[1::5] != 0)


def test_asymmetric_zero_is_exact_per_channel():
  x = column_data()
  x[::5] = 0.0  # zeros in every column; columns 0 and 1 are otherwise one-signed
  r = quantize_np(f32(x), (0,), False, bits=(2, 4, 8))
  for bits in (2, 4, 8):
    assert r[bits]["lo"][0, 0] == 0.0 and r[bits]["hi"][0, 1] == 0.0
    np.testing.assert_array_equal(r[bits]["fake"][::5], 0.0)
    np.testing.assert_array_equal(r[bits]["deq"][::5], 0.0)


def heavy_tailed(shape, seed=0):
  return np.random.RandomState(seed).standard_t(3, size=shape).astype(np.float32)


@pytest.mark.parametrize("method", qz.CALIBRATORS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_inside_the_range_is_at_most_half_a_step(method, symmetric):
  x = heavy_tailed(SHAPE)
  for bits, r in quantize_np(f32(x), (0,), symmetric, method, bits=(2, 4, 8)).items():
    q_min, q_max = qz.int_range(bits, symmetric)
    low, high = r["scale"] * (q_min - r["zero"]), r["scale"] * (q_max - r["zero"])
    inside = (x >= low) & (x <= high)
    assert inside.mean() > 0.8, (bits, inside.mean())
    err = np.abs(x - r["deq"])
    half = np.broadcast_to(r["scale"] / 2, x.shape)
    assert np.all(err[inside] <= half[inside] * (1 + 1e-5) + 1e-7), (bits, err.max())
    assert (err / half)[inside].max() > 0.8  # the bound is tight
    # Outside, a value goes to the nearest end of the grid.
    ends = np.broadcast_to(np.where(x < low, low, high), x.shape)
    np.testing.assert_allclose(r["deq"][~inside], ends[~inside], rtol=1e-6)
    if method == "absmax":  # the grid spans the data, up to the zero point's rounding
      assert np.all(err <= half * (1 + 1e-5) + 1e-7)
    elif method == "percentile":
      assert 0 < (~inside).sum() <= 0.06 * x.size  # 99th percentile: 1-3% clipped


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_gradient_is_one_inside_the_range_and_zero_outside(symmetric):
  bits, scale = 4, jnp.float32(0.25)
  zero = None if symmetric else jnp.float32(-3.0)  # asymmetric range [-1.25, 2.5]
  q_min, q_max = qz.int_range(bits, symmetric)
  z = 0.0 if symmetric else -3.0
  x = np.linspace(-3.0, 3.0, 41).astype(np.float32) + 0.013  # never on a range end

  def loss(x):
    return jnp.sum(qz.fake_quant(x, lax.stop_gradient(scale), zero, bits, symmetric))

  grad = np.asarray(jax.jit(jax.grad(loss))(f32(x)))
  inside = (x > 0.25 * (q_min - z)) & (x < 0.25 * (q_max - z))
  assert 0 < inside.sum() < x.size
  np.testing.assert_array_equal(grad, np.where(inside, 1.0, 0.0))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "tile"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_passes_the_full_gradient_to_each_groups_largest_element(granularity, symmetric, jit):
  """d/dw sum(g * fake_quant(w)) = g everywhere: absmax scaling puts each group's largest
  element on the end of its range (jnp.clip's gradient there is 0.5), a scale one ulp low
  puts it just beyond (gradient 0), and so does the asymmetric grid's rounded zero point."""
  rng = np.random.RandomState(0)
  w, axes = groups(f32(0.1 * rng.normal(size=SHAPE)), granularity)
  g = f32(rng.normal(size=w.shape))

  def grads(w, g):
    out = {}
    for bits in (3, 8):
      lo, hi = qz.calibrate(w, axes, bits=bits, symmetric=symmetric)
      scale, zero = qz.scale_zero(lo, hi, bits, symmetric)
      bounds = qz.grid_range(lo, hi, symmetric)
      for name, s in [("scale", scale), ("one ulp low", jnp.nextafter(scale, 0.0))]:
        out[bits, name] = jax.grad(
          lambda w: jnp.sum(g * qz.fake_quant(w, s, zero, bits, symmetric, *bounds))
        )(w)
        if symmetric:  # without the range: the one the scale implies
          out[bits, name, "implied"] = jax.grad(
            lambda w: jnp.sum(g * qz.fake_quant(w, s, None, bits, True))
          )(w)
        q_min, q_max = qz.int_range(bits, symmetric)
        z = 0.0 if zero is None else zero
        out[bits, name, "past the grid"] = (w < s * (q_min - z)) | (w > s * (q_max - z))
    return out

  out = jax.tree.map(np.asarray, (jax.jit(grads) if jit else grads)(w, g))
  for key, x in out.items():
    if key[-1] != "past the grid":
      np.testing.assert_array_equal(x, np.asarray(g), err_msg=str(key))
    elif key[1] == "one ulp low" or not symmetric:  # elements past the grid's ends do occur
      assert x.any(), key


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_on_a_static_range_passes_inside_and_on_its_ends_only(symmetric):
  """A calibrated range [lo, hi]: an activation on either end gets the full gradient, one
  outside it none, even half a step out, where it still rounds to the grid's end."""
  lo, hi = np.float32(-1.3), np.float32(2.1)
  if symmetric:
    lo = -hi
  bits = 8
  scale, zero = qz.scale_zero(f32(lo), f32(hi), bits, symmetric)
  step = float(scale)
  x = np.array(
    [lo - 1, lo - step / 2, lo * (1 + 1e-5), lo, lo * (1 - 1e-5), 0, hi * (1 - 1e-5), hi]
    + [hi * (1 + 1e-5), hi + step / 2, hi + 1],
    np.float32,
  )
  inside = (x >= lo) & (x <= hi)

  @jax.jit
  def grad(x, lo, hi):
    return jax.grad(lambda x: jnp.sum(qz.fake_quant(x, scale, zero, bits, symmetric, lo, hi)))(x)

  grad_x = np.asarray(grad(f32(x), f32(lo), f32(hi)))
  np.testing.assert_array_equal(grad_x, inside.astype(np.float32))
  assert inside.sum() == 5 and (~inside).sum() == 6


def test_per_channel_beats_per_tensor_on_outlier_channels():
  rng = np.random.RandomState(0)
  w = 0.02 * rng.normal(size=SHAPE)
  outliers = [3, 17]
  w[:, outliers] *= 50
  w = f32(w)

  def sq_err(axes):
    return np.square(np.asarray(w) - quantize_np(w, axes, True, bits=(4,))[4]["fake"])

  per_tensor, per_channel = sq_err((0, 1)), sq_err((0,))
  assert per_channel.mean() < per_tensor.mean() / 4, (per_channel.mean(), per_tensor.mean())
  normal = np.setdiff1d(np.arange(256), outliers)  # the outliers no longer set their scale
  assert per_channel[:, normal].mean() < per_tensor[:, normal].mean() / 20
  # Relative to each channel's own power, per channel is accurate everywhere.
  relative_channel = per_channel.mean(0) / np.mean(np.square(np.asarray(w)), axis=0)
  relative_tensor = per_tensor.mean(0) / np.mean(np.square(np.asarray(w)), axis=0)
  assert np.max(relative_channel) < 0.05 < np.min(relative_tensor[normal])


@pytest.mark.parametrize("data", ["student-t", "outlier"])
def test_clipping_calibrators_shrink_the_range_and_mse_wins_on_heavy_tails(data):
  rng = np.random.RandomState(0)
  if data == "student-t":
    x = rng.standard_t(3, size=SHAPE)
  else:
    x = rng.normal(size=SHAPE)
    x[7, 3] = 40.0  # one huge outlier
  x = f32(x)
  for symmetric in (True, False):
    for axes in ((0,), (0, 1)):  # per channel, per tensor
      r = {m: quantize_np(x, axes, symmetric, m, bits=(4,))[4] for m in qz.CALIBRATORS}
      for m in ("percentile", "mse"):
        assert r[m]["lo"].shape == r["absmax"]["lo"].shape
        assert np.all(r[m]["lo"] >= r["absmax"]["lo"]) and np.all(r[m]["hi"] <= r["absmax"]["hi"])
        assert np.all(r[m]["hi"] > 0) and np.all(r[m]["lo"] < 0)
      err = {m: np.mean(np.square(np.asarray(x) - r[m]["deq"]), axis=axes) for m in r}
      assert np.all(err["mse"] <= err["absmax"])  # per group: absmax is one of its candidates
    # Per tensor, clipping the tail pays: observed 0.57-0.65 (t), 0.18-0.29 (outlier).
    assert err["mse"] < 0.75 * err["absmax"], err
    assert np.all(r["mse"]["hi"] < 0.5 * r["absmax"]["hi"]) or not symmetric


# LSQ.


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_the_paper(per_channel):
  bits = 3
  q_n, q_p = qz.lsq_range(bits)
  assert (q_n, q_p) == (4, 3)
  rng = np.random.RandomState(0)
  v = f32(rng.uniform(-2.0, 2.0, size=(16, 3)))
  step = f32([[0.15, 0.3, 0.6]] if per_channel else 0.3)
  n = 16 if per_channel else v.size
  g = 1 / np.sqrt(n * q_p)
  assert qz.lsq_grad_scale(v, step, bits) == pytest.approx(g)

  def loss(v, step):
    v_hat = qz.lsq_fake_quant(v, step, bits)
    return jnp.sum(v_hat), v_hat

  grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(v, step)
  (_, v_hat), (grad_v, grad_s) = jax.tree.map(np.asarray, grads)
  r = np.asarray(v) / np.asarray(step)
  np.testing.assert_allclose(v_hat, np.clip(np.round(r), -q_n, q_p) * np.asarray(step), atol=1e-6)
  inside = (r > -q_n) & (r < q_p)
  assert 0 < inside.sum() < v.size and (r < -q_n).any() and (r > q_p).any()
  np.testing.assert_allclose(grad_v, np.where(inside, 1.0, 0.0), atol=1e-6)
  per_element = np.where(inside, np.round(r) - r, np.where(r < 0, -q_n, q_p))
  expected = g * per_element.sum(axis=0, keepdims=True) if per_channel else g * per_element.sum()
  assert grad_s.shape == step.shape
  np.testing.assert_allclose(grad_s, expected, rtol=1e-5, atol=1e-6)


def test_lsq_gradients_on_the_grid_ends():
  """v / s on -Q_N or Q_P (or a hair past them, a step rounded one ulp low): v gets the full
  gradient; s gets -Q_N or Q_P there (Esser et al., eq. 3), round(v/s) - v/s inside."""
  bits = 4
  q_n, q_p = qz.lsq_range(bits)
  step = np.full(7, 0.05, np.float32)
  codes = np.array([-q_n, q_p, -q_n - 0.7, q_p + 0.4, 1.3, q_p, -q_n], np.float32)
  v = codes * step
  step[-2:] = np.nextafter(step[-2:], np.float32(0))  # v / s a hair past the ends
  assert np.all(np.abs(v[-2:] / step[-2:]) > np.abs(codes[-2:]))

  @jax.jit
  def grads(v, step):
    return jax.grad(lambda v, s: jnp.sum(qz.lsq_fake_quant(v, s, bits)), (0, 1))(v, step)

  grad_v, grad_s = map(np.asarray, grads(f32(v), f32(step)))
  np.testing.assert_array_equal(grad_v, [1, 1, 0, 0, 1, 1, 1])
  g = 1 / np.sqrt(q_p)  # one element per step
  r = v / step
  expected = g * np.array([-q_n, q_p, -q_n, q_p, np.round(r[4]) - r[4], q_p, -q_n])
  np.testing.assert_allclose(grad_s, expected, rtol=1e-5)
