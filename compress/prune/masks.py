"""Masks from scores, as pure functions that run unchanged on sharded arrays.

Convention: a score says how much an element is worth keeping; a mask is True where the
element is kept. Every selection is exact: `smallest` prunes exactly k elements (ties
broken by position, as a stable sort would), and does so without sorting or gathering:
it bisects on the bit pattern of the scores, and each bisection step is one count, which
on a sharded array is a local count plus an all-reduce of one integer.

    keep = smallest([scores], k=round(0.9 * scores.size))[0] == False
    keep = nm_keep(scores, n_prune=2, m=4, axis=-2)   # 2:4 along the input dimension
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_TOP = np.uint32(0x80000000)  # numpy: importing must not start a JAX backend


def order_key(x: jax.Array) -> jax.Array:
  """float -> uint32 with the same order (-0.0 == 0.0; every NaN above +inf)."""
  x = x.astype(jnp.float32)
  x = jnp.where(x == 0, 0.0, jnp.where(jnp.isnan(x), jnp.nan, x))  # one zero, one (+) NaN
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >= _TOP, ~bits, bits | _TOP)


def flat_index(shape) -> jax.Array:
  """Row-major position of every element (int32), built from iotas so it shards."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return idx


def target_count(sparsity, size: int) -> jax.Array:
  """floor(sparsity * size + 0.5) as int32: how many of `size` units a sparsity prunes.

  Computed in float32 (the sparsity may be traced): exact for size < 2**24; above, within
  the float32 rounding of the product (a few units in ten million).
  """
  s = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  return jnp.floor(s * size + 0.5).astype(jnp.int32)


def smallest(
  scores: Sequence[jax.Array], k, weights: Sequence[int] | None = None
) -> list[jax.Array]:
  """Marks (True) the k smallest elements across `scores`, a list of arrays.

  Ties are broken by position: earlier arrays first, then row-major order, so the result
  equals a stable argsort of the concatenated, flattened scores. With `weights`, element
  i of array j counts weights[j] units (e.g. a group of that many weights) and the
  smallest elements are taken until at least k units are marked.

  Nothing is sorted or gathered: a 32-step bisection over the uint32 order keys finds
  the threshold t (the smallest key with count(key <= t) >= k); if that overshoots, a
  second bisection over positions takes just enough of the elements equal to t. Counts
  are int32, so the weighted total must stay below 2**31.
  """
  keys = [order_key(s) for s in scores]
  weights = list(weights or [1] * len(keys))
  k = jnp.asarray(k, jnp.int32)

  def count(pred) -> jax.Array:
    return sum(w * jnp.sum(pred(x), dtype=jnp.int32) for x, w in zip(keys, weights))

  def halve(_, bounds):
    lo, hi = bounds  # the threshold lies in [lo, hi]
    mid = lo + (hi - lo) // 2
    enough = count(lambda x: x <= mid) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  t, _ = lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))

  def all_ties():
    return [x <= t for x in keys]

  def some_ties():
    # Units still to take from the elements equal to t, array by array in order.
    need = k - count(lambda x: x < t)
    ties = [x == t for x in keys]
    before, wants = jnp.int32(0), []
    for tie, w in zip(ties, weights):
      n = w * jnp.sum(tie, dtype=jnp.int32)
      wants.append(jnp.clip(need - before, 0, n))
      before = before + n
    idx = [flat_index(x.shape) for x in keys]

    def halve_pos(_, bounds):  # per array: smallest j with w * #(tie & idx < j) >= want
      out = []
      for (lo, hi), tie, ix, want, w in zip(bounds, ties, idx, wants, weights):
        mid = lo + (hi - lo) // 2
        enough = w * jnp.sum(tie & (ix < mid), dtype=jnp.int32) >= want
        out.append((jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)))
      return out

    start = [(jnp.int32(0), jnp.int32(x.size)) for x in keys]
    steps = max(x.size for x in keys).bit_length()
    ends = lax.fori_loop(0, steps, halve_pos, start)
    return [(x < t) | (tie & (ix < j)) for x, tie, ix, (j, _) in zip(keys, ties, idx, ends)]

  return lax.cond(count(lambda x: x <= t) == k, all_ties, some_ties)


def nm_keep(scores: jax.Array, n_prune, m: int, axis: int) -> jax.Array:
  """Keep mask pruning the `n_prune` smallest of every m consecutive elements along `axis`
  (ties: the earlier element goes first). `n_prune` may be traced (gradual N:M).

  The groups are ranked in place (no moveaxis), so the mask keeps the scores' layout."""
  x = order_key(scores)
  axis, shape = axis % x.ndim, x.shape
  x = x.reshape(*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])
  a, b = jnp.expand_dims(x, axis + 2), jnp.expand_dims(x, axis + 1)  # [.., i, j, ..]
  pos = jnp.arange(m)
  earlier = (pos[None, :] < pos[:, None]).reshape((m, m) + (1,) * (len(shape) - axis - 1))
  rank = jnp.sum((b < a) | ((b == a) & earlier), axis=axis + 2)  # elements ranked below i
  return (rank >= n_prune).reshape(shape)


def block_scores(scores: jax.Array, block: tuple[int, int]) -> jax.Array:
  """Mean score of each (rows, cols) block of the last two axes."""
  r, c = block
  *lead, rows, cols = scores.shape
  x = scores.reshape(*lead, rows // r, r, cols // c, c)
  return x.mean(axis=(-3, -1))


def expand_blocks(keep: jax.Array, block: tuple[int, int]) -> jax.Array:
  """A per-block mask back to per-element."""
  r, c = block
  return jnp.repeat(jnp.repeat(keep, r, axis=-2), c, axis=-1)
