"""Properties of compress.quant beyond the pure quantizers (tests/test_quantizers.py): the
quantized dot (QAT forward = integer serving forward), whole converted models, the policy
report and input errors. Checkpoints on disk: tests/test_quant_export.py; the optax side:
tests/test_quant_optim.py.

Models are compiled once per case (train, convert and serve in one jit) and their params are
drawn with numpy from `jax.eval_shape` (jax's RNG is slow to compile on CPU).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import models
from compress import quant
from compress.quant import Policy, QuantConfig, QuantDot
from compress.quant import quantizers as qz
from compress.tree import path_name
from models.layers import Dense

from quant_helpers import SMALL, B, draw, f32, leaves, param_shapes, quant_model, random_ids


# QuantDot in a layer: the fake-quant forward (computed exactly, in integers) and STE backward.

K, N = 64, 8


@pytest.mark.parametrize(
  "config",
  [
    QuantConfig(),
    QuantConfig(granularity=16),
    QuantConfig(bits=4, act_bits=6, granularity=16, act_granularity="token"),
    QuantConfig(act_symmetric=False, granularity=16),
    QuantConfig(bits=4, act_bits=None, symmetric=False, granularity="tensor"),
  ],
  ids=["channel", "tile16", "int4-tile16-token", "asymmetric-act-tile16", "w4-asymmetric-tensor"],
)
def test_quantized_dense_is_fake_quant_forward_and_ste_backward(config):
  """The forward is the fake-quantized dot; the backward passes the full gradient to every
  element of both operands, each group's largest weight and activation included."""
  layer = Dense(
    N,
    ("embed", "mlp"),
    use_bias=False,
    dot_general_cls=functools.partial(QuantDot, Policy.of((".*", config))),
  )
  rng = np.random.RandomState(0)
  x = f32(rng.normal(size=(B, 3, K)))
  kernel = f32(0.1 * rng.normal(size=(K, N)) * rng.uniform(0.2, 2, size=N))
  probe = f32(rng.normal(size=(B, 3, N)))  # a loss that weighs each output

  def quantized(kernel, x):
    return layer.apply({"params": {"kernel": kernel}}, x)

  def fake_quant(x, axes, bits, symmetric):
    lo, hi = qz.calibrate(lax.stop_gradient(x), axes, bits=bits, symmetric=symmetric)
    scale, zero = qz.scale_zero(lo, hi, bits, symmetric)
    return qz.fake_quant(x, scale, zero, bits, symmetric, *qz.grid_range(lo, hi, symmetric))

  def reference(kernel, x):
    if config.act_bits is not None:
      reduce = (0, 1, 2) if config.act_granularity == "tensor" else (2,)
      x = fake_quant(x, reduce, config.act_bits, config.act_symmetric)
    w, axes = kernel, (0,) if config.granularity == "channel" else (0, 1)
    if isinstance(config.granularity, int):
      w, axes = qz.tile(kernel, 0, 16), (1,)
    w_hat = fake_quant(w, axes, config.bits, config.symmetric).reshape(kernel.shape)
    return lax.dot_general(x, w_hat, (((2,), (0,)), ((), ()))), (x, w_hat)

  @jax.jit
  def run(kernel, x):
    out = {}
    for name, f in [("quantized", quantized), ("reference", lambda k, x: reference(k, x)[0])]:
      y, vjp = jax.vjp(f, kernel, x)
      out[name] = (y, *vjp(probe))
    return out, x @ kernel, reference(kernel, x)[1]

  out, exact, (x_hat, w_hat) = jax.tree.map(np.asarray, run(kernel, x))
  y, grad_kernel, grad_x = out["quantized"]
  y_ref, grad_kernel_ref, grad_x_ref = out["reference"]
  top = np.abs(y_ref).max()
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * top)
  assert np.abs(y - exact).max() > 1e-3 * top  # it really is quantized
  np.testing.assert_allclose(grad_kernel, grad_kernel_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, grad_x_ref, rtol=1e-5, atol=1e-5)
  # The straight-through gradient of x_hat . w_hat, nothing masked: every element lies in
  # its group's absmax range.
  full_kernel = np.einsum("blk,bln->kn", x_hat, np.asarray(probe))
  np.testing.assert_allclose(grad_kernel, full_kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_x, np.asarray(probe) @ w_hat.T, rtol=1e-5, atol=1e-6)
  if config.act_bits is not None:  # the kernel's gradient is taken at the quantized input
    float_grad = np.einsum("blk,bln->kn", np.asarray(x), np.asarray(probe))
    assert np.abs(grad_kernel - float_grad).max() > 1e-3 * np.abs(float_grad).max()


@pytest.mark.parametrize("calibrator", ["absmax", "percentile"])
def test_static_ranges_are_calibrated_over_batches_and_used_in_training(calibrator):
  config = QuantConfig(act_static=True, act_symmetric=False, act_calibrator=calibrator)
  rng = np.random.RandomState(0)
  params = {"kernel": f32(0.1 * rng.normal(size=(K, N)))}
  params["bias"] = f32(rng.normal(size=N))
  batches = [(rng.normal(size=(B, 3, K)) * c + m).astype(np.float32) for c, m in [(1, 1), (3, 0)]]
  x = f32(rng.normal(size=(B, 3, K)) * 4)  # partly outside the range

  calibrate = jax.jit(
    lambda v, x: dense(config, "calibrate", N, use_bias=True).apply(v, x, mutable=["quant"])[1]
  )
  variables = {"params": params}
  for batch in map(f32, batches):
    variables = {**variables, **calibrate(variables, batch)}
  state = variables["quant"]["QuantDot_0"]
  if calibrator == "absmax":  # the range over all batches
    lo, hi = min(b.min() for b in batches), max(b.max() for b in batches)
  else:  # the mean of the per-batch ranges (percentile 99.99)
    lo = np.mean([np.percentile(b, 0.01) for b in batches])
    hi = np.mean([np.percentile(b, 99.99) for b in batches])
  assert float(state["a_n"]) == 2.0
  np.testing.assert_allclose([state["a_lo"], state["a_hi"]], [lo, hi], rtol=1e-5)

  # Two activations exactly on the calibrated range's ends: they get the full gradient.
  x = np.asarray(x).copy()
  x[0, 0, :2] = state["a_lo"], state["a_hi"]
  inside = (x >= state["a_lo"]) & (x <= state["a_hi"])
  probe = f32(rng.normal(size=(B, 3, N)))

  @jax.jit
  def train_and_reference(variables, x):
    apply = dense(config, "train", N, use_bias=True).apply
    y, vjp = jax.vjp(lambda x: apply(variables, x), x)
    state, kernel = variables["quant"]["QuantDot_0"], variables["params"]["kernel"]
    scale, zero = qz.scale_zero(state["a_lo"], state["a_hi"], 8, False)
    x_hat = qz.fake_quant(x, scale, zero, 8, False)
    w_scale, _ = qz.scale_zero(*qz.calibrate(kernel, (0,), bits=8, symmetric=True), 8, True)
    w_hat = qz.fake_quant(kernel, w_scale, None, 8, True)
    return y, vjp(probe)[0], x_hat @ w_hat + variables["params"]["bias"], x_hat, w_hat

  y, grad_x, expected, x_hat, w_hat = jax.tree.map(
    np.asarray, train_and_reference(variables, f32(x))
  )
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  assert np.abs(x_hat - x).max() > 1.0  # x was clipped to the static range
  # Outside the calibrated range no gradient; inside and on its ends the full one.
  assert inside[0, 0, :2].all() and 0 < (~inside).sum() < x.size / 2
  full = np.asarray(probe) @ w_hat.T
  np.testing.assert_allclose(grad_x, np.where(inside, full, 0.0), rtol=1e-5, atol=1e-6)


# Whole models: the QAT forward and the converted integer model agree bit for bit.

CONFIGS = {
  "int8": QuantConfig(),
  "tile32": QuantConfig(granularity=32),
  "int4-tile32-token": QuantConfig(bits=4, granularity=32, act_granularity="token"),
  "lsq": QuantConfig(lsq=True),
  "static-asym": QuantConfig(act_static=True, act_symmetric=False),
}
TINY = dict(max_len=16)


def qat_and_serve(cfg, policy, ids):
  """(float params, serving variables, QAT logits, serving logits), in one jit."""
  params = draw(param_shapes(quant_model(cfg, policy, "train"), ids))
  static = any(c is not None and c.act_static for _, c in policy.rules)

  @jax.jit
  def run(params, ids):
    variables = {"params": params}
    if static:
      _, state = quant_model(cfg, policy, "calibrate").apply(variables, ids, mutable=["quant"])
      variables = {**variables, **state}
    serving = quant.convert(quant_model(cfg, policy, "convert").apply, variables, ids[:1, :1])
    qat = quant_model(cfg, policy, "train").apply(variables, ids)
    served = quant_model(cfg, policy, "serve").apply(serving, ids)
    return serving, qat, served

  return params, *run(params, ids)


def check_serving(cfg, policy, ids):
  params, serving, qat, served = qat_and_serve(cfg, policy, ids)
  assert np.isfinite(qat).all() and np.abs(qat).max() > 0.1
  # Serving runs on the integer codes, so this also shows the QAT forward is quantized.
  np.testing.assert_allclose(served, qat, rtol=0, atol=1e-5)  # observed: 0.0

  # Quantized layers hold integer codes (int4 up to 4 bits) and their scales; the rest is float.
  kernels = {k: v for k, v in leaves(serving["params"]).items() if k.endswith("kernel")}
  scales = {k for k in leaves(serving["quant"]) if k.endswith("w_scale")}
  n_quantized = 0
  for name, kernel in kernels.items():
    layer = name.rsplit("/", 1)[0]
    config = policy.match(layer)[1]
    if config is None:
      assert kernel.dtype == jnp.float32, name
      np.testing.assert_array_equal(kernel, leaves(params)[name])
      continue
    n_quantized += 1
    assert kernel.dtype == qz.storage_dtype(config.bits), name
    assert f"{layer}/QuantDot_0/w_scale" in scales, name
    q_min, q_max = (-128, 127) if config.lsq else qz.int_range(config.bits, True)
    codes = np.asarray(kernel).astype(np.int8)
    assert codes.min() >= q_min and codes.max() <= q_max and codes.max() > q_max // 2, name
  assert n_quantized >= 6
  for name, x in leaves(serving["params"]).items():
    if not name.endswith("kernel"):
      assert x.dtype == jnp.float32, name
  return serving


# Each configuration on its own layers, so one compile covers them all; the attention einsums
# (path ".../attn") are static asymmetric, LSQ and per token in the three models.
MIXED_DECODER = Policy.of(
  ("lm_head|decoder", None),
  ("attn/query", CONFIGS["int8"]),
  ("attn/key", CONFIGS["tile32"]),
  ("attn/value", CONFIGS["lsq"]),
  ("attn/out", CONFIGS["int4-tile32-token"]),
  ("attn$", CONFIGS["static-asym"]),
  ("mlp/wi", CONFIGS["static-asym"]),
  (".*", CONFIGS["int8"]),
)
MIXED_ENCODER = Policy.of(
  ("lm_head|decoder", None),
  ("attn/(query|key)", CONFIGS["lsq"]),
  ("attn/value", CONFIGS["static-asym"]),
  ("attn/out", CONFIGS["tile32"]),
  ("attn$", CONFIGS["lsq"]),
  ("mlp/wi", CONFIGS["int4-tile32-token"]),
  ("mlp/wo", CONFIGS["int8"]),
  (".*", CONFIGS["static-asym"]),  # mlm_head/transform
)
MIXED_SCANNED = Policy.of(
  ("attn/(query|key|value)", CONFIGS["lsq"]),
  ("attn/out", CONFIGS["static-asym"]),
  ("attn$", CONFIGS["int4-tile32-token"]),
  ("mlp/wi", CONFIGS["tile32"]),
  ("mlp/wo", CONFIGS["int4-tile32-token"]),
  ("lm_head", CONFIGS["int8"]),  # the tied table, quantized on the fly
)


def test_decoder_serving_equals_qat():
  cfg = models.get_preset("tiny", tie_embeddings=False, n_layers=1, **TINY)
  serving = check_serving(cfg, MIXED_DECODER, random_ids(cfg.vocab_size))
  assert serving["params"]["lm_head"]["kernel"].dtype == jnp.float32
  # Static ranges calibrated for a dense layer and both attention einsums.
  attn = serving["quant"]["layers_0"]["attn"]
  wi = serving["quant"]["layers_0"]["mlp"]["wi"]["QuantDot_0"]
  for dot in (wi, attn["QuantDot_0"], attn["QuantDot_1"]):
    assert float(dot["a_n"]) == 1.0 and float(dot["a_lo"]) <= 0 < float(dot["a_hi"])
  assert float(wi["a_lo"]) < 0 and float(attn["QuantDot_0"]["b_lo"]) < 0
  assert float(attn["QuantDot_1"]["a_lo"]) == 0.0 < float(attn["QuantDot_1"]["a_hi"]) <= 1.0


def test_encoder_serving_equals_qat():
  cfg = models.get_preset("tiny-encoder", head="mlm", n_layers=1, **TINY)
  serving = check_serving(cfg, MIXED_ENCODER, random_ids(cfg.vocab_size))
  einsums = serving["params"]["layers_0"]["attn"]
  assert {"a_step", "b_step"} <= set(einsums["QuantDot_0"]) and "QuantDot_1" in einsums


def test_scanned_decoder_serving_equals_qat():
  cfg = models.get_preset("tiny", scan_layers=True, **TINY)
  serving = check_serving(cfg, MIXED_SCANNED, random_ids(cfg.vocab_size))
  assert serving["params"]["embed"]["embedding"].dtype == jnp.float32  # tied: stays float
  assert serving["quant"]["lm_head"]["QuantDot_0"]["w_scale"].shape == (cfg.vocab_size, 1)
  assert serving["params"]["layers"]["attn"]["query"]["kernel"].shape[0] == cfg.n_layers
  assert serving["quant"]["layers"]["attn"]["out"]["QuantDot_0"]["a_lo"].shape == (cfg.n_layers,)


# The policy and its report.

LSQ_RULE = r"attn/(query|value)"
REPORT_POLICY = Policy.of(
  (r"lm_head", None),
  (r"layers_0/mlp", QuantConfig(bits=4)),
  (r"no_such_layer", QuantConfig()),
  (LSQ_RULE, QuantConfig(lsq=True)),
  (r".*", QuantConfig()),
)


def test_report_lists_each_layers_rule_and_the_unused_rules():
  cfg = models.get_preset("tiny", **SMALL)
  model = quant_model(cfg, REPORT_POLICY, "train")
  key = jax.random.key(0, impl="unsafe_rbg")  # threefry is slow to compile on CPU

  @jax.jit
  def init(key, ids):  # what the test reads (the rest of the init compiles away)
    variables = nn.unbox(model.init(key, ids))
    layer = variables["params"]["layers_0"]
    wi, w_step = layer["mlp"]["wi"]["kernel"], layer["attn"]["query"]["QuantDot_0"]["w_step"]
    return variables["quant"], wi, w_step, jax.tree.map(jnp.shape, layer["attn"]["key"])

  quant_collection, wi, w_step, key_params = init(key, random_ids(cfg.vocab_size))
  matched, unused = quant.report(REPORT_POLICY, quant_collection)
  rules = {
    "layers_0/attn/query": LSQ_RULE,
    "layers_0/attn/key": r".*",
    "layers_0/attn/value": LSQ_RULE,
    "layers_0/attn/out": r".*",
    "layers_0/mlp/wi": r"layers_0/mlp",
    "layers_0/mlp/wo": r"layers_0/mlp",
    "lm_head": r"lm_head",
  }
  einsums = [("layers_0/attn", r".*")] * 2  # query-key and probabilities-value
  assert sorted(matched) == sorted([*rules.items(), *einsums])
  assert unused == [r"no_such_layer"]

  # The float layer records its rule but has no weight scale; every quantized layer has one.
  quant_vars = leaves(quant_collection)
  assert quant_vars["lm_head/QuantDot_0/rule"] == 0
  scales = {k.rsplit("/", 2)[0]: v for k, v in quant_vars.items() if k.endswith("w_scale")}
  assert sorted(scales) == sorted(layer for layer in rules if layer != "lm_head")
  expected = np.abs(wi).max(0, keepdims=True) / 7  # wi: 4 bits, per channel
  np.testing.assert_allclose(scales["layers_0/mlp/wi"], expected, rtol=1e-6)
  np.testing.assert_array_equal(scales["layers_0/attn/query"], w_step)  # LSQ: the learned step
  assert w_step.shape == (1, SMALL["n_heads"], SMALL["d_model"] // SMALL["n_heads"])
  assert key_params.keys() == {"kernel", "bias"}  # no LSQ, no params of its own


def test_names_are_the_same_boxed_and_unboxed():
  """Layer names come from the dict keys only: a flax box's `.value` is not part of them."""
  scale = nn.Partitioned(np.ones((1, 4), np.float32), (None, "mlp"))
  quant_vars = {
    "layers_0": {"mlp": {"wi": {"QuantDot_0": {"rule": np.int32(1), "w_scale": scale}}}},
    "lm_head": {"QuantDot_0": {"rule": np.int32(0)}},
  }
  names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(quant_vars)]
  unboxed = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(quant_vars))]
  assert names == unboxed and "layers_0/mlp/wi/QuantDot_0/w_scale" in names
  matched = [("layers_0/mlp/wi", r"layers_0/mlp"), ("lm_head", r"lm_head")]
  expected = (matched, [r"no_such_layer", LSQ_RULE, r".*"])
  assert quant.report(REPORT_POLICY, quant_vars) == expected
  assert quant.report(REPORT_POLICY, nn.unbox(quant_vars)) == expected


# Bad input.


@pytest.mark.parametrize(
  "make",
  [
    lambda: QuantConfig(bits=1),
    lambda: QuantConfig(bits=9),
    lambda: QuantConfig(act_bits=0),
    lambda: QuantConfig(bits=4.0),
    lambda: qz.int_range(16, True),
    lambda: quant.keep_on_grid(bits=1, select=r"kernel$"),
  ],
  ids=["bits=1", "bits=9", "act_bits=0", "bits=4.0", "int_range", "keep_on_grid"],
)
def test_bit_widths_outside_2_to_8_are_rejected(make):
  with pytest.raises(ValueError, match="2 to 8"):
    make()


def test_invalid_configs_are_rejected():
  with pytest.raises(ValueError, match="token"):
    QuantConfig(act_granularity="token", act_static=True)
  with pytest.raises(ValueError, match="token"):
    QuantConfig(act_granularity="token", lsq=True)
  with pytest.raises(ValueError, match="granularity"):
    QuantConfig(granularity="row")
  with pytest.raises(ValueError, match="calibrator"):
    QuantConfig(calibrator="minmax")
  with pytest.raises(TypeError, match="QuantConfig"):
    Policy.of((".*", dict(bits=8)))


def dense(config, mode="train", features=8, use_bias=True):
  policy = Policy.of((".*", config))
  return Dense(
    features,
    ("embed", "mlp"),
    use_bias=use_bias,
    dot_general_cls=functools.partial(QuantDot, policy, mode),
  )


def test_tile_that_does_not_divide_the_contracting_axis_is_rejected():
  with pytest.raises(ValueError, match="does not divide"):
    qz.tile(np.zeros((48, 3)), 0, 32)
  layer, x = dense(QuantConfig(granularity=32)), np.zeros((2, 48), np.float32)
  with pytest.raises(ValueError, match="does not divide axis 0 of length 48"):
    jax.eval_shape(layer.init, jax.random.key(0), x)
  jax.eval_shape(dense(QuantConfig(granularity=16)).init, jax.random.key(0), x)  # 16 divides


def test_serving_an_unconverted_model_is_rejected():
  x = np.zeros((2, 16), np.float32)
  params = {"kernel": np.ones((16, 8), np.float32), "bias": np.zeros(8, np.float32)}
  with pytest.raises(ValueError, match="convert"):
    jax.eval_shape(functools.partial(dense(QuantConfig(), "serve").apply, {"params": params}), x)
  with pytest.raises(ValueError, match="mode"):
    jax.eval_shape(functools.partial(dense(QuantConfig(), "eval").apply, {"params": params}), x)
