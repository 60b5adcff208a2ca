"""Decoding speed of models.generate: one row per batch size, weight format and KV cache
format.

The CLI is experiments/bench_generate.py; experiments/bench_device.py runs it on an accelerator.
"""

import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compress import quant
import models
from models import decode


def _median_s(fn, repeats):
  jax.block_until_ready(fn())  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def int8_serving(cfg, variables):
  """The int8 serving model of a float decoder and its variables, as a quantized run's
  export serves: int8 weight codes (a scale per output channel) and int8 activations with a
  scale per token, int8 x int8 -> int32 dots; the embedding table stays float."""
  policy = quant.Policy.of((".*", quant.QuantConfig(bits=8, act_bits=8, act_granularity="token")))
  build = lambda mode: models.build(  # noqa: E731
    cfg, dot_general_cls=functools.partial(quant.QuantDot, policy, mode)
  )
  ids = jnp.zeros((1, 1), jnp.int32)
  convert = lambda v: quant.convert(build("convert").apply, nn.unbox(v), ids)  # noqa: E731
  served = jax.jit(convert)(variables)
  return build("serve"), served


def measure(cfg, variables, batch, prompt_len, new, kv_cache, repeats=3, weights="float") -> dict:
  """One row: prefill and decode tokens/s, KV-cache bytes, bytes one decode step reads.
  `weights`: "float" (cfg's dtype) or "int8" (`int8_serving` of `variables`)."""
  if weights == "int8":
    model, variables = int8_serving(cfg, variables)
  elif weights == "float":
    model = models.build(cfg)
  else:
    raise ValueError(f"weights={weights!r}: choose 'float' or 'int8'.")
  model = decode.decoding_model(model, kv_cache)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
  mask = np.ones_like(ids)
  cache_len = prompt_len + new
  cache = decode.init_cache(model, variables, batch, cache_len)
  ids_a, mask_a, pos_a = decode.left_align(jnp.asarray(ids), jnp.asarray(mask))
  mask_s = jnp.concatenate([mask_a, jnp.ones((batch, new), jnp.int32)], -1)
  prefill = jax.jit(lambda v, c: decode.prefill(model, v, c, ids_a, mask_s, pos_a))
  prefill_s = _median_s(lambda: prefill(variables, cache), repeats)
  whole_s = _median_s(
    lambda: models.generate(model, variables, ids, mask, max_new_tokens=new), repeats
  )
  params_bytes = _nbytes(variables["params"])
  kv_bytes = _nbytes(cache)
  return {
    "batch": batch,
    "weights": weights,
    "kv_cache": kv_cache,
    "prefill_tok_s": batch * prompt_len / prefill_s,
    "decode_tok_s": batch * (new - 1) / max(whole_s - prefill_s, 1e-9),
    "decode_ms_per_step": 1e3 * (whole_s - prefill_s) / (new - 1),
    "kv_cache_bytes": kv_bytes,
    "bytes_per_step": params_bytes + kv_bytes,
  }
