"""One-shot post-training compression in the train loop: calibration statistics (equal on 8
devices and on 1), the layer-by-layer pass (sharded equals one device), GPTQ's stored grids
through QAT, export and serving, SparseGPT's zeros kept by pruning, AWQ / SmoothQuant's scale
moving exact in float, and bad input rejected with the key and the fix."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from compress.oneshot.stats import COLLECTION, StatsDot
from experiments import experiment
from experiments.configs import lm
from experiments.methods import oneshot as oneshot_method


def _stats(x, n_in_shape, out=3):
  names = tuple(f"i{i}" for i in range(len(n_in_shape)))
  dense = models.Dense(out, names + ("o",), use_bias=False, dot_general_cls=StatsDot)
  v = dense.init(jax.random.key(0), x)
  _, new = dense.apply(v, x, mutable=[COLLECTION])
  return new[COLLECTION]["StatsDot_0"]


@pytest.mark.parametrize("n_in", [1, 2])
def test_stats_are_the_sums_over_tokens(n_in):
  """h = X^T X, absmax, abssum and the token count of the layer's input, contracting axes
  flattened in order (a [H, D, E] kernel's input h * D + d)."""
  rng = np.random.default_rng(0)
  shape = (3, 5) + ((4,) if n_in == 1 else (2, 3))
  x = rng.normal(size=shape).astype(np.float32)
  st = _stats(jnp.asarray(x), shape[2:])
  x2 = x.reshape(15, -1).astype(np.float64)
  np.testing.assert_allclose(st["h"], x2.T @ x2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st["absmax"], np.abs(x2).max(0), rtol=1e-6)
  np.testing.assert_allclose(st["abssum"], np.abs(x2).sum(0), rtol=1e-5)
  assert float(st["tokens"]) == 15


def test_stats_on_8_devices_equal_one_device():
  """A layer's statistics with the batch sharded over 8 devices (XLA reduces the sums) equal
  those on one device."""
  mc = models.get_preset("tiny", d_model=32, d_ff=64, n_heads=2, vocab_size=64, max_len=16)
  block = models.Block(mc, StatsDot)
  x = jax.random.normal(jax.random.key(1), (8, 16, 32))
  pos = jnp.broadcast_to(jnp.arange(16), (8, 16))
  v = block.init(jax.random.key(0), x, None, pos, True, None)
  params = nn.meta.unbox(v["params"])
  fn = lambda p, x: block.apply(  # noqa: E731
    {"params": p}, x, None, pos, True, None, mutable=[COLLECTION]
  )[1][COLLECTION]
  one = jax.jit(fn)(params, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))  # as parallel.make_mesh
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  eight = jax.jit(fn)(params, xs)
  assert len(xs.sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4), eight, one)


def _config(base_dir, method, **sections):
  c = lm.get_config("tiny")
  c.init_from = str(base_dir)
  c.train.steps = 0
  c.oneshot.update(method=method, calib_batches=2)
  for section, fields in sections.items():
    c[section].update(**fields)
  return c


GPTQ = dict(quant=dict(method="ptq", bits=3, act_bits=0, calibrator="stored"))
JOINT = dict(
  prune=dict(method="oneshot", granularity="2:4", select="^layers"),
  quant=dict(method="ptq", bits=4, act_bits=0, calibrator="stored"),
)


def _prepared(c, devices=None, prepare=True):
  """(experiment, state) after loading init_from and every method's prepare, as a run does."""
  exp = experiment.build(c, devices=devices)
  state, shardings = exp.init_state()
  run = experiment.Run(exp, "", shardings, devices)
  state = run.init(c.init_from)
  for m in exp.methods if prepare else ():
    state = m.prepare(run, state, fresh=True)
  return exp, state


def _run(c, tmp_path, name, devices=None):
  from experiments import train

  return train.train_and_evaluate(c, str(tmp_path / name), devices=devices)


RUNS = {"gptq": ("gptq", GPTQ), "sparsegpt-2:4+int4": ("sparsegpt", JOINT)}


@pytest.fixture(scope="module")
def one_device_run(tiny_lm_run, tmp_path_factory):
  """`get(name)`: RUNS[name]'s run on one device, made once per module (the reference of the
  sharded runs, and the prepared state the GPTQ tests read): (config, its eval row, workdir)."""
  runs = {}

  def get(name):
    if name not in runs:
      method, sections = RUNS[name]
      c = _config(tiny_lm_run[0], method, **sections)
      workdir = tmp_path_factory.mktemp(name.replace(":", "-"))
      runs[name] = c, _run(c, workdir, "one", jax.devices()[:1]), workdir / "one"
    return runs[name]

  return get


def _saved_state(c, workdir):
  """{"params", "collections"} as a run on one device saved them (its step-0 checkpoint: after
  every method's prepare), restored exactly."""
  import parallel

  abstract, _ = experiment.build(c, devices=jax.devices()[:1]).shard_shapes()
  target = {k: abstract[k] for k in ("params", "collections")}
  return parallel.load_variables(str(workdir / "checkpoints"), target, step=0)


@pytest.fixture(scope="module")
def trained(tiny_lm_run):
  """The trained model's state as a one-shot run loads it, before any method's prepare."""
  return _prepared(_config(tiny_lm_run[0], "gptq", **GPTQ), jax.devices()[:1], prepare=False)[1]


@pytest.fixture(scope="module")
def gptq_states(one_device_run, trained):
  """(the 1-device GPTQ run's prepared state, the trained state it loaded)."""
  c, _, workdir = one_device_run("gptq")
  return _saved_state(c, workdir), trained


@pytest.mark.parametrize("name", list(RUNS))  # Wanda reads the same statistics (diag H)
def test_run_sharded_equals_one_device_and_export_equals_eval(one_device_run, tmp_path, name):
  """The whole pass on a 2x2x2 mesh gives the eval of one device's; the export as reloaded
  scores what the run's own eval did (GPTQ's stored grids, SparseGPT's zeros)."""
  method, sections = RUNS[name]
  c, one, _ = one_device_run(name)
  c = _config(c.init_from, method, **sections)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  sharded = _run(c, tmp_path, "eight")
  np.testing.assert_allclose(sharded["eval_loss"], one["eval_loss"], rtol=1e-5)
  for prefix in ("serve", "sparse"):
    if f"{prefix}_eval_loss" in one:
      np.testing.assert_allclose(one[f"{prefix}_eval_loss"], one["eval_loss"], rtol=1e-5)
  assert one["oneshot_calib_tokens"] == 2 * c.train.batch_size * c.train.seq_len
  if "prune" in sections:  # 2:4 exactly; int4 also rounds a few kept weights to zero
    assert one["sparsity"] == pytest.approx(0.5, abs=1e-6) or (
      "quant" in sections and 0.5 < one["sparsity"] < 0.52
    )
  assert 0 < one["oneshot_output_error"] < 0.1  # relative ||(W - W') X||^2, mean over kernels


def test_gptq_weights_lie_on_the_grids_it_stored(gptq_states):
  """Every GPTQ kernel is its stored scale times integers in [-3, 3] (3 bits); the stored
  scales are not those round-to-nearest would recompute from the result (so they must be
  stored), and the untouched leaves (embeddings, norms) are as loaded."""
  state, loaded = gptq_states
  quant_c = state["collections"]["quant"]
  recomputed_differs = False
  for layer in ("layers_0", "layers_1"):
    for path in ("attn/query", "attn/out", "mlp/wi", "mlp/wo"):
      node, qnode = state["params"][layer], quant_c[layer]
      for k in path.split("/"):
        node, qnode = node[k], qnode[k]
      w, scale = np.asarray(node["kernel"]), np.asarray(qnode["QuantDot_0"]["w_scale"])
      q = w / scale
      np.testing.assert_allclose(q, np.round(q), atol=1e-4)
      assert np.abs(np.round(q)).max() <= 3
      n_in = 2 if path == "attn/out" else 1
      amax = np.abs(w).max(axis=tuple(range(n_in)), keepdims=True) / 3
      recomputed_differs |= not np.allclose(amax, scale, rtol=1e-6)
  assert recomputed_differs
  for leaf in ("embed", "pos_embed"):
    np.testing.assert_array_equal(
      state["params"][leaf]["embedding"], loaded["params"][leaf]["embedding"]
    )


@pytest.mark.parametrize(
  "method,sections",
  [
    ("smoothquant", dict(quant=dict(method="ptq", bits=8, act_bits=8))),
    ("awq", dict(quant=dict(method="ptq", bits=3, act_bits=0))),
  ],
)
def test_moving_scales_leaves_the_float_model_unchanged(tiny_lm_run, trained, method, sections):
  """AWQ and SmoothQuant divide the norms by s and multiply the kernels' rows by s: the float
  model's logits are unchanged (1e-4), while the kernels did change."""
  c = _config(tiny_lm_run[0], method, **sections)
  exp, state = _prepared(c, jax.devices()[:1])
  loaded = trained
  ids = exp.batch(0)["inputs"][:4]
  float_model = models.build(exp.model_config)
  before = float_model.apply({"params": loaded["params"]}, ids)
  after = float_model.apply({"params": state["params"]}, ids)
  np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
  w0 = loaded["params"]["layers_0"]["attn"]["query"]["kernel"]
  w1 = state["params"]["layers_0"]["attn"]["query"]["kernel"]
  assert not np.allclose(w0, w1)


def test_sparsegpt_zeros_are_the_masks_fine_tuning_keeps(tiny_lm_run, tmp_path):
  """SparseGPT at 50% then 3 fine-tuning steps: prune's masks are SparseGPT's zeros, and the
  fine-tuned model keeps them (sparsity 0.5 in every eval row)."""
  c = _config(
    tiny_lm_run[0], "sparsegpt", prune=dict(method="oneshot", sparsity=0.5, select="^layers")
  )
  c.train.update(steps=3, checkpoint_every=3)
  c.eval.every = 3
  row = _run(c, tmp_path, "ft", jax.devices()[:1])
  assert row["sparsity"] == pytest.approx(0.5, abs=1e-6)
  np.testing.assert_allclose(row["sparse_eval_loss"], row["eval_loss"], rtol=1e-5)


def test_block_stats_bytes_of_the_1b_preset():
  """One layer's statistics of the ~1B preset, from shapes only: what the pass holds at most."""
  mc = models.get_preset("llama-1b")
  n = oneshot_method.block_stats_bytes(mc)
  e, f = mc.d_model, mc.d_ff
  # q, k, v and the gate / up kernels each keep their own copy of their (shared) input's H
  expect = 4 * (3 * (e * e + 2 * e + 1) + (e * e + 2 * e + 1) + 2 * (e * e + 2 * e + 1))
  expect += 4 * (f * f + 2 * f + 1)
  assert n == expect, (n, expect)


@pytest.mark.parametrize(
  "method,sections,message",
  [
    (
      "gptq",
      dict(quant=dict(method="ptq", bits=4, calibrator="stored", tile=48)),
      r"quant.tile=48 does not divide",
    ),
    ("wanda", dict(prune=dict(method="oneshot", granularity="3:5")), r"M=5 does not divide"),
    ("gptq", dict(quant=dict(method="ptq", bits=9, calibrator="stored")), r"quant.bits=9"),
    (
      "gptq",
      dict(quant=dict(method="ptq", bits=4, calibrator="absmax")),
      r"quant.calibrator=stored",
    ),
    ("gptq", {}, r"takes its target from config.quant"),
    (
      "wanda",
      dict(oneshot=dict(calib_batches=0), prune=dict(method="oneshot")),
      r"oneshot.calib_batches=0",
    ),
    ("awq", dict(quant=dict(method="ptq", bits=4, act_bits=8)), r"set quant.act_bits=0"),
    ("smoothquant", dict(quant=dict(method="ptq", bits=8, act_bits=0)), r"set quant.act_bits"),
    ("sparsegpt", dict(prune=dict(method="gradual")), r"prune.method='oneshot'"),
    (
      "gptq",
      dict(oneshot=dict(damp=-1.0), quant=dict(method="ptq", bits=4, calibrator="stored")),
      r"oneshot.damp=-1.0",
    ),
  ],
)
def test_bad_oneshot_config_fails_before_compiling(
  tiny_lm_run, no_compile, method, sections, message
):
  with pytest.raises(ValueError, match=message):
    experiment.build(_config(tiny_lm_run[0], method, **sections))


def test_awq_on_the_encoder_is_refused(no_compile):
  from experiments.configs import classify

  c = classify.get_config("tiny")
  c.init_from = "/nonexistent"
  c.train.steps = 0
  c.oneshot.method = "awq"
  c.quant.update(method="ptq", bits=4, act_bits=0)
  with pytest.raises(ValueError, match="only a pre-LN decoder has"):
    experiment.build(c)


def test_too_few_calibration_tokens_without_dampening(tiny_lm_run):
  """damp=0 and fewer tokens than a layer's inputs: H is singular; the error names
  oneshot.damp and the calibration batches, before any weight is changed."""
  c = _config(tiny_lm_run[0], "gptq", **GPTQ)
  c.oneshot.update(damp=0.0, calib_batches=1)
  c.train.update(batch_size=1, seq_len=64)
  with pytest.raises(ValueError, match=r"not positive definite after dampening oneshot.damp=0.0"):
    _prepared(c, jax.devices()[:1])


def test_awq_and_gptq_from_an_hf_llama(tmp_path):
  """From `hf:` (a random Llama with grouped-query attention, a gated MLP and RMSNorm, saved
  here): AWQ's moved scales leave the float model equal to transformers' logits (1e-4), and a
  GPTQ run's integer export scores as its own eval."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=264,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
  )
  hf_dir = str(tmp_path / "llama")
  transformers.LlamaForCausalLM(hf_config).save_pretrained(hf_dir)
  llama = dict(
    d_model=64, n_kv_heads=2, head_dim=16, d_ff=128, max_len=128, norm="rmsnorm",
    norm_eps=1e-6, positions="rotary", activation="silu", gated_mlp=True, use_bias=False,
    tie_embeddings=False,
  )  # fmt: skip
  awq = _config("hf:" + hf_dir, "awq", quant=dict(method="ptq", bits=4, act_bits=0), model=llama)
  exp, state = _prepared(awq, jax.devices()[:1])
  ids = np.asarray(exp.batch(0)["inputs"][:2, :32])
  ours = models.build(exp.model_config).apply({"params": state["params"]}, ids)
  with torch.no_grad():
    theirs = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()(torch.tensor(ids))
  np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=1e-4, rtol=0)
  row = _run(_config("hf:" + hf_dir, "gptq", **GPTQ, model=llama), tmp_path, "g", jax.devices()[:1])
  np.testing.assert_allclose(row["serve_eval_loss"], row["eval_loss"], rtol=1e-5)


def test_every_oneshot_config_passes_the_method_checks():
  from experiments import methods
  from experiments.configs import oneshot as oneshot_configs

  for arg in oneshot_configs.ARGS:
    c = oneshot_configs.get_config(arg)
    names = [m.name for m in methods.make(c)]
    method = arg.split(",")[1]
    assert ("oneshot" in names) == (method not in ("rtn", "magnitude")), arg


def test_scanned_layers_give_the_unscanned_result(tiny_lm_run, gptq_states):
  """GPTQ on the same trained weights stacked on a layer axis (scan_layers): the same kernels
  and stored scales as layer by layer (1e-5)."""
  state, loaded = gptq_states
  cs = _config(tiny_lm_run[0], "gptq", **GPTQ)
  cs.model.scan_layers = True
  exp = experiment.build(cs, devices=jax.devices()[:1])
  scanned, shardings = exp.init_state()
  run = experiment.Run(exp, "", shardings, jax.devices()[:1])
  scanned["params"] = models.scan_params(loaded["params"], 2)
  for m in exp.methods:
    scanned = m.prepare(run, scanned, fresh=True)
  got = models.unscan_params(scanned["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, state["params"]
  )
  q = models.unscan_params(scanned["collections"]["quant"])
  for layer in ("layers_0", "layers_1"):
    np.testing.assert_allclose(
      q[layer]["mlp"]["wo"]["QuantDot_0"]["w_scale"],
      state["collections"]["quant"][layer]["mlp"]["wo"]["QuantDot_0"]["w_scale"],
      rtol=1e-6,
    )
