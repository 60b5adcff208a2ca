"""A quantized `dot_general` for the models' injection point; a Policy (policy.py) picks layers.

    policy = Policy.of((r"lm_head|classifier", None), (r".*", QuantConfig(bits=8, act_bits=8)))
    model = models.build(cfg, dot_general_cls=functools.partial(QuantDot, policy))

`QuantDot` is created inside the calling layer's scope, so it knows the layer's path
(`layers_3/mlp/wi`, `lm_head`; `layers/mlp/wi` when scanned) and the policy's first rule
whose regex matches that path (`re.search`) decides: `None` keeps the layer float.
The modes, one function each once the operands' grids are made:

  "train"      QAT (also PTQ evaluation): the forward is the integer computation below, the
               backward the straight-through gradient of the fake-quantized float dot
  "calibrate"  a float forward that records static activation ranges ("quant" collection)
  "convert"    computes each weight's integer codes and scales ("quant": w_int, w_scale)
  "serve"      int8 x int8 -> int32 `lax.dot_general` on integer codes, rescaled to float

Its variables: "params" holds LSQ step sizes (w_step, a_step, b_step); "quant" holds the
rule each layer matched (rule), static activation ranges (a_lo, a_hi, a_n) and the weight
scales serving reads (w_scale: made at init, overwritten by "convert"). Weight scales take
the logical axis names of the layer's kernel, so they shard with their weights. Format "fp8"
(fp8.py: e4m3 forward, e5m2 gradients, per-tensor scales) has its own path, "train" and
"calibrate" only; "fp8" holds its amax histories (a_amax, w_amax or b_amax, g_amax).

A quantizer is a grid (`quantizers.Grid`: scale, zero point and the range it covers, made by
`_weight_grid` and `_act_grid`) and a fake quantizer with its straight-through gradient
(picked in `_fake_quant`); train and serve run the integer dot where both operands are on
integer grids, and a float dot of the fake-quantized operands otherwise.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from compress.quant import fp8
from compress.quant import quantizers as qz
from compress.quant.policy import Policy, QuantConfig

MODES = ("train", "calibrate", "convert", "serve")
# The calling layer's weight: Flax's own name in nn.Dense / nn.DenseGeneral / nn.Einsum, the
# layers whose dot_general QuantDot replaces (read for its logical names; replaced by codes).
WEIGHT = "kernel"


def calibrate_model(calibrate_fn, variables, batches):
  """Runs `calibrate_fn(variables, batch) -> variables` over `batches` (an iterable, at
  least one batch): e.g. a jitted apply of the model in "calibrate" mode, mutable "quant".
  """
  n = 0
  for batch in batches:
    variables, n = calibrate_fn(variables, batch), n + 1
  if n == 0:
    raise ValueError("calibration got no batches: give it at least one (e.g. 8 to 64).")
  return variables


def _shift(axes, at):
  return tuple(a + (a > at) for a in axes)


def _tiled_dims(dims, at, size):
  """Dimension numbers after splitting contracting axis `at` into (count, size): the size
  axis is contracted, the count axis becomes a batch axis (summed after the dot)."""
  contract, batch = dims
  contract = tuple(a + 1 if a == at else a for a in _shift(contract, at))
  return contract, _shift(batch, at) + (at,)


def _to_out(s, batch, contract, n_other_free: int, lhs: bool):
  """A keepdims scale of one operand laid out like dot_general's output (batch, lhs free,
  rhs free), broadcastable against it."""
  free = [a for a in range(s.ndim) if a not in batch and a not in contract]
  s = jnp.transpose(s, (*batch, *free, *contract))
  s = s.reshape(s.shape[: len(batch) + len(free)])
  ones, nb = (1,) * n_other_free, len(batch)
  return s.reshape(s.shape + ones) if lhs else s.reshape(s.shape[:nb] + ones + s.shape[nb:])


class _Dot(NamedTuple):
  """One quantized dot's static facts: its operands' bits and grids, and the tiled layout.

  Sub-channel weights: the last contracting axis K -> (K // tile, tile); the tile is
  contracted, the tile count becomes a batch axis of the integer dot (summed after it).
  """

  cfg: QuantConfig
  dims: tuple  # the dot's dimension_numbers
  precision: object
  preferred: object  # preferred_element_type
  weight: bool  # rhs is a weight ("act_weight"), else a second activation ("act_act")
  r_bits: int | None
  a_sym: bool
  r_sym: bool
  tile: int | None
  ldims: tuple  # (contracting, batch) axes of the tiled lhs
  rdims: tuple  # (contracting, batch) axes of the tiled rhs
  w_reduce: tuple  # the weight axes one scale spans (tiled layout)

  def float_dot(self, a, b):
    return lax.dot_general(a, b, self.dims, self.precision, self.preferred)


def _plan(cfg, operands, dims, precision, preferred, rhs_ndim) -> _Dot:
  (lc, rc), (lb, rb) = dims
  weight = operands == "act_weight"
  tile = cfg.granularity if (weight and isinstance(cfg.granularity, int)) else None
  ldims, rdims = (lc, lb), (rc, rb)
  if tile is not None:
    ldims, rdims = _tiled_dims(ldims, lc[-1], tile), _tiled_dims(rdims, rc[-1], tile)
  if cfg.granularity == "tensor":
    w_reduce = tuple(range(rhs_ndim + (tile is not None)))
  else:
    w_reduce = rdims[0]
  return _Dot(
    cfg,
    dims,
    precision,
    preferred,
    weight,
    r_bits=cfg.bits if weight else cfg.act_bits,
    a_sym=cfg.act_symmetric and not cfg.lsq,
    r_sym=(cfg.symmetric if weight else True) and not cfg.lsq,  # LSQ: the full signed grid
    tile=tile,
    ldims=ldims,
    rdims=rdims,
    w_reduce=w_reduce,
  )


class QuantDot(nn.Module):
  """lax.dot_general with fake-quantized (train) or integer (serve) operands.

  `operands`: "act_weight" (dense layers: lhs activations, rhs a weight) or "act_act"
  (attention einsums: both activations, quantized with the activation settings).
  """

  policy: Policy
  mode: str = "train"
  operands: str = "act_weight"

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if self.mode not in MODES:
      raise ValueError(f"QuantDot mode={self.mode!r}: choose one of {MODES}.")
    layer = "/".join(self.scope.path[:-1])
    index, cfg = self.policy.match(layer)
    if self.is_initializing() and index is not None:
      self.variable("quant", "rule", lambda: jnp.int32(index))
    if cfg is None or (cfg.bits is None and cfg.act_bits is None):
      return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if cfg.format == "fp8":
      weight = self.operands == "act_weight"
      args = (lhs, rhs, dimension_numbers, precision, preferred_element_type)
      return fp8.dot_general(self, cfg, layer, weight, *args)
    d = _plan(cfg, self.operands, dimension_numbers, precision, preferred_element_type, rhs.ndim)
    rhs_t = rhs
    if d.tile is not None:
      rc = dimension_numbers[0][1]
      try:
        rhs_t = qz.tile(rhs.astype(jnp.int8) if rhs.dtype == jnp.int4 else rhs, rc[-1], d.tile)
      except ValueError as e:
        raise ValueError(f"{layer}: {e}") from None

    w = None if not d.weight or d.r_bits is None else self._weight(d, layer, rhs_t)
    if self.mode == "calibrate":
      return self._calibrate(d, lhs, rhs)
    if self.mode == "convert":
      return self._convert(d, layer, lhs, rhs, rhs_t, w)
    r = w if d.weight else self._act_grid(d, rhs, "b", d.dims[0][1], d.r_sym)
    a = None if cfg.act_bits is None else self._act_grid(d, lhs, "a", d.dims[0][0], d.a_sym)
    out_dtype = preferred_element_type or lhs.dtype
    if self.mode == "serve":
      return _serve(d, lhs, rhs, rhs_t, a, r).astype(out_dtype)
    return _train(d, lhs, rhs, rhs_t, a, r, out_dtype)

  # The grids: weights' (learned, from their range, or stored for serving), activations'.

  def _weight(self, d: _Dot, layer, w) -> qz.Grid | None:
    """The weight's grid as this mode needs it (serve: the scale `convert` stored). At init
    it also makes the stored scale, with the kernel's logical names (so it shards with it)."""
    grid = None
    if self.is_initializing() or self.mode in ("train", "convert"):
      grid = self._weight_grid(d, w)
    if self.is_initializing():
      scale = grid.scale
      self.variable("quant", "w_scale", _boxed(lambda *_: scale, self._names(d, w.ndim)), None)
    if self.mode != "serve":
      return grid
    scale = self.get_variable("quant", "w_scale")
    if scale is None:
      raise ValueError(
        f"{layer}: serve mode reads the weight scales `convert` stores; convert the model "
        "first (compress.quant.convert)."
      )
    return qz.Grid(scale)

  def _weight_grid(self, d: _Dot, w) -> qz.Grid:
    """The weight's grid in the tiled layout: its learned step (LSQ), the stored scale a
    post-training method chose (calibrator "stored": GPTQ's grids), or its range's."""
    if d.cfg.calibrator == "stored" and not self.is_initializing():
      return qz.Grid(self.get_variable("quant", "w_scale"))
    if d.cfg.lsq:
      init = lambda *_: qz.lsq_init(lax.stop_gradient(w), d.w_reduce, d.r_bits)  # noqa: E731
      return qz.Grid(self.param("w_step", _boxed(init, self._names(d, w.ndim))))
    method = "absmax" if d.cfg.calibrator == "stored" else d.cfg.calibrator  # at init
    lo, hi = qz.calibrate(
      lax.stop_gradient(w), d.w_reduce, bits=d.r_bits, symmetric=d.r_sym, method=method
    )
    return qz.int_grid(lo, hi, d.r_bits, d.r_sym)

  def _names(self, d: _Dot, ndim):
    """Logical names for a weight scale: the kernel's names, None on reduced/tile axes.

    Read from the calling layer's boxed `kernel` at init (the only time names are needed).
    """
    box = self.parent.scope.get_variable("params", WEIGHT) if self.parent else None
    names = getattr(box, "names", None)
    if names is None or len(names) + (d.tile is not None) != ndim:
      return None
    names = list(names)
    if d.tile is not None:
      names.insert(d.dims[0][1][-1] + 1, None)
    return tuple(None if a in d.w_reduce else n for a, n in enumerate(names))

  def _act_grid(self, d: _Dot, x, prefix, contract, symmetric) -> qz.Grid:
    """An activation's grid, keepdims in x's layout: learned (LSQ), per call, or static."""
    cfg, bits, shape = d.cfg, d.cfg.act_bits, (1,) * x.ndim
    reduce = tuple(range(x.ndim)) if cfg.act_granularity == "tensor" else contract
    if cfg.lsq:
      init = lambda *_: qz.lsq_init(lax.stop_gradient(x), reduce, bits).reshape(())  # noqa: E731
      return qz.Grid(self.param(f"{prefix}_step", init).reshape(shape))
    if not cfg.act_static:
      lo, hi = qz.calibrate(
        lax.stop_gradient(x), reduce, bits=bits, symmetric=symmetric, method=cfg.act_calibrator
      )
      return qz.int_grid(lo, hi, bits, symmetric)
    lo, hi = self._static_range(x, prefix, reduce, bits, symmetric, cfg.act_calibrator)
    return jax.tree.map(lambda a: a.reshape(shape), qz.int_grid(lo, hi, bits, symmetric))

  def _static_range(self, x, prefix, reduce, bits, symmetric, method):
    """One range per tensor ("quant": {prefix}_lo, _hi), recorded by "calibrate" mode over N
    batches ({prefix}_n): absmax keeps the range over all of them, percentile and mse the mean
    of the per-batch ranges."""

    def batch_range():
      lo, hi = qz.calibrate(x, reduce, bits=bits, symmetric=symmetric, method=method)
      return lo.reshape(()), hi.reshape(())

    lo_v = self.variable("quant", f"{prefix}_lo", lambda: batch_range()[0])
    hi_v = self.variable("quant", f"{prefix}_hi", lambda: batch_range()[1])
    n_v = self.variable("quant", f"{prefix}_n", lambda: jnp.zeros((), jnp.float32))
    if self.mode == "calibrate" and not self.is_initializing():
      lo, hi = batch_range()
      n = n_v.value
      if method == "absmax":
        new_lo, new_hi = jnp.minimum(lo_v.value, lo), jnp.maximum(hi_v.value, hi)
      else:
        new_lo, new_hi = (lo_v.value * n + lo) / (n + 1), (hi_v.value * n + hi) / (n + 1)
      lo_v.value = jnp.where(n > 0, new_lo, lo)
      hi_v.value = jnp.where(n > 0, new_hi, hi)
      n_v.value = n + 1
    return lo_v.value, hi_v.value

  # The modes after the grids: calibrate and convert run the float dot; serve and train the
  # integer one where both operands are on integer grids.

  def _calibrate(self, d: _Dot, lhs, rhs):
    """A float forward that records the static activation ranges."""
    if d.cfg.act_bits is not None:
      self._act_grid(d, lhs, "a", d.dims[0][0], d.a_sym)
      if not d.weight:
        self._act_grid(d, rhs, "b", d.dims[0][1], d.r_sym)
    return d.float_dot(lhs, rhs)

  def _convert(self, d: _Dot, layer, lhs, rhs, rhs_t, w):
    """A float forward that stores the weight's integer codes and scales ("quant")."""
    if w is not None:
      if w.zero is not None:
        raise ValueError(
          f"{layer}: conversion needs symmetric weights (the integer path has no weight "
          "zero point); train with symmetric=True."
        )
      q = qz.quantize(rhs_t, w.scale, None, d.r_bits, d.r_sym).astype(jnp.int8)
      self.put_variable("quant", "w_scale", w.scale)
      self.put_variable("quant", "w_int", q.reshape(rhs.shape).astype(qz.storage_dtype(d.r_bits)))
    return d.float_dot(lhs, rhs)


def _train(d: _Dot, lhs, rhs, rhs_t, a, r, out_dtype):
  """QAT: the integer forward (as served), with the gradient of the fake-quantized float dot
  (the straight-through estimator); the fake-quantized dot itself where there is no integer
  form (weight- or activation-only, asymmetric weights)."""
  (lc, rc), _ = d.dims
  x_hat, r_hat = lhs, rhs  # what gradients see
  if a is not None:
    x_hat = _fake_quant(d, lhs, a, d.cfg.act_bits, d.a_sym, _lsq_act_grad_scale(d, lhs, lc))
  if r is not None:
    g = None if d.weight else _lsq_act_grad_scale(d, rhs, rc)
    r_hat = _fake_quant(d, rhs_t, r, d.r_bits, d.r_sym, g).reshape(rhs.shape)
  if a is None or r is None or r.zero is not None:
    return d.float_dot(x_hat, r_hat)
  y = lax.stop_gradient(_int_forward(d, lhs, rhs_t, a, r))
  return _ste_dot(x_hat, r_hat, y, d.dims, d.precision).astype(out_dtype)


def _serve(d: _Dot, lhs, rhs, rhs_t, a, r):
  """The integer forward; weight- or activation-only: dequantized operands, a float dot."""
  if a is not None and r is not None:
    return _int_forward(d, lhs, rhs_t, a, r)
  x_hat, r_hat = lhs, rhs
  if r is not None:
    q_r = rhs_t if jnp.issubdtype(rhs_t.dtype, jnp.integer) else None
    if q_r is None:
      q_r = qz.quantize(rhs_t, r.scale, None, d.r_bits, d.r_sym)
    r_hat = qz.dequantize(q_r, r.scale).reshape(rhs.shape).astype(lhs.dtype)
  if a is not None:
    q_l = qz.quantize(lhs, a.scale, a.zero, d.cfg.act_bits, d.a_sym)
    x_hat = qz.dequantize(q_l, a.scale, a.zero)
  return d.float_dot(x_hat.astype(lhs.dtype), r_hat)


def _int_forward(d: _Dot, lhs, rhs_t, a, r):
  """The integer forward, the same in train and serve (so they agree bit for bit): int8 codes,
  an int32 accumulation, then the scales."""
  if jnp.issubdtype(rhs_t.dtype, jnp.integer):
    q_r = rhs_t.astype(jnp.int8)
  else:
    q_r = qz.quantize(rhs_t, r.scale, r.zero, d.r_bits, d.r_sym).astype(jnp.int8)
  lhs_t, a_scale, a_zero = lhs, a.scale, a.zero
  if d.tile is not None:
    at = d.dims[0][0][-1]
    lhs_t = qz.tile(lhs, at, d.tile)
    a_scale = jnp.expand_dims(a_scale, at + 1)
    a_zero = None if a_zero is None else jnp.expand_dims(a_zero, at + 1)
  q_l = qz.quantize(lhs_t, a_scale, a_zero, d.cfg.act_bits, d.a_sym).astype(jnp.int8)
  n_batch = len(d.dims[1][0])
  return _int_dot(q_l, q_r, a_scale, a_zero, r.scale, d.ldims, d.rdims, d.tile is not None, n_batch)


def _lsq_act_grad_scale(d: _Dot, x, contract):
  """LSQ's gradient scale of an activation step: N = the features per token."""
  if not d.cfg.lsq:
    return None
  return 1.0 / math.sqrt(math.prod(x.shape[a] for a in contract) * qz.lsq_range(d.cfg.act_bits)[1])


def _int_dot(q_l, q_r, a_scale, a_zero, r_scale, ldims, rdims, tiled: bool, n_batch: int):
  """s_l s_r (q_l . q_r - z_l sum_k q_r) with an int8 x int8 -> int32 dot; tiles summed."""
  dims = ((ldims[0], rdims[0]), (ldims[1], rdims[1]))
  acc = lax.dot_general(q_l, q_r, dims, preferred_element_type=jnp.int32)
  n_lfree = q_l.ndim - len(ldims[0]) - len(ldims[1])
  n_rfree = q_r.ndim - len(rdims[0]) - len(rdims[1])
  y = acc.astype(jnp.float32)
  if a_zero is not None:  # x = s (q - z)
    colsum = jnp.sum(q_r.astype(jnp.int32), axis=rdims[0], keepdims=True).astype(jnp.float32)
    y = y - _to_out(a_zero, ldims[1], ldims[0], n_rfree, True) * _to_out(
      colsum, rdims[1], rdims[0], n_lfree, False
    )
  y = y * _to_out(a_scale, ldims[1], ldims[0], n_rfree, True)
  y = y * _to_out(r_scale, rdims[1], rdims[0], n_lfree, False)
  return jnp.sum(y, axis=n_batch) if tiled else y  # the tile count is the last batch axis


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ste_dot(x_hat, w_hat, y, dimension_numbers, precision):
  """Returns y (the integer forward); differentiates as lax.dot_general(x_hat, w_hat)."""
  del x_hat, w_hat, dimension_numbers, precision
  return y


def _ste_dot_fwd(x_hat, w_hat, y, dimension_numbers, precision):
  return y, (x_hat, w_hat)


def _ste_dot_bwd(dimension_numbers, precision, res, g):
  x_hat, w_hat = res
  _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dimension_numbers, precision), x_hat, w_hat)
  gx, gw = vjp(g.astype(jnp.result_type(x_hat, w_hat)))
  return gx, gw, jnp.zeros_like(g)


_ste_dot.defvjp(_ste_dot_fwd, _ste_dot_bwd)


def _boxed(init, names):
  return init if names is None else nn.with_logical_partitioning(init, names)


def _fake_quant(d: _Dot, x, grid: qz.Grid, bits, symmetric, lsq_grad_scale=None):
  """x quantized on `grid` forward, the quantizer's straight-through gradient backward."""
  if d.cfg.lsq:
    return qz.lsq_fake_quant(x, grid.scale, bits, lsq_grad_scale)
  return qz.fake_quant(x, grid.scale, grid.zero, bits, symmetric, grid.lo, grid.hi)
