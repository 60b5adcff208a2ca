"""Decoding speed: prefill and decode tokens/s of models.generate, float vs int8 weights,
float vs int8 KV cache.

    python -m experiments.bench_generate                              # tiny, CPU, seconds
    python -m experiments.bench_generate --preset llama-1b --dtype bfloat16 --batches 1,8,64

For each batch size, weight format and KV cache format: the prompt's prefill (one compiled call) and the whole
generation (prefill plus max_new_tokens - 1 decode steps in one compiled while loop), each the
median of `--repeats` timed calls after a compiling one. Decode tokens/s = batch x (new - 1) /
(generation - prefill). "bytes/step" is what one decode step must read at least (the weights
and the filled cache): on an accelerator, HBM bandwidth / bytes/step x batch bounds decode
tokens/s. int8 weights: the serving model of a quantized run's integer export (int8 weight
codes, int8 activations with a scale per token, int8 x int8 -> int32 dots; the embedding table
float). Random weights: speed does not depend on their values. Writes `--out` (json) if given.
"""

import json

from absl import app, flags
import jax
import jax.numpy as jnp

import models
from experiments.bench import generate

_PRESET = flags.DEFINE_string("preset", "tiny", "A decoder preset (models.PRESETS).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "64"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per row.")
_KV = flags.DEFINE_list("kv_cache", ["float", "int8"], "KV cache formats.")
_WEIGHTS = flags.DEFINE_list("weights", ["float", "int8"], "Weight formats.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per figure (median).")
_OUT = flags.DEFINE_string("out", None, "Write the rows as json here.")


def main(argv):
  del argv
  cfg = models.get_preset(_PRESET.value, dtype=_DTYPE.value)
  model = models.build(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  print(
    f"{_PRESET.value} {_DTYPE.value} on {jax.devices()[0].device_kind}: prompt {_PROMPT.value}, "
    f"{_NEW.value} new tokens, median of {_REPEATS.value}"
  )
  print(
    "| batch | weights | KV cache | prefill tok/s | decode tok/s | ms/step | KV bytes "
    "| bytes/step |"
  )
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for batch in (int(b) for b in _BATCHES.value):
    for w in _WEIGHTS.value:
      for kv in _KV.value:
        r = generate.measure(
          cfg, variables, batch, _PROMPT.value, _NEW.value, kv, _REPEATS.value, weights=w
        )
        rows.append(r)
        print(
          f"| {batch} | {w} | {kv} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
          f"{r['decode_ms_per_step']:.2f} | {r['kv_cache_bytes']:,} | {r['bytes_per_step']:,} |",
          flush=True,
        )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"preset": _PRESET.value, "dtype": _DTYPE.value, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
