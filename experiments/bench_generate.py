"""Decoding speed: prefill and decode tokens/s of models.generate, float vs int8 KV cache.

    python -m experiments.bench_generate                              # tiny, CPU, seconds
    python -m experiments.bench_generate --preset llama-1b --dtype bfloat16 --batches 1,8,64

For each batch size and KV cache format: the prompt's prefill (one compiled call) and the whole
generation (prefill plus max_new_tokens - 1 decode steps in one compiled while loop), each the
median of `--repeats` timed calls after a compiling one. Decode tokens/s = batch x (new - 1) /
(generation - prefill). "bytes/step" is what one decode step must read at least (the weights
and the filled cache): on an accelerator, HBM bandwidth / bytes/step x batch bounds decode
tokens/s. Random weights: speed does not depend on their values. Writes `--out` (json) if
given.
"""

import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import models
from models import decode

_PRESET = flags.DEFINE_string("preset", "tiny", "A decoder preset (models.PRESETS).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per row.")
_KV = flags.DEFINE_list("kv_cache", ["float", "int8"], "KV cache formats.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per figure (median).")
_OUT = flags.DEFINE_string("out", None, "Write the rows as json here.")


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


def main(argv):
  del argv
  cfg = models.get_preset(_PRESET.value, dtype=_DTYPE.value)
  model = models.build(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  print(
    f"{_PRESET.value} {_DTYPE.value} on {jax.devices()[0].device_kind}: prompt {_PROMPT.value}, "
    f"{_NEW.value} new tokens, median of {_REPEATS.value}"
  )
  print("| batch | KV cache | prefill tok/s | decode tok/s | ms/step | KV bytes | bytes/step |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for batch in (int(b) for b in _BATCHES.value):
    for kv in _KV.value:
      r = measure(cfg, variables, batch, _PROMPT.value, _NEW.value, kv, _REPEATS.value)
      rows.append(r)
      print(
        f"| {batch} | {kv} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
        f"{r['decode_ms_per_step']:.2f} | {r['kv_cache_bytes']:,} | {r['bytes_per_step']:,} |",
        flush=True,
      )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"preset": _PRESET.value, "dtype": _DTYPE.value, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
