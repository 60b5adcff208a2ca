"""Per-input-channel scales that make a layer easier to quantize: SmoothQuant and AWQ.

Both rest on the same identity. A linear layer computes Y = X W with W [in, out] (the input axis
first). For any s [in] with s > 0,

  Y = (X diag(s)^-1) (diag(s) W),

exactly in real arithmetic. The caller folds 1/s into the operation that produces X (a norm's
scale and bias) and multiplies row j of every kernel reading X by s_j; nothing here does the
folding. Kernels that share one input (q/k/v after the attention norm, up/gate after the MLP
norm) must share one s, so both methods take the statistics of that input and all of its kernels.

SmoothQuant (Xiao et al. 2022, eq. 4; reference smoothquant/smooth.py `smooth_ln_fcs`) moves
activation outliers into the weights, for w8a8:

  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

with max|W_j| the largest |W[j, :]| over all kernels sharing the input.

AWQ (Lin et al. 2023, eq. 4-5; reference llm-awq awq/quantize/auto_scale.py `auto_scale_block`,
`_search_module_scale`) protects the weights of salient input channels (large mean |x_j|) for
weight-only quantization: scaling row j up by s_j > 1 before rounding divides its rounding error
by s_j in the output. It searches s = mean|X|^ratio over a grid of ratios for the one that
minimises the quantized layer's output error on calibration data.

Statistics of the calibration inputs come from the caller (stats.py): the Hessian
H = sum_t x_t x_t^T [in, in], act_absmax_I = max_t |x_tj|, act_mean_I = mean_t |x_tj|.
"""

import numbers
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp

# Reference constants: SmoothQuant clamps scales (and max|W_j|) at 1e-5, AWQ its candidate scales
# at 1e-4 before normalising them.
SMOOTHQUANT_MIN_SCALE = 1e-5
AWQ_MIN_SCALE = 1e-4


def smoothquant_scales(act_absmax_I, w_absmax_I, alpha: float = 0.5) -> jnp.ndarray:
  """SmoothQuant's migration scales (Xiao et al. 2022, eq. 4):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),

  act_absmax_I: max_t |x_tj| over the calibration tokens of the input shared by the kernels;
  w_absmax_I: max_k |W[j, k]| over all kernels that read that input (take the elementwise max of
  each kernel's row maxima). alpha in [0, 1] is the migration strength: 0 leaves the activations
  alone (s = 1 / max|W_j|), 1 moves all of their range into the weights (s = max|X_j|); the paper
  uses 0.5 for most models. The smoothed activations X / s then have per-channel maxima
  max|X_j|^(1 - alpha) * max|W_j|^(1 - alpha), flatter than max|X_j| when outliers dominate.

  Like the reference, max|W_j| and s are clamped at 1e-5. Channels where max|X_j| = 0 (the input
  never fired) or max|W_j| = 0 (no kernel reads it) get s_j = 1: their scale has no effect on the
  output, and 1 keeps the folded 1/s finite.
  """
  if not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
    raise ValueError(
      f"smoothquant_scales: alpha={alpha!r} is outside [0, 1]: pass a migration strength in "
      "[0, 1] (the paper uses 0.5; larger moves more of the activations' range into the weights)."
    )
  a_shape, w_shape = jnp.shape(act_absmax_I), jnp.shape(w_absmax_I)
  if len(a_shape) != 1 or a_shape != w_shape:
    raise ValueError(
      f"smoothquant_scales: act_absmax_I has shape {a_shape} and w_absmax_I {w_shape}; both must "
      "be [in] for the same input: pass per-input-channel maxima (w_absmax_I = max over the "
      "kernels' output axis, kernels [in, out])."
    )
  act = jnp.asarray(act_absmax_I)
  w = jnp.asarray(w_absmax_I)
  dtype = jnp.result_type(act.dtype, w.dtype, jnp.float32)
  act, w = act.astype(dtype), w.astype(dtype)
  s = act**alpha / jnp.maximum(w, SMOOTHQUANT_MIN_SCALE) ** (1.0 - alpha)
  s = jnp.maximum(s, SMOOTHQUANT_MIN_SCALE)
  return jnp.where((act == 0) | (w == 0), jnp.ones_like(s), s)


@jax.jit  # called per layer on (possibly sharded) arrays: one fused program, not op by op
def output_error(w_IxO, w_hat_IxO, h_IxI) -> jnp.ndarray:
  """The squared error that replacing W by W_hat makes in the layer's outputs over the
  calibration tokens, from their Hessian H = sum_t x_t x_t^T alone:

    sum_t ||x_t (W - W_hat)||^2 = ||X D||_F^2 = trace(D^T X^T X D) = trace(D^T H D),  D = W - W_hat,

  computed as sum(D * (H D)) (O(in^2 out), without forming D^T H D). It is the objective GPTQ
  minimises (Frantar et al. 2022, eq. 1).
  """
  d = jnp.asarray(w_IxO) - jnp.asarray(w_hat_IxO)
  h = jnp.asarray(h_IxI)
  dtype = jnp.result_type(d.dtype, h.dtype, jnp.float32)
  d, h = d.astype(dtype), h.astype(dtype)
  return jnp.sum(d * jnp.matmul(h, d, precision=jax.lax.Precision.HIGHEST))


def awq_candidate_scales(act_mean_I, ratio) -> jnp.ndarray:
  """AWQ's candidate scales for one ratio, as the reference `_search_module_scale` forms them:

    s = clamp(mean|X|^ratio, min=1e-4),  s = s / sqrt(max(s) * min(s)),

  the normalisation centring s around 1 on a log scale (so that no kernel's range moves much).
  ratio = 0 gives s = 1 (0^0 = 1): plain round-to-nearest.
  """
  s = jnp.maximum(jnp.asarray(act_mean_I) ** ratio, AWQ_MIN_SCALE)
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def awq_scales(
  ws: Sequence[jnp.ndarray],
  h_IxI,
  act_mean_I,
  quantize: Callable[[jnp.ndarray], jnp.ndarray],
  grid: int = 20,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """AWQ's scale search (Lin et al. 2023, sec. 3.2, eq. 4-5; reference llm-awq
  awq/quantize/auto_scale.py `_search_module_scale`, n_grid = 20).

  ws: the kernels [in, out_k] that read one input (e.g. q, k, v); h_IxI: that input's Hessian
  sum_t x_t x_t^T over the calibration tokens; act_mean_I: mean_t |x_tj| (the reference's
  `get_act_scale`); quantize: w_IxO -> w_hat_IxO, round-to-nearest on the target grid (per
  channel or grouped; jit-traceable, hashable: it is a static argument, so pass the same function
  object each call to reuse the compiled search).

  For each ratio r in [0, 1/grid, ..., (grid - 1)/grid]:

    s = clamp(mean|X|^r, min=1e-4),  s = s / sqrt(max(s) min(s))     (awq_candidate_scales)
    W_hat_k = quantize(diag(s) W_k) / s[:, None]                      for each kernel k
    error(r) = sum_k trace((W_k - W_hat_k)^T H (W_k - W_hat_k))      (output_error)

  and returns (s at the ratio with the lowest error, errors [grid]); ties go to the smaller ratio
  (the reference keeps the first strict minimum). W_hat_k is what the layer computes with once the
  caller folds 1/s into the previous operation: (X / s) quantize(diag(s) W_k) = X W_hat_k. Ratio 0
  is s = 1, plain round-to-nearest, so the result is never worse than RTN on the calibration
  data; errors[0] is RTN's error and errors.argmin() / grid the chosen ratio.

  Deviation from the reference: it measures the mean squared error at the output of the whole
  module the kernels feed (for q/k/v, the attention block after softmax and the output
  projection, from stored calibration activations); here the error is at the kernels' own outputs,
  summed over the kernels sharing the input, computed exactly from H without holding the
  calibration activations. For a single kernel (the reference's o_proj, scaled against v_proj,
  and down_proj, against up_proj) the reference measures at that kernel's own output as well, and
  the two agree up to the mean's constant factor. Otherwise it follows the reference: the same
  grid, candidate scales, normalisation, clamp and choice; the weights are scaled and quantized
  in float32 or wider (the reference in the model's dtype, e.g. float16).

  The ratios run sequentially (lax.map), holding one copy of the scaled kernels at a time.
  """
  ws = list(ws) if isinstance(ws, (list, tuple)) else ws
  if not isinstance(ws, list) or not ws:
    raise ValueError(
      f"awq_scales: ws={type(ws).__name__} is not a non-empty list of kernels: pass the kernels "
      "[in, out] that read the input, e.g. [q, k, v]."
    )
  if not isinstance(grid, numbers.Integral) or isinstance(grid, bool) or grid < 1:
    raise ValueError(
      f"awq_scales: grid={grid!r} is not a positive integer: pass the number of ratios to try "
      "(the reference uses 20: ratios 0, 0.05, ..., 0.95)."
    )
  shapes = [jnp.shape(w) for w in ws]
  if any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) != 1:
    raise ValueError(
      f"awq_scales: ws have shapes {shapes}; each must be a kernel [in, out] with the same input "
      "size: pass only kernels that read the same input (e.g. q, k, v, not o)."
    )
  n_in = shapes[0][0]
  if jnp.shape(h_IxI) != (n_in, n_in):
    raise ValueError(
      f"awq_scales: h_IxI has shape {jnp.shape(h_IxI)}, but the kernels have {n_in} inputs: pass "
      f"the Hessian [{n_in}, {n_in}] of the input that these kernels read."
    )
  if jnp.shape(act_mean_I) != (n_in,):
    raise ValueError(
      f"awq_scales: act_mean_I has shape {jnp.shape(act_mean_I)}, but the kernels have {n_in} "
      f"inputs: pass mean |x| per input channel [{n_in}] of the input that these kernels read."
    )
  h_IxI, act_mean_I = jnp.asarray(h_IxI), jnp.asarray(act_mean_I)
  ws = [jnp.asarray(w) for w in ws]
  return _awq_search(ws, h_IxI, act_mean_I, quantize=quantize, grid=int(grid))


@partial(jax.jit, static_argnames=("quantize", "grid"))
def _awq_search(ws, h_IxI, act_mean_I, *, quantize, grid):
  dtype = jnp.result_type(*[w.dtype for w in ws], h_IxI.dtype, act_mean_I.dtype, jnp.float32)
  ws = [w.astype(dtype) for w in ws]
  h = h_IxI.astype(dtype)
  act_mean = act_mean_I.astype(dtype)

  def error(ratio):
    s = awq_candidate_scales(act_mean, ratio)
    total = jnp.zeros((), dtype)
    for w in ws:
      q = quantize(w * s[:, None])
      if q.shape != w.shape:
        raise ValueError(
          f"awq_scales: quantize maps a kernel of shape {w.shape} to {q.shape}: pass a quantize "
          "function that returns the dequantized kernel in the shape it was given."
        )
      total = total + output_error(w, q.astype(dtype) / s[:, None], h)
    return total

  ratios = jnp.arange(grid, dtype=dtype) / grid
  errors = jax.lax.map(error, ratios)
  best = jnp.argmin(errors)  # the first minimum: ties go to the smaller ratio
  return awq_candidate_scales(act_mean, ratios[best]), errors


def kernel_absmax(ws: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """max_k |W[j, k]| over all kernels [in, out_k] in ws: SmoothQuant's w_absmax_I."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w)), axis=1) for w in ws]), axis=0)
