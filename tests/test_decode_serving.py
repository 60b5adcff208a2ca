"""Serving a decoder: the jax.export artifact (models/export.py) against the live functions, and
int8 weights (compress.quant's integer export) through models.generate's cached decode path."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from compress import quant
from compress.quant import Policy, QuantConfig, QuantDot
from models import decode, export

from quant_helpers import draw, param_shapes
from test_generate import _prompts  # three prompts: full, right- and left-padded

_S = models.structure()
MATRICES = f"{_S.weights}|{_S.embeddings}"  # the float matrices storage_bits rounds
V, N = 96, 12  # V: test_generate's vocabulary, which its prompts draw from
CFG = dict(vocab_size=V, d_model=32, d_ff=64, max_len=48)


def _float_model(**kw):
  model = models.build(models.ModelConfig(**CFG, **kw))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # Larger weights than the init's: peaked logits, so argmax is not decided by rounding.
  return model, jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, variables)


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_exported_decoder_equals_the_live_functions(tmp_path, monkeypatch, kv_cache):
  model, variables = _float_model(kv_cache=kv_cache)
  ids, mask = _prompts()
  want, want_logps = models.generate(model, variables, ids, mask, max_new_tokens=N)
  meta = export.export_decoder(model, variables, 3, ids.shape[1], N, tmp_path)
  assert (meta["batch"], meta["prompt_len"], meta["cache_len"]) == (3, 7, 7 + N)
  assert (meta["vocab"], meta["kv_cache"]) == (V, kv_cache)
  assert {p.name for p in tmp_path.iterdir()} >= {"prefill.bin", "decode.bin", "variables.npz"}

  ids_a, mask_a, pos_a = decode.left_align(jnp.asarray(ids), jnp.asarray(mask))
  mask_s = jnp.concatenate([mask_a, jnp.ones((3, N), jnp.int32)], -1)
  dec = decode.decoding_model(model)
  live_logits, _ = decode.prefill(
    dec, variables, decode.init_cache(dec, variables, 3, 7 + N), ids_a, mask_s, pos_a
  )

  def refuse(*args, **kwargs):
    raise AssertionError("the loaded decoder ran model code")

  # Loading and generating read files and run the deserialized programs only.
  monkeypatch.setattr(models.transformer.Decoder, "apply", refuse)
  monkeypatch.setattr(nn.Module, "apply", refuse)
  monkeypatch.setattr(nn.Module, "init", refuse)
  served = export.load_decoder(tmp_path)
  logits, _ = served.prefill(served.cache, ids_a, mask_s, pos_a)
  np.testing.assert_allclose(logits, live_logits, atol=1e-6, rtol=0)
  tokens, logps = served.generate(ids_a, mask_a, N)
  np.testing.assert_array_equal(tokens, want)
  np.testing.assert_allclose(logps, want_logps, atol=1e-5)
  assert len(set(np.asarray(tokens).ravel().tolist())) > 3  # not one repeated token


def _quant_models():
  """The tiny decoder with int8 weights and activations (every dense layer and the tied head):
  a builder per QuantDot mode, its float params and an example input."""
  cfg = models.ModelConfig(**CFG)
  # Activations at 8 bits per token: a per-tensor dynamic scale is the absmax over whatever
  # tokens one call holds, so a cached step (one token) and the whole sequence would round
  # activations differently (observed: logits 0.094 apart), by design rather than by a bug.
  policy = Policy.of((".*", QuantConfig(bits=8, act_bits=8, act_granularity="token")))

  def build(mode):
    return models.build(cfg, dot_general_cls=functools.partial(QuantDot, policy, mode))

  ids = jnp.zeros((1, 4), jnp.int32)
  params = draw(param_shapes(build("train"), ids), std=0.3)
  return build, params, ids


@pytest.fixture(scope="module")
def int8_serving(tmp_path_factory):
  build, params, ids = _quant_models()
  serving = quant.convert(build("convert").apply, {"params": params}, ids[:, :1])
  directory = tmp_path_factory.mktemp("int8")
  # "codes": kernels as int8 codes, the embedding table float. "tables": storage_bits=8 rounds
  # the table per row too, a real change of the model: free-running greedy tokens then agreed
  # 0.83 of the time (each row follows the fake-quant one until a near tie), teacher-forced 0.94.
  quant.save(directory / "codes", serving)
  quant.save(directory / "tables", serving, storage_bits=8, matrices=MATRICES)
  return build, params, quant.load(directory / "codes"), quant.load(directory / "tables")


def test_int8_weights_generate_like_the_fake_quant_model(int8_serving):
  build, params, loaded, _ = int8_serving
  ids, mask = _prompts()
  serve, _ = models.generate(build("serve"), loaded, ids, mask, max_new_tokens=N)
  train, _ = models.generate(build("train"), {"params": params}, ids, mask, max_new_tokens=N)
  agree = float(np.mean(np.asarray(serve) == np.asarray(train)))
  print(f"int8 serve vs fake-quant greedy tokens: {agree:.3f} agree")
  assert agree >= 0.9, agree  # observed 1.0: train runs serve's integer forward


def test_int8_serving_cached_logits_equal_the_full_sequence(int8_serving):
  """Teacher-forced, as tests/test_generate.py: prefill 5 tokens, then one per step."""
  build, _, loaded, _ = int8_serving
  model = build("serve")
  ids, mask = _prompts(width=12)
  ids_a, mask_a, pos_a = decode.left_align(jnp.asarray(ids), jnp.asarray(mask))
  full = model.apply(loaded, ids_a, attention_mask=mask_a, positions=pos_a)
  dec = decode.decoding_model(model)
  cache = decode.init_cache(dec, loaded, 3, 12)
  real = np.asarray(mask_a).astype(bool)
  worst = 0.0

  def check(logits, i):
    np.testing.assert_allclose(logits[real[:, i]], full[real[:, i], i], atol=1e-4, rtol=0)
    return float(np.max(np.abs(logits[real[:, i]] - full[real[:, i], i])))

  p = 5
  logits, cache = decode.prefill(dec, loaded, cache, ids_a[:, :p], mask_a, pos_a[:, :p])
  worst = max(worst, check(logits, p - 1))
  for i in range(p, 12):
    logits, cache = decode.decode_step(dec, loaded, cache, ids_a[:, i], i, mask_a, pos_a[:, i])
    worst = max(worst, check(logits, i))
  print(f"int8 serve cached vs full logits: max |diff| {worst:.2e}")


def test_int8_tables_predict_like_the_fake_quant_model(int8_serving):
  """storage_bits=8 rounds the embedding table too: teacher-forced on the fake-quant model's
  own continuations (so one near tie does not derail the rest), the next tokens agree."""
  build, params, _, tables = int8_serving
  ids, _ = _prompts()
  train = build("train")
  new, _ = models.generate(train, {"params": params}, ids, max_new_tokens=N)
  seq = jnp.concatenate([jnp.asarray(ids, jnp.int32), new], axis=1)
  want = jnp.argmax(train.apply({"params": params}, seq), -1)[:, ids.shape[1] - 1 : -1]
  got = jnp.argmax(build("serve").apply(tables, seq), -1)[:, ids.shape[1] - 1 : -1]
  np.testing.assert_array_equal(want, new)
  agree = float(np.mean(np.asarray(got) == np.asarray(want)))
  print(f"int8 tables (storage_bits=8) vs fake-quant next tokens, teacher-forced: {agree:.3f}")
  assert agree >= 0.9, agree


def test_a_sparse_export_loads_and_decodes(tmp_path):
  """Pruning's sparse export (bitmask + values) reads back as the pruned params, exactly: its
  continuations are the pruned model's, token for token and log-prob for log-prob."""
  from compress import prune

  model, variables = _float_model()
  pruned = prune.one_shot_prune(nn.unbox(variables["params"]), 0.5)
  prune.save(str(tmp_path), pruned)
  assert prune.disk_bytes(str(tmp_path)) < 0.75 * sum(x.nbytes for x in jax.tree.leaves(pruned))
  ids, mask = _prompts()
  want = models.generate(model, {"params": pruned}, ids, mask, max_new_tokens=8)
  got = models.generate(model, {"params": prune.load(str(tmp_path))}, ids, mask, max_new_tokens=8)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
