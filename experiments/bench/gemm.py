"""Matmul throughput: one `lax.dot_general` in bf16, int8 x int8 -> int32 and fp8, raw and
through the quantized dense layer (compress.quant.QuantDot), timed on the first device.

    from experiments.bench import gemm
    gemm.raw("int8", 8192, 8192, 8192)      # -> TFLOP/s (2MNK / median seconds per call)

Timing (`seconds`): a compile call and a warm-up call, then `repeats` runs of `calls` calls
each, blocked on the last, so launches queue back to back as in a train step; the median of
the runs' per-call times. Inputs are random (a matmul of zeros can run faster than one of
real data), the same for every variant of a size.
"""

import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from compress import quant

DTYPES = ("bfloat16", "int8", "float8_e4m3fn")


def seconds(fn, args, calls: int = 10, repeats: int = 5) -> float:
  """Median seconds per call of `fn(*args)` (see the module docstring)."""
  for _ in range(2):  # compile; warm up (allocation, autotuning)
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def _operands(m, n, k, seed=0):
  ka, kb = jax.random.split(jax.random.key(seed))
  return jax.random.normal(ka, (m, k), jnp.float32), jax.random.normal(kb, (k, n), jnp.float32)


def raw(dtype: str, m: int, n: int, k: int, **timing) -> float:
  """TFLOP/s of an (m, k) x (k, n) dot in `dtype`: bf16 -> bf16; int8 codes -> int32; fp8
  (e4m3) -> bf16, the form XLA hands to the GPU's fp8 GEMM."""
  a, b = _operands(m, n, k)
  out = {"int8": jnp.int32, "float8_e4m3fn": jnp.bfloat16}.get(dtype)  # else: dtype
  if dtype == "int8":  # codes on the symmetric int8 grid
    a, b = (jnp.clip(jnp.round(v * 40), -127, 127).astype(jnp.int8) for v in (a, b))
  else:
    a, b = a.astype(dtype), b.astype(dtype)
  dims = (((1,), (0,)), ((), ()))
  dot = jax.jit(lambda x, y: lax.dot_general(x, y, dims, preferred_element_type=out))
  return 2 * m * n * k / seconds(dot, (a, b), **timing) / 1e12


def dense(cfg: quant.QuantConfig | None, m: int, n: int, k: int, **timing) -> float:
  """TFLOP/s of a bf16 `nn.Dense(n)` forward on (m, k) activations: float (`cfg` None), or
  served through QuantDot on the integer codes `quant.convert` makes (the activations are
  quantized per call: the whole serving cost, not the GEMM alone)."""
  x, _ = _operands(m, n, k, seed=1)
  x = x.astype(jnp.bfloat16)

  def layer(mode):
    policy = quant.Policy.of(("", cfg))  # a bare layer's path is ""
    hook = None if cfg is None else functools.partial(quant.QuantDot, policy, mode)
    return nn.Dense(n, use_bias=False, dtype=jnp.bfloat16, dot_general_cls=hook)

  variables = jax.jit(layer("train").init)(jax.random.key(0), x)
  if cfg is not None:
    convert = jax.jit(functools.partial(layer("convert").apply, mutable=["quant"]))
    variables = quant.convert(lambda v, a, mutable: convert(v, a), variables, x[:1])
  apply = jax.jit(layer("serve" if cfg is not None else "train").apply)
  return 2 * m * n * k / seconds(apply, (variables, x), **timing) / 1e12
