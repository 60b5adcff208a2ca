"""Properties of the models package: shapes, masking, equivalences, injection, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import models

B, L = 2, 8
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16)
LOGICAL_NAMES = {
  "vocab",
  "embed",
  "mlp",
  "heads",
  "kv_heads",
  "head_dim",
  "norm",
  "type_vocab",
  "pos",
  "layers",
  "labels",
  None,
}


def small(preset="tiny", **overrides):
  """A real preset shrunk to test size (llama keeps GQA: 4 query heads, 2 KV heads)."""
  extra = dict(n_kv_heads=2) if preset == "llama-1b" else {}
  return models.get_preset(preset, **{**SMALL, **extra, **overrides})


def random_ids(seed=0, shape=(B, L), vocab=SMALL["vocab_size"]):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def init(cfg, **kw):
  """A model and random params drawn with numpy (jax's RNG is slow to compile on CPU).

  Biases are nonzero and scales are not one, so a mis-wired bias or norm shows.
  """
  model = models.build(cfg, **kw)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), random_ids()))
  rng = np.random.RandomState(0)

  def draw(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    return jnp.asarray(1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def test_init_follows_gpt2_and_bert():
  """The real initializer: kernels and embeddings N(0, 0.02), zero biases, unit scales."""
  model = models.build(small("tiny-encoder", head="classify"))
  key = jax.random.key(0, impl="rbg")  # Threefry is slow to compile on CPU.
  params = nn.unbox(jax.jit(model.init)(key, random_ids()))["params"]
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = path[-1].key
    expected = {"scale": 1.0, "bias": 0.0}.get(name)
    if expected is not None:
      np.testing.assert_array_equal(x, expected)
    elif x.size > 100:
      assert abs(np.std(x) - 0.02) < 0.004, path


# Shapes.


@pytest.mark.parametrize("preset", ["tiny", "llama-1b"])
def test_decoder_logits_shape_and_dtype(preset):
  model, variables = init(small(preset))
  logits = model.apply(variables, random_ids())
  assert logits.shape == (B, L, SMALL["vocab_size"]) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()


@pytest.mark.parametrize(
  "head,shape", [("mlm", (B, L, 64)), ("classify", (B, 3)), ("none", (B, L, 32))]
)
def test_encoder_head_shapes(head, shape):
  model, variables = init(small("tiny-encoder", head=head, num_labels=3))
  out = model.apply(variables, random_ids(), token_type_ids=jnp.ones((B, L), jnp.int32))
  assert out.shape == shape and out.dtype == jnp.float32


# Masking.


@pytest.mark.parametrize("preset", ["tiny", "llama-1b"])
def test_decoder_is_causal(preset):
  model, variables = init(small(preset))
  apply = jax.jit(model.apply)
  ids = random_ids()
  logits = apply(variables, ids)
  for t in (1, 4, L - 1):
    changed = apply(variables, ids.at[:, t].set((ids[:, t] + 1) % SMALL["vocab_size"]))
    np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
    assert not np.allclose(changed[:, t:], logits[:, t:])


def test_rotary_sees_only_relative_positions():
  model, variables = init(small("llama-1b"))
  ids = random_ids()
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  logits = model.apply(variables, ids, positions=positions)
  np.testing.assert_allclose(
    model.apply(variables, ids, positions=positions + 5), logits, atol=1e-5
  )
  assert not np.allclose(model.apply(variables, ids, positions=positions * 2), logits)


def test_decoder_padding_mask_hides_padded_keys():
  model, variables = init(small("llama-1b"))
  ids, mask = random_ids(), jnp.ones((B, L), jnp.int32).at[:, :3].set(0)  # Left padding.
  logits = model.apply(variables, ids, attention_mask=mask)
  other = model.apply(variables, ids.at[:, :3].set(7), attention_mask=mask)
  np.testing.assert_allclose(other[:, 3:], logits[:, 3:], atol=1e-6)
  unmasked = model.apply(variables, ids.at[:, :3].set(7))
  assert not np.allclose(unmasked[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("head", ["none", "mlm"])
def test_encoder_ignores_padding(head):
  model, variables = init(small("tiny-encoder", head=head))
  n_real = 5
  ids = random_ids()
  mask = jnp.ones((B, L), jnp.int32).at[:, n_real:].set(0)
  out = model.apply(variables, ids, attention_mask=mask)
  repadded = model.apply(variables, ids.at[:, n_real:].set(3), attention_mask=mask)
  np.testing.assert_allclose(repadded[:, :n_real], out[:, :n_real], atol=1e-6)
  shorter = model.apply(variables, ids[:, :n_real])
  np.testing.assert_allclose(shorter, out[:, :n_real], atol=1e-5)
  assert not np.allclose(model.apply(variables, ids)[:, :n_real], out[:, :n_real])


# Equivalences: jit, scan, remat, attention paths.


def test_jit_matches_no_jit():
  model, variables = init(small("llama-1b"))
  ids = random_ids()
  np.testing.assert_allclose(
    jax.jit(model.apply)(variables, ids), model.apply(variables, ids), atol=1e-5
  )


@pytest.mark.parametrize("preset", ["tiny", "tiny-encoder"])
def test_scan_matches_unrolled(preset):
  cfg = small(preset)
  model, variables = init(cfg)
  params = variables["params"]
  scanned_params = models.scan_params(params, cfg.n_layers)
  scanned_model = models.build(small(preset, scan_layers=True))
  # The converted tree has exactly the scanned model's structure and shapes.
  expected = jax.eval_shape(scanned_model.init, jax.random.key(0), random_ids())["params"]
  assert jax.tree.structure(nn.unbox(expected)) == jax.tree.structure(scanned_params)
  assert jax.tree.map(jnp.shape, nn.unbox(expected)) == jax.tree.map(jnp.shape, scanned_params)
  roundtrip = models.unscan_params(scanned_params)
  jax.tree.map(np.testing.assert_array_equal, roundtrip, params)

  ids = random_ids()
  out, state = model.apply(variables, ids, mutable=["intermediates"])
  scanned_out, scanned_state = scanned_model.apply(
    {"params": scanned_params}, ids, mutable=["intermediates"]
  )
  np.testing.assert_allclose(scanned_out, out, atol=1e-5)
  stacked = scanned_state["intermediates"]["layers"]["hidden_states"][0]
  for i in range(cfg.n_layers):
    np.testing.assert_allclose(
      stacked[i], state["intermediates"][f"layers_{i}"]["hidden_states"][0], atol=1e-5
    )


@functools.cache
def _loss_and_grads(scan, dropout_rate, policy):
  model, variables = init(
    small("llama-1b", scan_layers=scan, dropout_rate=dropout_rate, remat_policy=policy)
  )

  def loss(params):
    # With dropout, the recomputed forward must redraw the same masks from the same key.
    # ("rbg" only because threefry compiles slowly on CPU.)
    logits = model.apply(
      {"params": params},
      random_ids(),
      deterministic=False,
      rngs={"dropout": jax.random.key(1, impl="rbg")},
    )
    return jnp.mean(logits**2)

  return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.parametrize(
  "policy,scan,dropout_rate",
  [("full", False, 0.1), ("save_qkv_out", False, 0.1), ("dots_no_batch", True, 0.0)],
)
def test_remat_matches_plain(policy, scan, dropout_rate):
  value, grads = _loss_and_grads(scan, dropout_rate, "none")
  remat_value, remat_grads = _loss_and_grads(scan, dropout_rate, policy)
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), remat_grads, grads)


def test_dropout_is_applied_only_when_not_deterministic():
  model, variables = init(small(dropout_rate=0.5))
  ids = random_ids()
  plain = models.build(small()).apply(variables, ids)
  np.testing.assert_allclose(model.apply(variables, ids), plain, atol=1e-6)
  dropped = model.apply(
    variables, ids, deterministic=False, rngs={"dropout": jax.random.key(1, impl="rbg")}
  )
  assert not np.allclose(dropped, plain)


@pytest.mark.parametrize(
  "preset, overrides",
  [("llama-1b", {}), ("llama-1b", dict(sliding_window=3)), ("tiny-encoder", {})],
)
def test_explicit_attention_matches_jax(preset, overrides):
  """The default path (attention_impl=None: our einsums), the recording and the injected ones
  compute jax.nn.dot_product_attention's (attention_impl="xla"): GQA, padding, windows."""
  ids, mask = random_ids(), jnp.ones((B, L), jnp.int32).at[0, :2].set(0).at[1, -3:].set(0)
  jax_model, variables = init(small(preset, attention_impl="xla", **overrides))
  theirs = jax_model.apply(variables, ids, attention_mask=mask)
  ours = models.build(small(preset, **overrides)).apply(variables, ids, attention_mask=mask)
  recorded, state = models.build(small(preset, record_attention=True, **overrides)).apply(
    variables, ids, attention_mask=mask, mutable=["intermediates"]
  )
  injected = models.build(
    small(preset, **overrides), attn_dot_general_cls=lambda: lax.dot_general
  ).apply(variables, ids, attention_mask=mask)
  for logits in (ours, recorded, injected):
    np.testing.assert_allclose(logits, theirs, atol=1e-5)

  probs = state["intermediates"]["layers_0"]["attn"]["attention_probs"][0]
  assert probs.shape == (B, SMALL["n_heads"], L, L)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  if not overrides:  # (a window over padding only is uniform: example 1's last rows at 3)
    np.testing.assert_array_equal(probs[1, :, :, L - 3 :], 0.0)  # Padded keys get no weight.
  if preset == "llama-1b":
    # Causal, except rows whose keys are all masked (example 0's left padding): those are
    # uniform, as in jax.nn.dot_product_attention, and no real position reads them.
    np.testing.assert_array_equal(np.triu(probs[1], k=1), 0.0)
    np.testing.assert_array_equal(np.triu(probs[0, :, 2:, 2:], k=1), 0.0)


def test_sown_hidden_states_feed_the_output():
  model, variables = init(small("tiny-encoder", head="none"))
  out, state = model.apply(variables, random_ids(), mutable=["intermediates"])
  hidden = [state["intermediates"][f"layers_{i}"]["hidden_states"][0] for i in range(2)]
  assert all(h.shape == (B, L, SMALL["d_model"]) for h in hidden)
  np.testing.assert_array_equal(hidden[-1], out)


# Injected dot_general.


class ScaledDotGeneral(nn.Module):
  """A dot_general that owns a parameter, like a learned quantization step size."""

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    scale = self.param("scale", nn.initializers.ones_init(), ())
    out = lax.dot_general(
      lhs,
      rhs,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
    return out * scale


def _scale_paths(params):
  """Paths (tuples of keys) of the ScaledDotGeneral parameters."""
  paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  return sorted(p for p in paths if any(k.startswith("ScaledDotGeneral") for k in p))


def _bump(params, path):
  """Doubles the parameter at `path`."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x * 2 if tuple(k.key for k in p) == path else x, params
  )


ATTN, MLP = ["query", "key", "value", "out"], ["wi", "wo"]


@pytest.mark.parametrize(
  "preset,overrides,per_layer,heads",
  [
    ("tiny", {}, ATTN + MLP, [("lm_head",)]),
    ("tiny", {"tie_embeddings": False}, ATTN + MLP, [("lm_head",)]),
    ("llama-1b", {}, ATTN + MLP + ["wg"], [("lm_head",)]),
    ("tiny-encoder", {}, ATTN + MLP, [("mlm_head", "transform"), ("mlm_head", "decoder")]),
    ("tiny-encoder", {"head": "classify"}, ATTN + MLP, [("pooler",), ("classifier",)]),
  ],
)
def test_dot_general_reaches_every_projection(preset, overrides, per_layer, heads):
  cfg = small(preset, **overrides)
  calls = []

  def counting_dot_general(lhs, rhs, dims, precision=None, preferred_element_type=None):
    calls.append(rhs.shape)
    return lax.dot_general(
      lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type
    )

  model = models.build(cfg, dot_general_cls=lambda: counting_dot_general)
  model.apply(init(cfg)[1], random_ids())
  assert len(calls) == cfg.n_layers * len(per_layer) + len(heads)

  # A Module-returning factory gets its own variables under each projection, and every
  # one of them reaches the output.
  model, variables = init(cfg, dot_general_cls=ScaledDotGeneral)
  paths = _scale_paths(variables["params"])
  expected = [
    (f"layers_{i}", "attn" if p in ATTN else "mlp", p)
    for i in range(cfg.n_layers)
    for p in per_layer
  ] + heads
  assert paths == sorted(p + ("ScaledDotGeneral_0", "scale") for p in expected)
  apply = jax.jit(model.apply)
  base = apply(variables, random_ids())
  for path in paths:
    bumped = apply({"params": _bump(variables["params"], path)}, random_ids())
    assert not np.allclose(bumped, base), path


def test_attention_dot_general_is_injected():
  cfg = small("llama-1b")
  model, variables = init(cfg, attn_dot_general_cls=ScaledDotGeneral)
  paths = _scale_paths(variables["params"])
  # Two per layer: query-key logits (_0) and probabilities-value (_1).
  assert paths == sorted(
    (f"layers_{i}", "attn", f"ScaledDotGeneral_{j}", "scale")
    for i in range(cfg.n_layers)
    for j in range(2)
  )
  apply = jax.jit(model.apply)
  base = apply(variables, random_ids())
  for path in paths:
    bumped = apply({"params": _bump(variables["params"], path)}, random_ids())
    assert not np.allclose(bumped, base), path


def test_too_long_input_raises():
  model, variables = init(small())
  with pytest.raises(ValueError, match="exceeds max_len=16"):
    model.apply(variables, jnp.zeros((1, 17), jnp.int32))


# Sharding metadata and dtypes.


@pytest.mark.parametrize(
  "preset,overrides",
  [
    ("tiny", {}),
    ("llama-1b", {}),
    ("tiny-encoder", {}),
    ("tiny-encoder", {"head": "classify"}),
    ("tiny", {"scan_layers": True}),
    ("llama-1b", {"scan_layers": True, "remat_policy": "full"}),
  ],
)
def test_every_param_is_logically_partitioned(preset, overrides):
  cfg = small(preset, **overrides)
  boxed = jax.eval_shape(models.build(cfg).init, jax.random.key(0), random_ids())
  for path, leaf in jax.tree_util.tree_leaves_with_path(
    boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  ):
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL_NAMES, path
    in_scan = cfg.scan_layers and path[1].key == "layers"
    assert (leaf.names[0] == "layers") == in_scan, path
    assert leaf.names.count("layers") == in_scan, path


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = small("llama-1b", dtype="bfloat16")
  model, variables = init(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), random_ids())  # The model's own init.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(shapes)))
  logits = model.apply(variables, random_ids())
  reference = models.build(small("llama-1b")).apply(variables, random_ids())
  assert logits.dtype == jnp.float32
  assert not np.array_equal(logits, reference)  # The compute really ran in bfloat16 ...
  np.testing.assert_allclose(logits, reference, atol=0.05 * np.abs(reference).max())  # ... fine.
