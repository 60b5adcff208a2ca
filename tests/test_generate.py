"""Generation (models/decode.py): transformers' greedy tokens, the cache against recomputing the
sequence, the int8 cache's bound, sharded against one device, the samplers, and bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import parallel
from models import decode, hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 96
FAMILIES = {  # one of each position / attention kind the decoder has
  "gpt2": dict(),
  "llama_gqa": dict(
    positions="rotary",
    norm="rmsnorm",
    n_kv_heads=2,
    gated_mlp=True,
    activation="silu",
    use_bias=False,
    tie_embeddings=False,
  ),
  "scanned_remat": dict(scan_layers=True, remat_policy="full"),
  "window": dict(positions="rotary", sliding_window=4),
}


def _model(family, **kw):
  cfg = models.ModelConfig(vocab_size=V, d_model=32, d_ff=64, max_len=48, **FAMILIES[family], **kw)
  model = models.build(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  # Larger weights than the init's: peaked logits, so argmax is not decided by rounding.
  variables = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, variables)
  return model, variables


def _prompts(width=7):
  """Three prompts: full, right-padded, left-padded."""
  ids = np.random.default_rng(1).integers(1, V, (3, width))
  mask = np.ones((3, width), np.int32)
  mask[1, 4:] = 0
  mask[2, :2] = 0
  return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_logits_equal_recomputing_the_sequence(family):
  """Teacher-forced: prefill 5 tokens, then one per step; each step's logits against the
  whole left-aligned sequence's, run without a cache."""
  model, variables = _model(family)
  ids, mask = _prompts(width=12)
  ids_a, mask_a, pos_a = decode.left_align(jnp.asarray(ids), jnp.asarray(mask))
  full = model.apply(variables, ids_a, attention_mask=mask_a, positions=pos_a)
  dec = decode.decoding_model(model)
  cache = decode.init_cache(dec, variables, 3, 12)
  real = np.asarray(mask_a).astype(bool)  # a pad's own logits are never read

  def check(logits, i):
    np.testing.assert_allclose(logits[real[:, i]], full[real[:, i], i], atol=1e-5, rtol=0)

  p = 5
  logits, cache = decode.prefill(dec, variables, cache, ids_a[:, :p], mask_a, pos_a[:, :p])
  check(logits, p - 1)
  for i in range(p, 12):
    logits, cache = decode.decode_step(dec, variables, cache, ids_a[:, i], i, mask_a, pos_a[:, i])
    check(logits, i)


@pytest.mark.parametrize("family", ["gpt2", "llama_gqa"])
def test_greedy_continues_as_the_argmax_of_the_full_sequence(family):
  """generate's tokens and log-probs, row by row, against a loop that reruns the unpadded
  sequence and takes the argmax."""
  model, variables = _model(family)
  ids, mask = _prompts()
  tokens, logps = models.generate(model, variables, ids, mask, max_new_tokens=8)
  for r in range(3):
    seq = list(ids[r][mask[r].astype(bool)])
    for t in range(8):
      logits = model.apply(variables, jnp.asarray([seq]))[0, -1]
      assert int(tokens[r, t]) == int(jnp.argmax(logits))
      np.testing.assert_allclose(
        logps[r, t], jax.nn.log_softmax(logits)[int(tokens[r, t])], atol=1e-5
      )
      seq.append(int(tokens[r, t]))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  torch.manual_seed(0)
  made = {
    "gpt2": transformers.GPT2LMHeadModel(
      transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ),
    "llama": transformers.LlamaForCausalLM(
      transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
      )
    ),
  }
  out = {}
  for name, model in made.items():
    model.eval()
    with torch.no_grad():
      for p in model.parameters():
        p.mul_(4.0)  # peaked logits (see _model)
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory)
    out[name] = (model, directory)
  return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(hf_models, name):
  torch_model, directory = hf_models[name]
  ids, mask = _prompts()
  ids_a, mask_a, _ = (np.asarray(x) for x in decode.left_align(jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    want = torch_model.generate(
      input_ids=torch.tensor(ids_a),
      attention_mask=torch.tensor(mask_a),
      max_new_tokens=32,
      min_new_tokens=32,
      do_sample=False,
      pad_token_id=0,
    )[:, ids.shape[1] :].numpy()
  model, params = hf.from_pretrained(directory)
  got, _ = models.generate(model, {"params": params}, ids, mask, max_new_tokens=32)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_int8_cache_stays_within_its_bound():
  """int8 keys and values (per token and head) move the logits by at most 2% of their range
  here: rounding to 1/254 of each vector's absmax."""
  model, variables = _model("llama_gqa")
  ids, mask = _prompts(width=12)
  ids_a, mask_a, pos_a = decode.left_align(jnp.asarray(ids), jnp.asarray(mask))
  outs = {}
  for kind in ("float", "int8"):
    dec = decode.decoding_model(model, kind)
    cache = decode.init_cache(dec, variables, 3, 12)
    outs[kind], cache = decode.prefill(dec, variables, cache, ids_a, mask_a, pos_a)
    if kind == "int8":
      leaves = jax.tree_util.tree_leaves_with_path(cache)
      assert {str(x.dtype) for _, x in leaves} == {"int8", "float32"}
  err = float(jnp.max(jnp.abs(outs["int8"] - outs["float"])))
  spread = float(jnp.max(outs["float"]) - jnp.min(outs["float"]))
  assert 0 < err <= 0.02 * spread, (err, spread)


def test_sharded_decoding_equals_one_device():
  model, variables = _model("gpt2")
  ids = np.random.default_rng(2).integers(1, V, (4, 6))
  mask = np.ones_like(ids)
  mask[1, 3:] = 0
  want = models.generate(model, variables, ids, mask, max_new_tokens=6)
  mesh = parallel.make_mesh(2, 1, 4, devices=jax.devices()[:8])
  rules = parallel.get_rules("fsdp_tp")
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shardings = parallel.sharding.logical_to_shardings(boxed, mesh, rules)
  placed = jax.device_put(variables, shardings)
  got = models.generate(model, placed, ids, mask, max_new_tokens=6, mesh=mesh, rules=rules)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)


LOGITS = jnp.log(jnp.array([[0.4, 0.3, 0.15, 0.1, 0.05]] * 4000))


def test_samples_reproduce_with_the_same_key():
  model, variables = _model("gpt2")
  ids, mask = _prompts()
  run = lambda key: models.generate(  # noqa: E731
    model, variables, ids, mask, max_new_tokens=6, temperature=1.0, top_k=20, rng=key
  )[0]
  a, b, c = run(jax.random.key(3)), run(jax.random.key(3)), run(jax.random.key(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_top_k_never_leaves_the_k_best():
  tokens = decode.sample(LOGITS, jax.random.key(0), temperature=1.0, top_k=2)
  assert set(np.unique(tokens).tolist()) == {0, 1}


@pytest.mark.parametrize(
  "top_p,kept", [(0.5, {0, 1}), (0.7, {0, 1}), (0.71, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
  tokens = decode.sample(LOGITS, jax.random.key(0), temperature=1.0, top_p=top_p)
  assert set(np.unique(tokens).tolist()) == kept
  assert float(jnp.exp(LOGITS[0, sorted(kept)]).sum()) >= top_p - 1e-6


def test_eos_stops_each_row():
  model, variables = _model("gpt2")
  ids, mask = _prompts()
  free, _ = models.generate(model, variables, ids, mask, max_new_tokens=8)
  eos = int(free[0, 2])  # row 0 emits it at step 2 (maybe others too)
  tokens, logps = models.generate(model, variables, ids, mask, max_new_tokens=8, eos_id=eos)
  for r in range(3):
    hits = np.flatnonzero(np.asarray(free[r]) == eos)
    stop = hits[0] if hits.size else 8
    np.testing.assert_array_equal(tokens[r, : stop + 1], free[r, : stop + 1])
    assert (np.asarray(tokens[r, stop + 1 :]) == eos).all()
    assert (np.asarray(logps[r, stop + 1 :]) == 0).all()


@pytest.mark.parametrize(
  "change,words",
  [
    (dict(max_new_tokens=44), "shorten the prompt to at most 4"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must lie in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must lie in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(ids=np.array([[5, V]])), f"token id {V} lies outside the vocabulary [0, {V})"),
    (dict(temperature=0.5), "needs rng="),
    (dict(encoder=True), "generate needs a Decoder"),
  ],
)
def test_bad_requests_are_refused_before_compiling(monkeypatch, change, words):
  model, variables = _model("gpt2")
  monkeypatch.setattr(decode, "_generate", lambda *a, **k: pytest.fail("compiled"))
  ids = change.pop("ids", np.array([[5, 6, 7, 8, 9, 10, 11]]))
  if change.pop("encoder", False):
    model = models.build(dataclasses.replace(model.config, kind="encoder", head="none"))
  kwargs = dict(max_new_tokens=4) | change
  with pytest.raises(ValueError) as e:
    models.generate(model, variables, ids, None, **kwargs)
  assert words in str(e.value)
