"""A quantized `dot_general` for the models' injection point; a Policy (policy.py) picks layers.

    policy = Policy.of((r"lm_head|classifier", None), (r".*", QuantConfig(bits=8, act_bits=8)))
    model = models.build(cfg, dot_general_cls=functools.partial(QuantDot, policy))

`QuantDot` is created inside the calling layer's scope, so it knows the layer's path
(`layers_3/mlp/wi`, `lm_head`; `layers/mlp/wi` when scanned) and the policy's first rule
whose regex matches that path (`re.search`) decides: `None` keeps the layer float.
The modes:

  "train"      QAT (also PTQ evaluation): the forward is the integer computation below, the
               backward the straight-through gradient of the fake-quantized float dot
  "calibrate"  a float forward that records static activation ranges ("quant" collection)
  "convert"    computes each weight's integer codes and scales ("quant": w_int, w_scale)
  "serve"      int8 x int8 -> int32 `lax.dot_general` on integer codes, rescaled to float

Its variables: "params" holds LSQ step sizes (w_step, a_step, b_step); "quant" holds the
rule each layer matched (rule), static activation ranges (a_lo, a_hi, a_n) and the weight
scales serving reads (w_scale: made at init, overwritten by "convert"). Weight scales take the logical axis names of the
layer's kernel, so they shard with their weights.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from compress.quant import quantizers as qz
from compress.quant.policy import Policy

MODES = ("train", "calibrate", "convert", "serve")


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


class QuantDot(nn.Module):
  """lax.dot_general with fake-quantized (train) or integer (serve) operands.

  `operands`: "act_weight" (dense layers: lhs activations, rhs a weight) or "act_act"
  (attention einsums: both activations, quantized with the activation settings).
  """

  policy: Policy
  mode: str = "train"
  operands: str = "act_weight"

  def _names(self, tile_axis, tile_size, reduce_axes, ndim):
    """Logical names for a weight scale: the kernel's names, None on reduced/tile axes.

    Read from the calling layer's boxed `kernel` at init (the only time names are needed).
    """
    box = self.parent.scope.get_variable("params", "kernel") if self.parent else None
    names = getattr(box, "names", None)
    if names is None or len(names) + (tile_size is not None) != ndim:
      return None
    names = list(names)
    if tile_size is not None:
      names.insert(tile_axis + 1, None)
    return tuple(None if a in reduce_axes else n for a, n in enumerate(names))

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if self.mode not in MODES:
      raise ValueError(f"QuantDot mode={self.mode!r}: choose one of {MODES}.")
    layer = "/".join(self.scope.path[:-1])
    index, cfg = self.policy.match(layer)
    if self.is_initializing() and index is not None:
      self.variable("quant", "rule", lambda: jnp.int32(index))

    def float_dot(a, b):
      return lax.dot_general(a, b, dimension_numbers, precision, preferred_element_type)

    if cfg is None or (cfg.bits is None and cfg.act_bits is None):
      return float_dot(lhs, rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    weight = self.operands == "act_weight"
    r_bits = cfg.bits if weight else cfg.act_bits
    a_sym = cfg.act_symmetric and not cfg.lsq
    r_sym = (cfg.symmetric if weight else True) and not cfg.lsq  # LSQ: full signed grid

    # Sub-channel weights: the last contracting axis K -> (K // tile, tile); the tile is
    # contracted, the tile count becomes a batch axis of the (serving) dot.
    tile_size = cfg.granularity if (weight and isinstance(cfg.granularity, int)) else None
    rhs_t, rdims, ldims = rhs, (rc, rb), (lc, lb)
    if tile_size is not None:
      try:
        rhs_t = qz.tile(rhs.astype(jnp.int8) if rhs.dtype == jnp.int4 else rhs, rc[-1], tile_size)
      except ValueError as e:
        raise ValueError(f"{layer}: {e}") from None
      rdims = _tiled_dims((rc, rb), rc[-1], tile_size)
      ldims = _tiled_dims((lc, lb), lc[-1], tile_size)
    w_reduce = tuple(range(rhs_t.ndim)) if cfg.granularity == "tensor" else rdims[0]

    memo = {}

    def weight_scale(w):
      """(scale, zero) of the weight, keepdims in the tiled layout (computed once)."""
      if "w" not in memo:
        memo["w"] = _weight_scale(w)
      return memo["w"]

    def _weight_scale(w):
      if cfg.lsq:
        names = self._names(rc[-1], tile_size, set(w_reduce), w.ndim)
        init = lambda *_: qz.lsq_init(lax.stop_gradient(w), w_reduce, r_bits)  # noqa: E731
        return self.param("w_step", _boxed(init, names)), None
      lo, hi = qz.calibrate(
        lax.stop_gradient(w), w_reduce, bits=r_bits, symmetric=r_sym, method=cfg.calibrator
      )
      return qz.scale_zero(lo, hi, r_bits, r_sym)

    def act_scale(x, prefix, contract, symmetric):
      """(scale, zero) of an activation, keepdims in x's layout."""
      bits, shape = cfg.act_bits, (1,) * x.ndim
      reduce = tuple(range(x.ndim)) if cfg.act_granularity == "tensor" else contract
      if cfg.lsq:
        init = lambda *_: qz.lsq_init(lax.stop_gradient(x), reduce, bits).reshape(())  # noqa: E731
        return self.param(f"{prefix}_step", init).reshape(shape), None
      if not cfg.act_static:
        lo, hi = qz.calibrate(
          lax.stop_gradient(x), reduce, bits=bits, symmetric=symmetric, method=cfg.act_calibrator
        )
        return qz.scale_zero(lo, hi, bits, symmetric)

      # Static: one range per tensor, recorded by `calibrate` mode over N batches.
      def batch_range():
        lo, hi = qz.calibrate(x, reduce, bits=bits, symmetric=symmetric, method=cfg.act_calibrator)
        return lo.reshape(()), hi.reshape(())

      lo_v = self.variable("quant", f"{prefix}_lo", lambda: batch_range()[0])
      hi_v = self.variable("quant", f"{prefix}_hi", lambda: batch_range()[1])
      n_v = self.variable("quant", f"{prefix}_n", lambda: jnp.zeros((), jnp.float32))
      if self.mode == "calibrate" and not self.is_initializing():
        lo, hi = batch_range()
        n = n_v.value
        if cfg.act_calibrator == "absmax":  # the range over all batches
          new_lo, new_hi = jnp.minimum(lo_v.value, lo), jnp.maximum(hi_v.value, hi)
        else:  # percentile / mse: the mean of the per-batch ranges
          new_lo, new_hi = (lo_v.value * n + lo) / (n + 1), (hi_v.value * n + hi) / (n + 1)
        lo_v.value = jnp.where(n > 0, new_lo, lo)
        hi_v.value = jnp.where(n > 0, new_hi, hi)
        n_v.value = n + 1
      scale, zero = qz.scale_zero(lo_v.value, hi_v.value, bits, symmetric)
      return scale.reshape(shape), None if zero is None else zero.reshape(shape)

    # The weight scale variable serving reads: created at init (with the kernel's logical
    # names, so it shards with it), overwritten by `convert`.
    if weight and r_bits is not None and self.is_initializing():
      scale = weight_scale(rhs_t)[0]
      names = self._names(rc[-1], tile_size, set(w_reduce), rhs_t.ndim)
      self.variable("quant", "w_scale", _boxed(lambda *_: scale, names), None)

    if self.mode == "calibrate":
      if cfg.act_bits is not None:
        act_scale(lhs, "a", lc, a_sym)
        if not weight:
          act_scale(rhs, "b", rc, r_sym)
      return float_dot(lhs, rhs)

    if self.mode == "convert":
      if weight and r_bits is not None:
        scale, zero = weight_scale(rhs_t)
        if zero is not None:
          raise ValueError(
            f"{layer}: conversion needs symmetric weights (the integer path has no weight "
            "zero point); train with symmetric=True."
          )
        q = qz.quantize(rhs_t, scale, None, r_bits, r_sym).astype(jnp.int8).reshape(rhs.shape)
        self.put_variable("quant", "w_scale", scale)
        self.put_variable("quant", "w_int", q.astype(qz.storage_dtype(r_bits)))
      return float_dot(lhs, rhs)

    # The rhs scale: a weight's (dynamic, learned, or stored by `convert` for serving) or a
    # second activation's.
    r_scale = r_zero = None
    if not weight:
      r_scale, r_zero = act_scale(rhs, "b", rc, r_sym)
    elif r_bits is not None and self.mode == "serve":
      r_scale = self.get_variable("quant", "w_scale")
      if r_scale is None:
        raise ValueError(
          f"{layer}: serve mode reads the weight scales `convert` stores; convert the model "
          "first (compress.quant.convert)."
        )
    elif r_bits is not None:
      r_scale, r_zero = weight_scale(rhs_t)
    a_scale = a_zero = None
    if cfg.act_bits is not None:
      a_scale, a_zero = act_scale(lhs, "a", lc, a_sym)

    out_dtype = preferred_element_type or lhs.dtype
    x_hat, r_hat = lhs, rhs  # the fake-quantized operands (train): what gradients see
    if self.mode == "train":
      if cfg.act_bits is not None:
        g = None
        if cfg.lsq:  # LSQ's activation gradient scale: N = features per token
          g = 1.0 / math.sqrt(math.prod(lhs.shape[a] for a in lc) * qz.lsq_range(cfg.act_bits)[1])
        x_hat = _fake_quant(lhs, a_scale, a_zero, cfg.act_bits, a_sym, cfg.lsq, g)
      if r_bits is not None:
        g = None
        if cfg.lsq and not weight:
          g = 1.0 / math.sqrt(math.prod(rhs.shape[a] for a in rc) * qz.lsq_range(r_bits)[1])
        r_hat = _fake_quant(rhs_t, r_scale, r_zero, r_bits, r_sym, cfg.lsq, g).reshape(rhs.shape)
      if cfg.act_bits is None or r_bits is None or r_zero is not None:
        return float_dot(x_hat, r_hat)  # no integer form: weight- or activation-only, asymmetric w
    elif cfg.act_bits is None or r_bits is None:  # serve, weight-only: dequantize, float dot
      if r_bits is not None:
        q_r = rhs_t if jnp.issubdtype(rhs_t.dtype, jnp.integer) else None
        if q_r is None:
          q_r = qz.quantize(rhs_t, r_scale, None, r_bits, r_sym)
        r_hat = qz.dequantize(q_r, r_scale).reshape(rhs.shape).astype(lhs.dtype)
      if cfg.act_bits is not None:
        x_hat = qz.dequantize(
          qz.quantize(lhs, a_scale, a_zero, cfg.act_bits, a_sym), a_scale, a_zero
        )
      return float_dot(x_hat.astype(lhs.dtype), r_hat).astype(out_dtype)

    # The integer forward, the same in train and serve (so they agree bit for bit): int8
    # codes, an int32 accumulation, then the scales. In training the gradient is the
    # fake-quant one, d dot(x_hat, w_hat) (the straight-through estimator).
    if jnp.issubdtype(rhs_t.dtype, jnp.integer):
      q_r = rhs_t.astype(jnp.int8)
    else:
      q_r = qz.quantize(rhs_t, r_scale, r_zero, r_bits, r_sym).astype(jnp.int8)
    lhs_t = lhs
    if tile_size is not None:
      lhs_t = qz.tile(lhs, lc[-1], tile_size)
      a_scale = jnp.expand_dims(a_scale, lc[-1] + 1)
      a_zero = None if a_zero is None else jnp.expand_dims(a_zero, lc[-1] + 1)
    q_l = qz.quantize(lhs_t, a_scale, a_zero, cfg.act_bits, a_sym).astype(jnp.int8)
    y = _int_dot(q_l, q_r, a_scale, a_zero, r_scale, ldims, rdims, tile_size is not None, len(lb))
    y = lax.stop_gradient(y)
    if self.mode == "train":
      y = _ste_dot(x_hat, r_hat, y, dimension_numbers, precision)
    return y.astype(out_dtype)


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


def _fake_quant(x, scale, zero, bits, symmetric, lsq, grad_scale=None):
  if lsq:
    return qz.lsq_fake_quant(x, scale, bits, grad_scale)
  return qz.fake_quant(x, scale, zero, bits, symmetric)
