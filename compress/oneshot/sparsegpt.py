"""SparseGPT (Frantar & Alistarh 2023) and Wanda (Sun et al. 2023): one-shot pruning of a linear
layer from statistics of its inputs over calibration data.

Kernels are [in, out] (the papers' and the reference codes' W is [out, in]: its columns are our
rows). SparseGPT is GPTQ's loop with pruning: with H = sum x x^T and U upper triangular,
U^T U = (H + lambda I)^-1 (hessian.inverse_cholesky), for each input i in order

  q_i = w_i with its pruned entries zeroed (then quantized, with `bits`)
  err_i = (w_i - q_i) / U_ii;  w_j -= U_ij err_i  for j > i

in blocks of `block` inputs, the inputs after a block updated at once after it (lazy batch
updates). The mask is chosen as it goes, by the OBS saliency w^2 / U_ii^2 of the weights as they
are by then: unstructured, once per block over all of its [block, out] entries; N:M (prune_n of
every prune_m consecutive inputs, per output, as the reference's `prune_n, prune_m`), at every
prune_m-th input from the next prune_m rows. Wanda scores |w_ij| * ||x_i||_2 and compares the
scores per output: no update, just a mask.

  w_hat, keep = sparsegpt(w, h, sparsity=0.5)                     # unstructured, 50%
  w_hat, keep = sparsegpt(w, h, prune_n=2, prune_m=4, bits=4, scale_GxO=scale)  # 2:4 + int4
  keep = wanda(w, sq_norm, prune_n=2, prune_m=4)                  # sq_norm_I = sum_t x_ti^2
  jax.jit(sparsegpt, static_argnames=("sparsity", "prune_n", "prune_m", "block", "bits"))

Departures from the reference code (sparsegpt.py `fasterprune`, wanda's `prune_wanda`):
- Exact counts. The reference prunes `tmp <= sort(tmp)[int(numel * sparsity)]` per block, i.e.
  int(numel * sparsity) + 1 entries (more on ties). Here the layer prunes exactly
  floor(sparsity * in * out + 1/2) entries, block b exactly c(end_b) - c(start_b) of them with
  c(r) = floor(sparsity * r * out + 1/2) (so each block is within one entry of its share), ties
  broken by position as a stable sort: earlier input first, then earlier output. Wanda prunes
  floor(sparsity * in + 1/2) inputs per output (the reference: int(in * sparsity)), ties to the
  earlier input; N:M ties (both methods) go to the earlier input too.
- N:M needs `block` to be a multiple of prune_m: the reference starts a group at every
  prune_m-th input counted within the block, which only matches the layer's groups then (as
  with its default blocksize 128).
- Joint quantization uses a symmetric grid with scales fixed by the caller, one row per group
  of inputs (as gptq.py here), where the reference fits per-channel asymmetric ones on the fly.
As in the reference, dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed, and
lambda = damp * mean(diag H). Check the Hessian first (hessian.check_hessian): a singular one
gives NaNs here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compress.oneshot.grid import check_grid
from compress.oneshot.hessian import dead_inputs, inverse_cholesky


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_pattern(fn: str, n_in: int, sparsity, prune_n, prune_m):
  """Exactly one of `sparsity` in (0, 1) and an N:M pattern with 0 < prune_n < prune_m."""
  if isinstance(sparsity, jax.core.Tracer):
    raise ValueError(
      f"{fn}: sparsity is traced; it sets the mask's counts, so pass it as a Python float "
      "(static under jax.jit: static_argnames=('sparsity', ...))."
    )
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.number)):
    raise ValueError(f"{fn}: sparsity={sparsity!r}: give a fraction in [0, 1), e.g. 0.5.")
  if not 0 <= sparsity < 1:
    raise ValueError(
      f"{fn}: sparsity={sparsity!r} is outside [0, 1): give the fraction of weights to prune, "
      "e.g. 0.5 (1 would prune everything)."
    )
  for name, v in (("prune_n", prune_n), ("prune_m", prune_m)):
    if not _is_int(v):
      raise ValueError(f"{fn}: {name}={v!r}: give an integer (0 for no N:M pattern).")
  nm = prune_n != 0 or prune_m != 0
  if nm and sparsity:
    raise ValueError(
      f"{fn}: both sparsity={sparsity} and prune_n:prune_m={prune_n}:{prune_m} given: choose "
      "one, unstructured (sparsity) or N:M (prune_n, prune_m; the sparsity is then n/m)."
    )
  if not nm and not sparsity:
    raise ValueError(
      f"{fn}: nothing to prune: give sparsity (e.g. 0.5) or an N:M pattern "
      "(e.g. prune_n=2, prune_m=4)."
    )
  if nm:
    if prune_m < 1 or n_in % prune_m:
      raise ValueError(
        f"{fn}: prune_m={prune_m} does not divide the kernel's {n_in} inputs: give a group "
        f"size that does, e.g. one of {[m for m in (2, 4, 8, 16) if n_in % m == 0]}."
      )
    if not 0 < prune_n < prune_m:
      raise ValueError(
        f"{fn}: prune_n={prune_n} with prune_m={prune_m}: prune_n (the inputs pruned in every "
        f"group of prune_m) must lie in [1, {prune_m - 1}], e.g. prune_n=2, prune_m=4."
      )


def _check_quant(n_in: int, n_out: int, bits, scale_GxO, group_of_I):
  """bits in [2, 8] with scales [n_groups, out] (one row without group_of_I), or neither."""
  if bits is None:
    if scale_GxO is not None or group_of_I is not None:
      raise ValueError(
        "sparsegpt: scale_GxO / group_of_I given without bits: pass bits (e.g. 4) to quantize "
        "jointly, or drop them to prune only."
      )
    return
  if not _is_int(bits) or not 2 <= bits <= 8:
    raise ValueError(
      f"sparsegpt: bits={bits!r} is out of range: joint quantization supports integer bit "
      "widths from 2 to 8 (e.g. bits=4), or bits=None to prune only."
    )
  if scale_GxO is None:
    raise ValueError(
      f"sparsegpt: bits={bits} needs the grid's scales: pass scale_GxO of shape (1, {n_out}) "
      "(per-channel) or (n_groups, out) with group_of_I, e.g. max |w| per group / qmax."
    )
  check_grid("sparsegpt", n_in, n_out, scale_GxO, group_of_I)


def _check_kernel(fn: str, w_IxO):
  if np.ndim(w_IxO) != 2:
    raise ValueError(f"{fn}: the kernel must be [in, out]; got shape {np.shape(w_IxO)}.")


def _count(sparsity: float, size: int) -> int:
  """floor(sparsity * size + 1/2): how many of `size` entries a sparsity prunes."""
  return math.floor(sparsity * size + 0.5)


def _nm_prune(scores_IxO, prune_n: int, prune_m: int):
  """True on the prune_n lowest scores of every prune_m consecutive inputs, for each output.
  Ties: the earlier input is pruned first."""
  n_in, n_out = scores_IxO.shape
  self_ = scores_IxO.reshape(n_in // prune_m, prune_m, 1, n_out)
  other = scores_IxO.reshape(n_in // prune_m, 1, prune_m, n_out)
  pos = jnp.arange(prune_m)
  earlier = (pos[None, :] < pos[:, None])[None, :, :, None]  # [., self, other, .]
  rank = jnp.sum((other < self_) | ((other == self_) & earlier), axis=2)  # scores below self
  return (rank < prune_n).reshape(n_in, n_out)


def _smallest(scores, k):
  """True on the k (may be traced) lowest scores; ties: earlier in row-major order first."""
  flat = scores.reshape(-1)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (rank < k).reshape(scores.shape)


def _quant(w, scale, qmax: int):
  return scale * jnp.clip(jnp.round(w / scale), -qmax, qmax)


def sparsegpt(
  w_IxO,
  h_IxI,
  *,
  sparsity: float = 0.0,
  prune_n: int = 0,
  prune_m: int = 0,
  damp: float = 0.01,
  block: int = 128,
  bits: int | None = None,
  scale_GxO=None,
  group_of_I=None,
):
  """SparseGPT-pruned kernel and its mask: (w_hat [in, out], keep [in, out] bool).

  w_IxO: the kernel; h_IxI: sum_t x_t x_t^T of its inputs. Either `sparsity` (unstructured: that
  fraction of all entries, chosen per block) or `prune_n` of every `prune_m` consecutive inputs
  per output. damp: lambda as a fraction of mean(diag H). block: inputs per lazy batch update
  (the reference's blocksize; a partial last block is fine; with N:M a multiple of prune_m).
  bits: quantize the kept weights jointly, to scale_GxO[group_of_I[i]] * clip(round(w / scale),
  -qmax, qmax), qmax = 2^(bits-1) - 1 (group_of_I None: per-channel, scale_GxO [1, out]).

  w_hat is float32 (float64 for float64 inputs), exactly 0 where keep is False and on dead
  inputs. keep is the chosen mask (a dead input's weights are 0 whether kept or not). Jit with
  sparsity, prune_n, prune_m, block and bits static.
  """
  _check_kernel("sparsegpt", w_IxO)
  n_in, n_out = np.shape(w_IxO)
  _check_pattern("sparsegpt", n_in, sparsity, prune_n, prune_m)
  if np.shape(h_IxI) != (n_in, n_in):
    raise ValueError(
      f"sparsegpt: the Hessian has shape {np.shape(h_IxI)}; the kernel's {n_in} inputs need "
      f"({n_in}, {n_in}): H = sum x x^T over the layer's inputs."
    )
  if not _is_int(block) or block < 1:
    raise ValueError(f"sparsegpt: block={block!r}: give a positive number of inputs, e.g. 128.")
  block = min(block, n_in)
  if prune_m and block % prune_m:
    raise ValueError(
      f"sparsegpt: block={block} is not a multiple of prune_m={prune_m}: N:M groups must not "
      f"straddle blocks; give a block size that is, e.g. {prune_m * max(1, 128 // prune_m)}."
    )
  _check_quant(n_in, n_out, bits, scale_GxO, group_of_I)

  # Unstructured: entries pruned in each block, so that the first r inputs hold _count(r * out).
  ends = [min(b + block, n_in) for b in range(0, n_in, block)]
  cum = [_count(sparsity, e * n_out) for e in [0] + ends]
  counts_K = jnp.asarray(np.diff(cum), jnp.int32)

  dtype = jnp.result_type(w_IxO, h_IxI, jnp.float32)
  if bits is None:
    scale_GxO = jnp.ones((1, n_out), dtype)
  group_of_I = jnp.zeros(n_in, jnp.int32) if group_of_I is None else jnp.asarray(group_of_I)
  return _sparsegpt(
    jnp.asarray(w_IxO, dtype),
    jnp.asarray(h_IxI, dtype),
    counts_K,
    jnp.asarray(scale_GxO, dtype),
    group_of_I,
    damp,
    prune_n=prune_n,
    prune_m=prune_m,
    block=block,
    bits=bits,
  )


@functools.partial(jax.jit, static_argnames=("prune_n", "prune_m", "block", "bits"))
def _sparsegpt(
  w_IxO, h_IxI, counts_K, scale_GxO, group_of_I, damp, *, prune_n, prune_m, block, bits
):
  n_in, n_out = w_IxO.shape
  nm = prune_m > 0
  dead_I = dead_inputs(h_IxI)
  w_IxO = jnp.where(dead_I[:, None], 0, w_IxO)
  u_IxI = jnp.triu(inverse_cholesky(h_IxI, damp))

  # A partial last block: pad with inputs that are zero and decoupled (U = I there). They take
  # no update from the real ones (U[real, pad] = 0), rank last in the unstructured choice
  # (score +inf) and form whole N:M groups of their own (block % prune_m == 0); then cut off.
  n_pad = -n_in % block
  if n_pad:
    w_IxO = jnp.pad(w_IxO, ((0, n_pad), (0, 0)))
    u_IxI = jnp.pad(u_IxI, ((0, n_pad), (0, n_pad)))
    u_IxI = u_IxI.at[jnp.arange(n_in, n_in + n_pad), jnp.arange(n_in, n_in + n_pad)].set(1)
    group_of_I = jnp.pad(group_of_I, (0, n_pad))

  def one_block(b, carry):
    w_IxO, keep_IxO = carry
    i1 = b * block
    w_BxO = lax.dynamic_slice_in_dim(w_IxO, i1, block)
    u_BxB = lax.dynamic_slice(u_IxI, (i1, i1), (block, block))
    d_B = jnp.diag(u_BxB)
    groups_B = lax.dynamic_slice_in_dim(group_of_I, i1, block)
    if nm:
      prune_BxO = jnp.zeros((block, n_out), bool)  # filled group by group below
    else:  # OBS saliency over the whole block, from the weights as they are now
      score_BxO = w_BxO**2 / d_B[:, None] ** 2
      score_BxO = jnp.where((i1 + jnp.arange(block) < n_in)[:, None], score_BxO, jnp.inf)
      prune_BxO = _smallest(score_BxO, counts_K[b])

    def one_input(i, carry):
      w_BxO, prune_BxO, q_BxO, err_BxO = carry
      if nm:  # at a group's first input, its mask from the current (updated) weights
        w_MxO = lax.dynamic_slice_in_dim(w_BxO, i, prune_m)
        d_M = lax.dynamic_slice_in_dim(d_B, i, prune_m)
        group_MxO = _nm_prune(w_MxO**2 / d_M[:, None] ** 2, prune_n, prune_m)
        new_BxO = lax.dynamic_update_slice_in_dim(prune_BxO, group_MxO, i, axis=0)
        prune_BxO = jnp.where(i % prune_m == 0, new_BxO, prune_BxO)
      w_O = w_BxO[i]
      q_O = jnp.where(prune_BxO[i], 0, w_O)
      if bits is not None:
        q_O = _quant(q_O, scale_GxO[groups_B[i]], 2 ** (bits - 1) - 1)  # 0 stays 0
      err_O = (w_O - q_O) / u_BxB[i, i]
      w_BxO = w_BxO - u_BxB[i][:, None] * err_O[None, :]  # U upper: rows < i unchanged
      return w_BxO, prune_BxO, q_BxO.at[i].set(q_O), err_BxO.at[i].set(err_O)

    zeros = jnp.zeros_like(w_BxO)
    _, prune_BxO, q_BxO, err_BxO = lax.fori_loop(
      0, block, one_input, (w_BxO, prune_BxO, zeros, zeros)
    )
    # Lazy batch update of the inputs after the block: W[i2:] -= U[i1:i2, i2:]^T Err. U's rows
    # for the block are zero before i1, and the block's own rows are overwritten with Q below.
    u_BxI = lax.dynamic_slice_in_dim(u_IxI, i1, block)
    w_IxO = w_IxO - jnp.matmul(u_BxI.T, err_BxO, precision=lax.Precision.HIGHEST)
    w_IxO = lax.dynamic_update_slice_in_dim(w_IxO, q_BxO, i1, axis=0)
    keep_IxO = lax.dynamic_update_slice_in_dim(keep_IxO, ~prune_BxO, i1, axis=0)
    return w_IxO, keep_IxO

  keep_IxO = jnp.ones(w_IxO.shape, bool)
  n_blocks = (n_in + n_pad) // block
  w_IxO, keep_IxO = lax.fori_loop(0, n_blocks, one_block, (w_IxO, keep_IxO))
  return w_IxO[:n_in], keep_IxO[:n_in]


def wanda(w_IxO, sq_norm_I, *, sparsity: float = 0.0, prune_n: int = 0, prune_m: int = 0):
  """Wanda's keep mask [in, out] (bool): scores |w_ij| * ||x_i||_2, compared per output.

  sq_norm_I: sum over calibration tokens of x_i^2 (any positive multiple, e.g. the mean, gives
  the same mask). Unstructured: each output keeps all but floor(sparsity * in + 1/2) of its
  inputs; N:M: prunes prune_n of every prune_m consecutive inputs. Ties: the earlier input is
  pruned first. Apply as w * keep. Jit with sparsity, prune_n and prune_m static.
  """
  _check_kernel("wanda", w_IxO)
  n_in, _ = np.shape(w_IxO)
  _check_pattern("wanda", n_in, sparsity, prune_n, prune_m)
  if np.shape(sq_norm_I) != (n_in,):
    raise ValueError(
      f"wanda: sq_norm_I has shape {np.shape(sq_norm_I)}; the kernel's {n_in} inputs need "
      f"({n_in},): the sum over calibration tokens of each input's square."
    )
  dtype = jnp.result_type(w_IxO, sq_norm_I, jnp.float32)
  score_IxO = jnp.abs(jnp.asarray(w_IxO, dtype)) * jnp.sqrt(jnp.asarray(sq_norm_I, dtype))[:, None]
  if prune_m:
    return ~_nm_prune(score_IxO, prune_n, prune_m)
  rank_IxO = jnp.argsort(jnp.argsort(score_IxO, axis=0, stable=True), axis=0, stable=True)
  return rank_IxO >= _count(sparsity, n_in)
