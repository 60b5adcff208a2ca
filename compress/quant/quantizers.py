"""Quantizers as pure functions: integer grids, ranges, scales, fake quantization, LSQ.

A tensor x is quantized over *groups*: the axes in `reduce_axes` share one scale (and
zero point), the other axes index the groups. Per-tensor = reduce every axis;
per-channel = reduce the contracting axes of a weight; sub-channel = first split an
axis into tiles (`tile`), then reduce the tile axis.

Grids (Jacob et al.; Esser et al. for LSQ), for b bits:
  symmetric   q in [-(2^(b-1) - 1), 2^(b-1) - 1],  x_hat = s * q,        s = amax / q_max
  asymmetric  q in [-2^(b-1), 2^(b-1) - 1],        x_hat = s * (q - z),  z an integer, so 0
              is exactly representable (x = 0 -> q = z -> x_hat = 0)
  LSQ         v_bar = clip(round(v / s), -Q_N, Q_P), v_hat = v_bar * s, s learned, its gradient
              scaled by g = 1 / sqrt(N * Q_P)

Fake quantization (QAT) is dequantize(quantize(x)) forward and the straight-through estimator
backward: the gradient of x inside the range the grid was set for, its ends included, and 0
outside (`straight_through`).
"""

from collections.abc import Sequence
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

CALIBRATORS = ("absmax", "percentile", "mse")


def check_bits(bits: int, what: str = "bits"):
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"{what}={bits!r}: quantization supports integer bit widths from 2 to 8.")


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """(q_min, q_max) of the integer grid; the symmetric grid drops -2^(b-1) to stay symmetric."""
  check_bits(bits)
  q_max = 2 ** (bits - 1) - 1
  return (-q_max if symmetric else -q_max - 1), q_max


def storage_dtype(bits: int):
  """The narrowest native integer type holding a `bits`-bit grid: int4 or int8."""
  check_bits(bits)
  return jnp.int4 if bits <= 4 else jnp.int8


def tile(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Splits `axis` (length K) into (K // size, size): sub-channel groups of `size` elements."""
  axis = axis % x.ndim
  k = x.shape[axis]
  if size <= 0 or k % size:
    raise ValueError(
      f"tile size {size} does not divide axis {axis} of length {k} (shape {x.shape}): "
      f"choose a tile size that divides {k}, e.g. one of {[d for d in (32, 64, 128) if k % d == 0]}."
    )
  return x.reshape(x.shape[:axis] + (k // size, size) + x.shape[axis + 1 :])


def _reduce_last(x: jax.Array, reduce_axes: Sequence[int]) -> jax.Array:
  """x with its group axes first (in order) and the reduced axes flattened into the last."""
  reduce_axes = sorted(a % x.ndim for a in reduce_axes)
  keep = [a for a in range(x.ndim) if a not in reduce_axes]
  y = jnp.transpose(x, keep + reduce_axes)
  return y.reshape(y.shape[: len(keep)] + (-1,))


def _keepdims(stat: jax.Array, x: jax.Array, reduce_axes: Sequence[int]) -> jax.Array:
  """A per-group statistic (group axes only) reshaped to broadcast against x."""
  reduce_axes = {a % x.ndim for a in reduce_axes}
  return stat.reshape(tuple(1 if a in reduce_axes else n for a, n in enumerate(x.shape)))


def grid_range(lo, hi, symmetric: bool):
  """The range a grid for [lo, hi] covers: widened to hold 0, and symmetric about 0 if
  `symmetric`. The straight-through gradient passes inside it."""
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if symmetric:
    amax = jnp.maximum(-lo, hi)
    return -amax, amax
  return lo, hi


def scale_zero(lo, hi, bits: int, symmetric: bool):
  """(scale, zero point) mapping the range [lo, hi] onto the grid; zero is None if symmetric.

  The range is widened to contain 0 (so 0 is exact). An all-zero group gets scale 1.
  """
  q_min, q_max = int_range(bits, symmetric)
  lo, hi = grid_range(lo, hi, symmetric)
  if symmetric:
    scale = hi / q_max
    return jnp.where(scale > 0, scale, 1.0), None
  scale = (hi - lo) / (q_max - q_min)
  scale = jnp.where(scale > 0, scale, 1.0)
  zero = jnp.clip(jnp.round(q_min - lo / scale), q_min, q_max)
  return scale, zero


class Grid(NamedTuple):
  """A tensor's grid, keepdims per group: x_hat = scale (q - zero) (zero None: symmetric), and
  the range [lo, hi] it was set for, where the straight-through gradient passes (None: the
  range the grid spans). LSQ's grid is its learned step alone."""

  scale: jax.Array
  zero: jax.Array | None = None
  lo: jax.Array | None = None
  hi: jax.Array | None = None


def int_grid(lo, hi, bits: int, symmetric: bool) -> Grid:
  """The integer grid for the range [lo, hi] (`scale_zero`), with the range it covers."""
  return Grid(*scale_zero(lo, hi, bits, symmetric), *grid_range(lo, hi, symmetric))


def quantize(x, scale, zero, bits: int, symmetric: bool) -> jax.Array:
  """Integer codes (as float32 values on the grid) of x: clip(round(x / s) + z, q_min, q_max)."""
  q_min, q_max = int_range(bits, symmetric)
  q = jnp.round(x.astype(jnp.float32) / scale)
  if zero is not None:
    q = q + zero
  return jnp.clip(q, q_min, q_max)


def dequantize(q, scale, zero=None) -> jax.Array:
  q = q.astype(jnp.float32)
  return scale * (q if zero is None else q - zero)


# The straight-through estimator (STE): quantization forward, a gradient of 1 backward inside
# the range the grid was set for, bounds included, and 0 outside. The bounds are compared with
# a slack of a few float32 ulps, so the element that set an absmax range counts as inside even
# when its scale (or a bound computed from it) rounded a little low.
_SLACK = 4 * float(jnp.finfo(jnp.float32).eps)


def within(x, lo, hi) -> jax.Array:
  """lo <= x <= hi up to _SLACK (relative to each bound), in float32."""
  x = x.astype(jnp.float32)
  return (x >= lo - _SLACK * jnp.abs(lo)) & (x <= hi + _SLACK * jnp.abs(hi))


@jax.custom_vjp
def straight_through(x, x_hat, lo, hi):
  """x_hat (x quantized) forward; backward the gradient of x where lo <= x <= hi (`within`)
  and 0 elsewhere. x_hat, lo and hi get no gradient."""
  del lo, hi
  return x_hat.astype(x.dtype)


def _straight_through_fwd(x, x_hat, lo, hi):
  return straight_through(x, x_hat, lo, hi), within(x, lo, hi)


def _straight_through_bwd(inside, g):
  return jnp.where(inside, g, jnp.zeros_like(g)), None, None, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def fake_quant(x, scale, zero, bits: int, symmetric: bool, lo=None, hi=None) -> jax.Array:
  """dequantize(quantize(x)) forward; straight-through gradient backward.

  The gradient is the identity for x in [lo, hi], bounds included, and zero outside (the
  clipped STE). Pass the calibrated range (`grid_range(lo, hi, symmetric)`): with a rounded
  zero point an end of it may lie up to half a step outside the grid, and it still passes.
  Without it: the range the grid spans, [s (q_min - z), s (q_max - z)]. The scale gets no
  gradient (LSQ learns it: `lsq_fake_quant`).
  """
  if lo is None:
    q_min, q_max = int_range(bits, symmetric)
    z = 0.0 if zero is None else zero
    lo, hi = scale * (q_min - z), scale * (q_max - z)
  x_hat = dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero)
  return straight_through(x, lax.stop_gradient(x_hat), *map(lax.stop_gradient, (lo, hi)))


# Calibrators: a tensor -> the range [lo, hi] of each group (shaped to broadcast against x).


def _absmax_range(x, reduce_axes, symmetric):
  x = x.astype(jnp.float32)
  if symmetric:
    amax = jnp.max(jnp.abs(x), axis=tuple(reduce_axes), keepdims=True)
    return -amax, amax
  lo = jnp.min(x, axis=tuple(reduce_axes), keepdims=True)
  return lo, jnp.max(x, axis=tuple(reduce_axes), keepdims=True)


def _percentile_range(x, reduce_axes, symmetric, percentile):
  flat = _reduce_last(x.astype(jnp.float32), reduce_axes)
  if symmetric:
    amax = _keepdims(jnp.percentile(jnp.abs(flat), percentile, axis=-1), x, reduce_axes)
    return -amax, amax
  lo = jnp.percentile(flat, 100.0 - percentile, axis=-1)
  hi = jnp.percentile(flat, percentile, axis=-1)
  return _keepdims(lo, x, reduce_axes), _keepdims(hi, x, reduce_axes)


def _mse_range(x, reduce_axes, symmetric, bits, candidates=32):
  """The absmax range shrunk by the factor in (0.2, 1] that minimizes ||x - fake_quant(x)||^2."""
  lo, hi = _absmax_range(x, reduce_axes, symmetric)
  x = x.astype(jnp.float32)

  def err(ratio):
    scale, zero = scale_zero(lo * ratio, hi * ratio, bits, symmetric)
    x_hat = dequantize(quantize(x, scale, zero, bits, symmetric), scale, zero)
    return jnp.sum(jnp.square(x - x_hat), axis=tuple(reduce_axes), keepdims=True)

  ratios = jnp.linspace(1.0, 0.2, candidates)
  errs = lax.map(err, ratios)  # one candidate at a time: memory stays at one tensor
  best = ratios[jnp.argmin(errs, axis=0)]  # ties -> the widest range
  return lo * best, hi * best


def calibrate(
  x, reduce_axes, *, bits: int, symmetric: bool, method: str = "absmax", percentile=99.99
):
  """The range [lo, hi] per group of x by `method`: "absmax", "percentile" or "mse"."""
  reduce_axes = tuple(a % x.ndim for a in reduce_axes)
  if method == "absmax":
    return _absmax_range(x, reduce_axes, symmetric)
  if method == "percentile":
    return _percentile_range(x, reduce_axes, symmetric, percentile)
  if method == "mse":
    return _mse_range(x, reduce_axes, symmetric, bits)
  raise ValueError(f"calibrator {method!r}: choose one of {CALIBRATORS}.")


# LSQ (Esser et al. 2019): a learned step size per group.


def lsq_range(bits: int) -> tuple[int, int]:
  """(Q_N, Q_P) of LSQ's signed grid: v_bar in [-Q_N, Q_P]."""
  check_bits(bits)
  return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def lsq_init(v, reduce_axes, bits: int) -> jax.Array:
  """LSQ's initial step: 2 * mean(|v|) / sqrt(Q_P) per group."""
  _, q_p = lsq_range(bits)
  mean = jnp.mean(jnp.abs(v.astype(jnp.float32)), axis=tuple(reduce_axes), keepdims=True)
  return jnp.maximum(2.0 * mean / math.sqrt(q_p), 1e-8)


def lsq_grad_scale(v, step, bits: int) -> float:
  """g = 1 / sqrt(N * Q_P), N the number of elements sharing one step."""
  _, q_p = lsq_range(bits)
  return 1.0 / math.sqrt((v.size // max(step.size, 1)) * q_p)


def lsq_fake_quant(v, step, bits: int, grad_scale: float | None = None) -> jax.Array:
  """v_hat = clip(round(v / s), -Q_N, Q_P) * s with LSQ's gradients (Esser et al., eq. 3).

  dv_hat/dv = 1 for v / s in [-Q_N, Q_P] (bounds included, up to `within`'s slack), 0
  outside; dv_hat/ds = round(v/s) - v/s for -Q_N < v/s < Q_P, -Q_N or Q_P at or beyond the
  ends, times g (default 1 / sqrt(N * Q_P)).
  """
  g = lsq_grad_scale(v, step, bits) if grad_scale is None else grad_scale
  return _lsq(v, step, bits, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(v, step, bits, g):
  del g
  q_n, q_p = lsq_range(bits)
  v_bar = jnp.clip(jnp.round(v.astype(jnp.float32) / step), -q_n, q_p)
  return (v_bar * step).astype(v.dtype)


def _lsq_fwd(v, step, bits, g):
  return _lsq(v, step, bits, g), (v, step)


def _lsq_bwd(bits, g, res, ct):
  v, step = res
  q_n, q_p = lsq_range(bits)
  r = v.astype(jnp.float32) / step
  ct = ct.astype(jnp.float32)
  grad_v = jnp.where(within(r, -q_n, q_p), ct, 0.0)
  ds = jnp.where(r <= -q_n, -q_n, jnp.where(r >= q_p, q_p, jnp.round(r) - r))
  return grad_v.astype(v.dtype), _sum_to(g * ds * ct, step.shape).astype(step.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def _sum_to(x, shape) -> jax.Array:
  """x summed down to `shape`, which broadcasts to x's shape (the gradient of a broadcast)."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + a for a, n in enumerate(shape) if n == 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)
