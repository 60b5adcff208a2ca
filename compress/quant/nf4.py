"""QLoRA's 4-bit NormalFloat (NF4) weight format as pure functions (Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 3).

  code      16 values: quantiles of N(0, 1), 8 positive and 7 negative plus an exact 0,
            normalized to [-1, 1] (`NF4_CODE`; bitsandbytes' create_normal_map)
  quantize  the flattened weight in blocks of `block_size` (64); each block is scaled by its
            absmax into [-1, 1] and every value takes the index of the nearest code value
  double    the float32 absmaxes, less their mean, are quantized again to 8 bits in blocks
            of 256 scales with one float32 scale each ("Double Quantization")
  storage   two 4-bit codes a byte (`pack`): 4 + 32/64 = 4.5 bits a parameter, or
            4 + 8/64 + 32/(64 * 256) ~ 4.127 with double quantization (`bits_per_parameter`)

    codes, absmax = nf4.quantize(w)
    w_hat = nf4.dequantize(codes, absmax, w.shape, w.dtype)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

NF4_OFFSET = 0.9677083  # bitsandbytes: the outermost quantile, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def ndtri(p: float) -> float:
  """The inverse of the standard normal CDF, in float64: bisection on 0.5 erfc(-x / sqrt 2)."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"ndtri(p={p!r}): p must lie in (0, 1).")
  lo, hi = -40.0, 40.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
      lo = mid
    else:
      hi = mid
    if hi - lo <= 1e-17 * max(1.0, abs(mid)):
      break
  return 0.5 * (lo + hi)


def normal_code(offset: float = NF4_OFFSET) -> np.ndarray:
  """The NF4 code as float32[16], ascending: the asymmetric construction of create_normal_map
  (use_extra_value=True). 8 positive quantiles from probabilities linspace(offset, 0.5, 9)
  (0.5 itself dropped) and 7 negative ones from linspace(offset, 0.5, 8), an exact 0, divided
  by the largest. The probabilities are float32, as torch.linspace makes them there."""
  pos = [ndtri(float(p)) for p in np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1]]
  neg = [-ndtri(float(p)) for p in np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1]]
  values = np.sort(np.array(pos + [0.0] + neg, np.float64))
  return (values / values.max()).astype(np.float32)


NF4_CODE = normal_code()
# Decision boundaries: a normalized value goes to the code on its side of each midpoint.
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


def _blocks(w, block_size: int) -> jax.Array:
  """w flattened into float32[n // block_size, block_size]. The size must divide: no padding."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size={block_size!r}: must be a positive integer.")
  n = math.prod(w.shape)
  if n % block_size:
    raise ValueError(
      f"block_size={block_size} does not divide the {n} elements of a weight of shape "
      f"{tuple(w.shape)}: NF4 blocks are not padded, choose a block_size that divides {n}."
    )
  return jnp.reshape(w, (n // block_size, block_size)).astype(jnp.float32)


def quantize(w, block_size: int = 64) -> tuple[jax.Array, jax.Array]:
  """(codes uint8[n] in [0, 16), absmax float32[n // block_size]) of w flattened: each block
  divided by its absmax, each value the index of the nearest NF4 value (ties to the lower).
  An all-zero block keeps absmax 0 and codes of the exact 0."""
  w_NxB = _blocks(w, block_size)
  absmax_N = jnp.max(jnp.abs(w_NxB), axis=1)
  # A multiplication by the reciprocal, the form XLA gives a division by a broadcast under jit:
  # so jit and no jit agree bit for bit (as in fp8.py).
  x_NxB = w_NxB * (1 / jnp.where(absmax_N > 0, absmax_N, 1.0))[:, None]
  codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), x_NxB, side="left")
  return codes.reshape(-1).astype(jnp.uint8), absmax_N


def dequantize(codes, absmax, shape, dtype=jnp.float32) -> jax.Array:
  """absmax_block * NF4_CODE[codes], reshaped to `shape` and cast to `dtype`."""
  values_NxB = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)].reshape(absmax.shape[0], -1)
  return (values_NxB * absmax[:, None].astype(jnp.float32)).reshape(shape).astype(dtype)


def quantize_scales(absmax, block_size: int = 256) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Double quantization: (codes int8[n], scale float32[ceil(n / block_size)], mean float32)
  of the absmaxes. The absmaxes less their mean are quantized in blocks of `block_size` with
  *symmetric int8* absmax scaling (code in [-127, 127], scale = block absmax / 127) where QLoRA
  uses an 8-bit float; the last block is padded with zeros (scales are few, padding is cheap)."""
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size={block_size!r}: must be a positive integer.")
  absmax = absmax.astype(jnp.float32)
  n = absmax.shape[0]
  mean = jnp.mean(absmax)
  pad = -n % block_size
  c_MxS = jnp.pad(absmax - mean, (0, pad)).reshape(-1, block_size)
  amax_M = jnp.max(jnp.abs(c_MxS), axis=1)
  scale_M = jnp.where(amax_M > 0, amax_M * (1 / 127), 1.0)
  q_MxS = jnp.clip(jnp.round(c_MxS * (1 / scale_M)[:, None]), -127, 127)
  return q_MxS.reshape(-1)[:n].astype(jnp.int8), scale_M, mean


def dequantize_scales(codes, scale, mean, block_size: int = 256) -> jax.Array:
  """The absmaxes back from `quantize_scales` (same block_size): codes * block scale + mean."""
  n = codes.shape[0]
  scale_n = jnp.repeat(scale, block_size)[:n]
  return codes.astype(jnp.float32) * scale_n + mean


def bits_per_parameter(block_size: int = 64, scale_block: int = 256, double: bool = True) -> float:
  """Storage a parameter takes: 4 + 32 / block_size with float32 absmaxes, or
  4 + 8 / block_size + 32 / (block_size * scale_block) with double quantization (the mean, one
  float32 for the whole weight, is left out, as in the paper)."""
  if double:
    return 4 + 8 / block_size + 32 / (block_size * scale_block)
  return 4 + 32 / block_size


def pack(codes) -> jax.Array:
  """uint8[ceil(n / 2)]: two 4-bit codes a byte, the even-indexed one in the low nibble; an odd
  length is padded with a 0 code."""
  codes = codes.reshape(-1).astype(jnp.uint8)
  codes = jnp.pad(codes, (0, codes.shape[0] % 2)).reshape(-1, 2)
  return codes[:, 0] | (codes[:, 1] << 4)


def unpack(packed, n: int) -> jax.Array:
  """The first n codes of `pack`'s bytes, uint8[n]."""
  packed = packed.astype(jnp.uint8)
  return jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:n]


def nf4_roundtrip(w, block_size: int = 64, double: bool = True) -> jax.Array:
  """w quantized to NF4 and back, its absmaxes double-quantized (blocks of 256) if `double`."""
  codes, absmax = quantize(w, block_size)
  if double:
    absmax = dequantize_scales(*quantize_scales(absmax))
  return dequantize(codes, absmax, w.shape, w.dtype)
