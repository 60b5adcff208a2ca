"""GPTQ (Frantar et al. 2022): quantize a layer's inputs one at a time, each time moving the
rounding error onto the inputs not yet quantized so that ||X W - X W_hat|| stays small.

Kernels are [in, out] (the paper's and the reference code's W is [out, in]: its columns are our
rows). With H = sum x x^T over calibration tokens and U upper triangular, U^T U = (H + lambda I)^-1
(hessian.inverse_cholesky), Algorithm 1 is, for each input i in order:

  q_i = quant(w_i);  err_i = (w_i - q_i) / U_ii;  w_j -= U_ij err_i  for j > i

done in blocks of `block` inputs ("lazy batch updates"): inside a block the update reaches the
block's own rows only; after the block, the inputs after it get -U[block, rest]^T Err_block at once.
As in the reference code (gptq.py, `fasterquant`): dead inputs (H_ii = 0) get H_ii = 1 and their
weights zeroed; lambda = damp * mean(diag H); `act_order` quantizes inputs in descending diag H
and un-permutes the result. The scales are fixed beforehand, one row per group of inputs, and each
input reads its own group's row (the reference's `--static-groups`), so groups and act-order mix.

The grid is symmetric: w_hat = scale * clip(round(w / scale), -qmax, qmax), qmax = 2^(bits-1) - 1.

  w_hat = gptq(w, h, scale, bits=4)                       # per-channel: scale [1, out]
  w_hat = gptq(w, h, scale, 4, group_of, act_order=True)  # scale [n_groups, out], group_of [in]
  gptq_jit = jax.jit(gptq, static_argnames=("bits", "block", "act_order"))
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compress.oneshot.grid import check_grid
from compress.oneshot.hessian import dead_inputs, inverse_cholesky
from compress.quant.quantizers import check_bits


def _check(fn: str, w_IxO, scale_GxO, bits: int, group_of_I):
  """Bits, the kernel's rank and the grid (grid.check_grid)."""
  check_bits(bits, f"{fn}: bits")
  if np.ndim(w_IxO) != 2:
    raise ValueError(f"{fn}: the kernel must be [in, out]; got shape {np.shape(w_IxO)}.")
  check_grid(fn, *np.shape(w_IxO), scale_GxO, group_of_I)


def _dtype(*xs):
  """float32, or float64 for float64 inputs (under jax.enable_x64(True))."""
  return jnp.result_type(*xs, jnp.float32)


def _quant(w, scale, qmax: int):
  return scale * jnp.clip(jnp.round(w / scale), -qmax, qmax)


def rtn(w_IxO, scale_GxO, bits: int, group_of_I=None) -> jnp.ndarray:
  """Round-to-nearest on GPTQ's grid: scale[group_of[i]] * clip(round(w_i / scale), +-qmax)."""
  _check("rtn", w_IxO, scale_GxO, bits, group_of_I)
  dtype = _dtype(w_IxO, scale_GxO)
  scale_IxO = jnp.asarray(scale_GxO, dtype)[0 if group_of_I is None else jnp.asarray(group_of_I)]
  return _quant(jnp.asarray(w_IxO, dtype), scale_IxO, 2 ** (bits - 1) - 1)


def gptq(
  w_IxO,
  h_IxI,
  scale_GxO,
  bits: int,
  group_of_I=None,
  *,
  damp: float = 0.01,
  block: int = 128,
  act_order: bool = False,
) -> jnp.ndarray:
  """GPTQ-quantized kernel [in, out], values on the grid (float32; float64 for float64 inputs).

  w_IxO: the kernel; h_IxI: sum_t x_t x_t^T of its inputs; scale_GxO: the grid's scale per group
  of inputs and output (fixed, e.g. from the weights' absmax); group_of_I: each input's group
  (None: one group, per-channel). damp: lambda as a fraction of mean(diag H). block: inputs per
  lazy batch update (the reference's blocksize; a partial last block is fine). act_order: inputs
  in descending diag H. Jit with bits, block and act_order static.
  """
  _check("gptq", w_IxO, scale_GxO, bits, group_of_I)
  n_in = np.shape(w_IxO)[0]
  if np.shape(h_IxI) != (n_in, n_in):
    raise ValueError(
      f"gptq: the Hessian has shape {np.shape(h_IxI)}; the kernel's {n_in} inputs need "
      f"({n_in}, {n_in}): H = sum x x^T over the layer's inputs."
    )
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    raise ValueError(f"gptq: block={block!r}: give a positive number of inputs, e.g. 128.")
  group_of_I = jnp.zeros(n_in, jnp.int32) if group_of_I is None else jnp.asarray(group_of_I)
  dtype = _dtype(w_IxO, h_IxI, scale_GxO)
  return _gptq(
    jnp.asarray(w_IxO, dtype),
    jnp.asarray(h_IxI, dtype),
    jnp.asarray(scale_GxO, dtype),
    group_of_I,
    damp,
    bits=bits,
    block=min(block, n_in),
    act_order=act_order,
  )


@functools.partial(jax.jit, static_argnames=("bits", "block", "act_order"))
def _gptq(w_IxO, h_IxI, scale_GxO, group_of_I, damp, *, bits: int, block: int, act_order: bool):
  n_in = w_IxO.shape[0]
  qmax = 2 ** (bits - 1) - 1
  dead_I = dead_inputs(h_IxI)
  w_IxO = jnp.where(dead_I[:, None], 0, w_IxO)
  if act_order:  # by diag H after dead inputs' H_ii = 1, as the reference; ties in input order
    perm_I = jnp.argsort(jnp.where(dead_I, 1, jnp.diag(h_IxI)), descending=True, stable=True)
    w_IxO, h_IxI, group_of_I = w_IxO[perm_I], h_IxI[perm_I][:, perm_I], group_of_I[perm_I]
  u_IxI = jnp.triu(inverse_cholesky(h_IxI, damp))

  # A partial last block: pad with inputs that are zero and decoupled (U = I there), which
  # quantize to 0 with no error and receive no update from the real ones (U[real, pad] = 0).
  n_pad = -n_in % block
  if n_pad:
    w_IxO = jnp.pad(w_IxO, ((0, n_pad), (0, 0)))
    u_IxI = jnp.pad(u_IxI, ((0, n_pad), (0, n_pad)))
    u_IxI = u_IxI.at[jnp.arange(n_in, n_in + n_pad), jnp.arange(n_in, n_in + n_pad)].set(1)
    group_of_I = jnp.pad(group_of_I, (0, n_pad))

  def one_block(b, w_IxO):
    i1 = b * block
    w_BxO = lax.dynamic_slice_in_dim(w_IxO, i1, block)
    u_BxB = lax.dynamic_slice(u_IxI, (i1, i1), (block, block))
    groups_B = lax.dynamic_slice_in_dim(group_of_I, i1, block)

    def one_input(i, carry):  # Algorithm 1's inner loop, within the block
      w_BxO, err_BxO = carry
      w_O = w_BxO[i]
      q_O = _quant(w_O, scale_GxO[groups_B[i]], qmax)
      err_O = (w_O - q_O) / u_BxB[i, i]
      w_BxO = w_BxO - u_BxB[i][:, None] * err_O[None, :]  # U upper: rows < i unchanged
      return w_BxO.at[i].set(q_O), err_BxO.at[i].set(err_O)

    q_BxO, err_BxO = lax.fori_loop(0, block, one_input, (w_BxO, jnp.zeros_like(w_BxO)))
    # Lazy batch update of the inputs after the block: W[i2:] -= U[i1:i2, i2:]^T Err. U's rows
    # for the block are zero before i1, and the block's own rows are overwritten with Q below
    # (a static-shape product over all rows: twice the reference's flops, in one matmul).
    u_BxI = lax.dynamic_slice_in_dim(u_IxI, i1, block)
    w_IxO = w_IxO - jnp.matmul(u_BxI.T, err_BxO, precision=lax.Precision.HIGHEST)
    return lax.dynamic_update_slice_in_dim(w_IxO, q_BxO, i1, axis=0)

  q_IxO = lax.fori_loop(0, (n_in + n_pad) // block, one_block, w_IxO)[:n_in]
  if act_order:
    q_IxO = q_IxO[jnp.argsort(perm_I)]
  return q_IxO
