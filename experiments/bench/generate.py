"""Decoding speed of models.generate: one row per batch size and KV cache format.

The CLI is experiments/bench_generate.py; experiments/bench_device.py runs it on an accelerator.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

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


def measure(cfg, variables, batch, prompt_len, new, kv_cache, repeats=3) -> dict:
  """One row: prefill and decode tokens/s, KV-cache bytes, bytes one decode step reads."""
  model = decode.decoding_model(models.build(cfg), kv_cache)
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
    "kv_cache": kv_cache,
    "prefill_tok_s": batch * prompt_len / prefill_s,
    "decode_tok_s": batch * (new - 1) / max(whole_s - prefill_s, 1e-9),
    "decode_ms_per_step": 1e3 * (whole_s - prefill_s) / (new - 1),
    "kv_cache_bytes": kv_bytes,
    "bytes_per_step": params_bytes + kv_bytes,
  }
