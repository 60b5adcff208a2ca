"""The optax side of QAT: learned step sizes get their own treatment; weights can be kept
on the quantization grid. Everything is a GradientTransformation, so it chains with any
optimizer and with pruning.

    tx = quant.split_optimizer(optax.adamw(lr, mask=quant.decay_mask), optax.adam(lr / 10))
    tx = optax.chain(tx, quant.keep_on_grid(bits=8))
"""

import re

import jax
import jax.numpy as jnp
import optax

from compress.quant import quantizers as qz
from compress.tree import path_name

STEP_NAMES = ("w_step", "a_step", "b_step")  # LSQ's learned step sizes (QuantDot params)


def is_step(path) -> bool:
  return path_name(path).rsplit("/", 1)[-1] in STEP_NAMES


def without_steps(params: dict) -> dict:
  """The nested params dict minus the LSQ step sizes (to re-initialize them)."""
  if not isinstance(params, dict):
    return params
  return {k: without_steps(v) for k, v in params.items() if k not in STEP_NAMES}


def labels(params):
  """ "steps" for LSQ step sizes, "weights" for everything else."""
  return jax.tree_util.tree_map_with_path(lambda p, _: "steps" if is_step(p) else "weights", params)


def split_optimizer(
  weights_tx: optax.GradientTransformation, steps_tx: optax.GradientTransformation
) -> optax.GradientTransformation:
  """`weights_tx` for the model's weights, `steps_tx` (e.g. no weight decay, another
  learning rate) for the learned step sizes."""
  return optax.multi_transform({"weights": weights_tx, "steps": steps_tx}, labels)


def decay_mask(params):
  """Weight decay on weight matrices: not on biases (even the (heads, head_dim) ones of
  attention), norm scales or step sizes."""

  def decay(path, x):
    name = path_name(path).rsplit("/", 1)[-1]
    return x.ndim >= 2 and name not in ("bias", "scale") and not is_step(path)

  return jax.tree_util.tree_map_with_path(decay, params)


def keep_on_grid(
  bits: int, symmetric: bool = True, *, select: str, reduce_axes=None
) -> optax.GradientTransformation:
  """Makes the updated weights lie on the quantization grid: u' = q(w + u) - w.

  Chain it last. Leaves whose path matches `select` (re.search; e.g. the model's weight
  matrices, r"kernel$") are projected; their scales come from their own absmax over
  `reduce_axes` (None: the whole tensor).
  """
  qz.check_bits(bits)
  pattern = re.compile(select)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("keep_on_grid needs the params: call tx.update(grads, state, params).")

    def project(path, u, w):
      if not pattern.search(path_name(path)) or not jnp.issubdtype(w.dtype, jnp.floating):
        return u
      new = w + u
      axes = tuple(range(new.ndim)) if reduce_axes is None else reduce_axes
      lo, hi = qz.calibrate(new, axes, bits=bits, symmetric=symmetric)
      scale, zero = qz.scale_zero(lo, hi, bits, symmetric)
      return qz.dequantize(qz.quantize(new, scale, zero, bits, symmetric), scale, zero) - w

    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
