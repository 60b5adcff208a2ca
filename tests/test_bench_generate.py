"""The decoding benchmark runs and counts its bytes (its figures are printed, not tested)."""

import jax
import jax.numpy as jnp

import models
from experiments.bench import generate as bench_generate


def test_one_row_per_cache_format():
  cfg = models.ModelConfig(vocab_size=64, d_model=32, d_ff=64, max_len=32)
  variables = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rows = {
    kv: bench_generate.measure(cfg, variables, 2, 8, 4, kv, repeats=1) for kv in ("float", "int8")
  }
  # float32 keys and values: 2 layers x (K, V) x batch 2 x 12 slots x 4 heads x 8 dims x 4 bytes
  assert rows["float"]["kv_cache_bytes"] == 2 * 2 * 2 * 12 * 4 * 8 * 4
  # int8: a byte per value and a float32 scale per token and head
  assert rows["int8"]["kv_cache_bytes"] == 2 * 2 * 2 * 12 * 4 * (8 + 4)
  assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())


def test_int8_weights_row_reads_fewer_bytes():
  """The int8 serving model's row: int8 codes for every dense kernel, so a decode step reads
  fewer bytes than the float model's."""
  cfg = models.ModelConfig(vocab_size=64, d_model=32, d_ff=64, max_len=32)
  variables = models.build(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  f = bench_generate.measure(cfg, variables, 2, 8, 4, "float", repeats=1)
  q = bench_generate.measure(cfg, variables, 2, 8, 4, "float", repeats=1, weights="int8")
  assert q["weights"] == "int8" and q["decode_tok_s"] > 0
  assert q["kv_cache_bytes"] == f["kv_cache_bytes"]
  kernels = sum(x.size for x in jax.tree.leaves(variables["params"]) if x.ndim == 2) - 64 * 32
  # each kernel value: 4 bytes -> 1 byte (plus a float32 scale per output channel)
  assert f["bytes_per_step"] - q["bytes_per_step"] > 2.5 * kernels
