"""NF4 (QLoRA): the code against bitsandbytes' table, the grid, nearest values, packing, double
quantization, bits per parameter, and NF4 beating int4 on Gaussian weights."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.quant import nf4

# bitsandbytes' published NF4 table (csrc/kernels.cu, functional.py), float32 values.
BNB_NF4 = [
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
]


def _gaussian(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_code_matches_bitsandbytes():
  np.testing.assert_allclose(nf4.NF4_CODE, BNB_NF4, rtol=0, atol=1e-6)
  assert nf4.NF4_CODE.dtype == np.float32 and nf4.NF4_CODE[7] == 0.0


def test_ndtri():
  for p in (1e-6, 0.025, 0.3, 0.5, 0.8, 0.9677083, 0.999):
    x = nf4.ndtri(p)
    assert abs(0.5 * math.erfc(-x / math.sqrt(2)) - p) < 1e-15
  assert abs(nf4.ndtri(0.975) - 1.959963984540054) < 1e-12
  ps = np.array([0.01, 0.2, 0.6, 0.9677083], np.float32)
  np.testing.assert_allclose(
    [nf4.ndtri(float(p)) for p in ps], jax.scipy.special.ndtri(ps), atol=1e-5
  )
  with pytest.raises(ValueError):
    nf4.ndtri(1.0)


def test_on_grid_and_nearest():
  w = _gaussian((8, 48))  # 6 blocks of 64, across rows
  w[0, :16] = 0.0  # part of block 0 is zero
  w.reshape(-1)[128:192] = 0.0  # block 2 is all zero
  codes, absmax = nf4.quantize(jnp.asarray(w), block_size=64)
  codes, absmax = np.asarray(codes), np.asarray(absmax)
  assert codes.dtype == np.uint8 and codes.max() < 16 and absmax.dtype == np.float32
  w_B = w.reshape(-1, 64)
  np.testing.assert_array_equal(absmax, np.abs(w_B).max(axis=1))
  w_hat = np.asarray(nf4.dequantize(jnp.asarray(codes), jnp.asarray(absmax), w.shape))
  grid = absmax[:, None] * nf4.NF4_CODE[codes.reshape(-1, 64)]
  np.testing.assert_array_equal(w_hat.reshape(-1, 64), grid)
  # Brute force: no code value lies closer to the normalized weight than the chosen one.
  x = w_B.astype(np.float64) / np.where(absmax > 0, absmax, 1)[:, None]
  dist = np.abs(x[..., None] - nf4.NF4_CODE.astype(np.float64))
  chosen = np.take_along_axis(dist, codes.reshape(-1, 64)[..., None].astype(int), -1)[..., 0]
  assert np.all(chosen <= dist.min(-1) + 1e-7)
  assert np.mean(codes.reshape(-1, 64) == dist.argmin(-1)) > 0.999
  assert absmax[2] == 0 and np.all(codes[128:192] == 7)  # the all-zero block: code of 0
  assert np.all(w_hat[w == 0] == 0)  # 0 is exact, the block absmax is exact
  for b in range(w_B.shape[0]):
    assert np.abs(w_hat.reshape(-1, 64)[b]).max() == absmax[b]


def test_jit_equals_no_jit():
  w = jnp.asarray(_gaussian((4, 128), seed=1))
  codes, absmax = nf4.quantize(w)
  for fn, args in ((nf4.quantize, (w,)), (nf4.quantize_scales, (absmax,))):
    for a, b in zip(fn(*args), jax.jit(fn)(*args)):
      np.testing.assert_array_equal(a, b)
  roundtrip = jax.jit(nf4.nf4_roundtrip, static_argnames="double")
  np.testing.assert_array_equal(nf4.nf4_roundtrip(w, double=False), roundtrip(w, double=False))
  # Double-quantized: the codes agree; the scale back, code * scale + mean, may differ by an ulp
  # because XLA contracts the multiply-add into one FMA under jit.
  np.testing.assert_allclose(nf4.nf4_roundtrip(w), roundtrip(w, double=True), rtol=3e-7, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_pack_unpack(n):
  codes = jnp.asarray(np.random.default_rng(n).integers(0, 16, n), jnp.uint8)
  packed = nf4.pack(codes)
  assert packed.dtype == jnp.uint8 and packed.shape == (-(-n // 2),)
  np.testing.assert_array_equal(nf4.unpack(packed, n), codes)


def test_double_quantized_scales():
  absmax = jnp.asarray(np.abs(_gaussian((600,), seed=2)) + 1.0)  # 3 blocks, the last padded
  q, scale, mean = nf4.quantize_scales(absmax, block_size=256)
  assert q.dtype == jnp.int8 and q.shape == (600,) and scale.shape == (3,)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) <= 127
  np.testing.assert_allclose(mean, np.mean(np.asarray(absmax)), rtol=1e-6)
  back = nf4.dequantize_scales(q, scale, mean)
  bound = np.repeat(np.asarray(scale), 256)[:600] / 2  # half a step of an 8-bit grid
  assert np.all(np.abs(np.asarray(back) - np.asarray(absmax)) <= bound * (1 + 1e-5) + 1e-7)
  assert np.abs(np.asarray(back) - np.asarray(absmax)).max() > 0  # it did quantize


def test_bits_per_parameter():
  assert nf4.bits_per_parameter(double=False) == 4.5
  assert nf4.bits_per_parameter() == 4 + 8 / 64 + 32 / (64 * 256)
  assert round(nf4.bits_per_parameter(), 3) == 4.127


def _int4_rtn(w, block_size):
  """Symmetric int4 round to nearest, codes in [-7, 7], scale = block absmax / 7."""
  w_B = w.reshape(-1, block_size).astype(np.float64)
  scale = np.abs(w_B).max(axis=1, keepdims=True) / 7
  return (np.clip(np.round(w_B / scale), -7, 7) * scale).reshape(w.shape)


def nf4_vs_int4_mse(seed=3):
  w = _gaussian((256, 256), seed=seed)
  mse_nf4 = float(np.mean((np.asarray(nf4.nf4_roundtrip(jnp.asarray(w), double=False)) - w) ** 2))
  mse_dq = float(np.mean((np.asarray(nf4.nf4_roundtrip(jnp.asarray(w))) - w) ** 2))
  mse_int4 = float(np.mean((_int4_rtn(w, 64) - w) ** 2))
  return mse_nf4, mse_dq, mse_int4


def test_nf4_beats_int4_on_gaussian_weights():
  mse_nf4, mse_dq, mse_int4 = nf4_vs_int4_mse()
  assert mse_nf4 < 0.9 * mse_int4
  assert mse_dq < 0.9 * mse_int4 and mse_dq < 1.01 * mse_nf4


def test_bad_block_size():
  w = jnp.zeros((3, 10))
  for bad in (64, 0, -1, 7.0):
    with pytest.raises(ValueError, match="block_size"):
      nf4.quantize(w, block_size=bad)
  with pytest.raises(ValueError, match="block_size"):
    nf4.quantize_scales(jnp.ones(4), block_size=0)
