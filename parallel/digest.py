"""A content digest of a pytree of (sharded) arrays, computed where the shards live.

A flipped bit in a checkpoint's data files often still decodes, into a wrong value that
nothing notices. The digest of every leaf is saved beside the checkpoint and compared after
a restore. Per leaf: sum over elements i of fmix32(bits_i ^ fmix32(i)) mod 2^32, where bits_i
is element i's bit pattern as uint32 (two words for 8-byte types) and fmix32 is MurmurHash3's
finalizer. A sum of 32-bit integers wraps exactly, so the digest of a global array is the same
under any mesh or sharding and in any reduction order: a checkpoint restored onto another
mesh verifies too. One jitted pass over the state; fetching the digests syncs the host.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """x's bit patterns as uint32, same shape (8-bit and 16-bit types widened; 64-bit types
  split into a trailing axis of two words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf(x) -> jax.Array:
  w = _words(x)
  i = jnp.zeros(w.shape, jnp.uint32)  # the row-major position, without a (sharded) reshape
  for axis in range(w.ndim):
    i = i * jnp.uint32(w.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis)
  return jnp.sum(_fmix32(w ^ _fmix32(i + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


_digests = jax.jit(lambda tree: jax.tree.map(_leaf, tree))


def digest(tree) -> dict[str, str]:
  """{leaf path ("params/layers_0/mlp/wi/kernel"): 8 hex digits} of a pytree of arrays."""
  values = _digests(tree)  # replicated scalars: every process reads its own copy
  values = jax.tree.map(lambda v: np.asarray(v.addressable_data(0)), values)
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(values)[0]:
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = f"{int(np.uint32(v)):08x}"
  return out


def mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
  """The leaves whose digest differs (or that one side lacks)."""
  return sorted(k for k in saved.keys() | restored.keys() if saved.get(k) != restored.get(k))
