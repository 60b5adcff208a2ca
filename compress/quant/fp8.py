"""FP8 for QuantDot (QuantConfig(format="fp8")): float8_e4m3fn weights and activations,
float8_e5m2 output gradients, one scale per tensor (Micikevicius et al. 2022, "FP8 Formats for
Deep Learning"; the recipe of Transformer Engine, flax.linen.fp8_ops, MaxText and Qwix).

  forward   q_x = e4m3(x / s_x), q_w = e4m3(w / s_w)        x / s saturated at +-448
            y = dot(q_x, q_w) * (s_x s_w)                     fp8 operands, float32 accumulation
  backward  q_g = e5m2(g / s_g)                               saturated at +-57344
            dx = dot_T(q_g, q_w) * (s_g s_w),  dw = dot_T(q_x, q_g) * (s_x s_g)

The gradients are straight through (the gradient of the fake-quantized float dot, with no
mask on saturated elements, as in flax and Transformer Engine), and the backward dots take the
fp8 codes saved by the forward (1 byte an element). A dot of fp8 operands (or of fp8 converted
to float32) followed by a multiply by scalars is the pattern XLA rewrites into a cuBLASLt FP8
GEMM on GPUs that have one; a CPU upcasts, with the same numbers (fp8 products are exact in
float32). `precision` is ignored: fp8 operands have one precision.

Scales: s = amax / max of the format (1 for an amax of 0), where amax is
  current   (amax_history 0 or 1) the tensor's own max |x| in this call;
  delayed   (amax_history L > 1) the largest of the last L calls' amaxes, this call's *not*
            included (so the scale is known before the tensor is: it fuses into the op that
            makes it). The history is a float32[L] in the "fp8" collection, newest first; one
            with nothing recorded yet (all zeros) scales by this call's amax.

Who records the amaxes:
  x, w  the forward, when the "fp8" collection is mutable (apply(..., mutable=["fp8"]), as
        batch statistics are kept); otherwise the history is only read (evaluation).
  g     only the backward sees it, so its history leaves as a gradient: the backward returns
        the new history as the cotangent of the old one (flax's "_overwrite_with_gradient").
        A step that also differentiates the "fp8" collection sets it to `merge(forward, grads)`
        (combining microbatches: the elementwise max of their grads, not the sum). A step that
        does not leaves the gradient history empty, which is current scaling.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from compress.tree import path_name

COLLECTION = "fp8"
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
GRAD_HISTORY = "g_amax"


def fp8_max(dtype) -> float:
  """The largest finite value: 448 for e4m3fn, 57344 for e5m2."""
  return float(jnp.finfo(dtype).max)


def amax(x) -> jax.Array:
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


# Divisions are written as multiplications by a reciprocal, the form XLA rewrites a division
# by a constant or a broadcast scalar into under jit: so jit, no jit and numpy agree bit for bit.


def scale_of(amax, dtype) -> jax.Array:
  """amax / the format's max: amax lands on the largest fp8 value. An amax of 0 gives 1."""
  return jnp.where(amax > 0, amax * (1 / fp8_max(dtype)), 1.0).astype(jnp.float32)


def quantize(x, scale, dtype) -> jax.Array:
  """fp8 codes of x / scale (x * (1 / scale)), saturated at +-max. In float32: a bfloat16 x
  cast straight to fp8 would round twice."""
  m = fp8_max(dtype)
  return jnp.clip(x.astype(jnp.float32) * (1 / scale), -m, m).astype(dtype)


def qdq(x, scale, dtype) -> jax.Array:
  """x quantized to fp8 and back: scale * codes, in x's dtype."""
  return (quantize(x, scale, dtype).astype(jnp.float32) * scale).astype(x.dtype)


def delayed(history, amax) -> tuple[jax.Array, jax.Array]:
  """(the amax to scale this call by, the history with this call's amax first).

  The scale's amax is the history's max (this call's amax when nothing is recorded yet); a
  non-finite amax is recorded as 0, so one bad step does not spoil the next L.
  """
  past = jnp.max(history)
  recorded = jnp.where(jnp.isfinite(amax), amax, 0.0).astype(history.dtype)
  new = jnp.concatenate([recorded[None], history[:-1]])
  return jnp.where(past > 0, past, amax), new


class _Static(NamedTuple):
  dims: tuple  # dot_general's dimension_numbers
  out_dtype: object
  x_dtype: object
  w_dtype: object


def _dot(a, b, dims):
  """The dot of fp8 codes (or of them converted to float32), accumulated in float32."""
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def scaled_dot(x, w, x_scale, w_scale, g_history, static: _Static):
  """The fp8 dot of x and w (scales given; g_history: the output gradient's amax history, None
  for current scaling), with the fp8 backward above. Its cotangent is the new history."""
  return _scaled_dot_fwd(x, w, x_scale, w_scale, g_history, static)[0]


def _scaled_dot_fwd(x, w, x_scale, w_scale, g_history, static):
  q_x, q_w = quantize(x, x_scale, E4M3), quantize(w, w_scale, E4M3)
  y = (_dot(q_x, q_w, static.dims) * (x_scale * w_scale)).astype(static.out_dtype)
  return y, (q_x, q_w, x_scale, w_scale, g_history)


def _scaled_dot_bwd(static, res, g):
  q_x, q_w, x_scale, w_scale, g_history = res
  g_amax, new_history = amax(g), None
  if g_history is not None:
    g_amax, new_history = delayed(g_history, g_amax)
  g_scale = scale_of(g_amax, E5M2)
  q_g = quantize(g, g_scale, E5M2)
  # The forward dot transposed (in x, then in w), on the fp8 codes converted to float32
  # (exactly); the scales multiply the outputs.
  x32, w32, g32 = (q.astype(jnp.float32) for q in (q_x, q_w, q_g))
  (dx,) = jax.linear_transpose(lambda x: _dot(x, w32, static.dims), x32)(g32)
  (dw,) = jax.linear_transpose(lambda w: _dot(x32, w, static.dims), w32)(g32)
  dx = (dx * (g_scale * w_scale)).astype(static.x_dtype)
  dw = (dw * (x_scale * g_scale)).astype(static.w_dtype)
  return dx, dw, jnp.zeros_like(x_scale), jnp.zeros_like(w_scale), new_history


scaled_dot.defvjp(_scaled_dot_fwd, _scaled_dot_bwd)


def dot_general(module, cfg, layer: str, weight: bool, lhs, rhs, dims, precision, preferred):
  """QuantDot's fp8 path (`module` is the QuantDot, its variables made here): the fp8 dot in
  "train", the float dot recording the amaxes in "calibrate" (delayed scaling, "fp8" mutable).
  """
  if module.mode in ("convert", "serve"):
    raise ValueError(
      f"{layer}: format='fp8' has no {module.mode!r} mode yet; its 'train' forward is the fp8 "
      "computation (evaluate in 'train' mode), or quantize to format='int' for an export."
    )
  length = cfg.amax_history if cfg.amax_history > 1 else 0
  record = module.is_mutable_collection(COLLECTION) and not module.is_initializing()

  def scale(x, name):
    a = amax(lax.stop_gradient(x))
    if length:
      history = module.variable(COLLECTION, name, jnp.zeros, (length,), jnp.float32)
      a, new = delayed(history.value, a)
      if record:
        history.value = new
    return scale_of(a, E4M3)

  x_scale, w_scale = scale(lhs, "a_amax"), scale(rhs, "w_amax" if weight else "b_amax")
  g_history = None
  if length:
    g_history = module.variable(COLLECTION, GRAD_HISTORY, jnp.zeros, (length,), jnp.float32).value
  if module.mode == "calibrate":
    return lax.dot_general(lhs, rhs, dims, precision, preferred)
  static = _Static(dims, jnp.dtype(preferred or lhs.dtype), lhs.dtype, rhs.dtype)
  return scaled_dot(lhs, rhs, x_scale, w_scale, g_history, static)


def merge(forward: dict, grads: dict) -> dict:
  """The "fp8" collection after a train step: the activation and weight histories as the
  forward recorded them (`forward`: apply's updated "fp8"), the gradient histories from the
  backward (`grads`: the gradient with respect to the "fp8" collection)."""

  def pick(path, f, g):
    return g if path_name(path).rsplit("/", 1)[-1] == GRAD_HISTORY else f

  return jax.tree_util.tree_map_with_path(pick, forward, grads)
