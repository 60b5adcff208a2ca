"""LoRA / QLoRA: the adapters through the dot_general hook, merge and unmerge, the frozen base
(bitwise as loaded, no optimizer state), QLoRA's NF4 base, sharding, resume, bad input."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
import flax.linen as nn

import models
from compress import lora
from compress.quant import nf4
from experiments import chaos, experiment, train
from experiments.configs import lm
from experiments.data.tokenizer import get_tokenizer
from models import peft as peft_files
from steps import run_steps

REPO = pathlib.Path(__file__).resolve().parents[1]
SELECT = r"attn/(query|key|value|out)$|mlp/(wi|wg|wo)$"


def _n_in(path, ndim):
  return 2 if path.endswith("attn/out/kernel") else 1


def _model_and_params(scan, gated=False):
  """A tiny decoder with adapters on every block layer, B random (so the adapters matter)."""
  mc = models.get_preset(
    "tiny",
    d_model=32,
    d_ff=64,
    n_heads=2,
    vocab_size=64,
    max_len=16,
    scan_layers=scan,
    gated_mlp=gated,
    activation="silu" if gated else "gelu_tanh",
  )
  model = models.build(mc, dot_general_cls=lora.lora_dot(SELECT, rank=4, alpha=8.0))
  ids = jnp.arange(24).reshape(2, 12) % 64
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
  flat = traverse_util.flatten_dict(params, sep="/")
  for i, k in enumerate(sorted(flat)):
    if k.endswith("lora/b"):
      flat[k] = 0.1 * jax.random.normal(jax.random.PRNGKey(i), flat[k].shape)
  return mc, model, traverse_util.unflatten_dict(flat, sep="/"), ids


@pytest.mark.parametrize("scan,gated", [(False, False), (True, True)], ids=["layers", "scanned"])
def test_merge_unmerge_and_zero_init(scan, gated):
  """Merged (W + alpha/r A B in a plain model) and unmerged logits agree to 1e-5; unmerge
  gives the kernels back; with B = 0 (the init) the adapted model is the base model."""
  mc, model, params, ids = _model_and_params(scan, gated)
  n_layers = 1 if scan else mc.n_layers
  n_dense = 4 + (3 if gated else 2)
  assert len(jax.tree.leaves(lora.adapters(params))) == 2 * n_dense * n_layers
  adapted = model.apply({"params": params}, ids)
  plain = models.build(mc)
  merged = lora.merge(params, 8.0)
  assert not jax.tree.leaves(lora.adapters(merged))
  np.testing.assert_allclose(plain.apply({"params": merged}, ids), adapted, atol=1e-5, rtol=0)
  back = lora.unmerge(merged, lora.adapters(params), 8.0)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  zero = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("['b']") else x, params
  )
  np.testing.assert_array_equal(
    model.apply({"params": zero}, ids), plain.apply({"params": lora.merge(zero, 8.0)}, ids)
  )


def test_quantized_base_lies_on_its_blockwise_grid():
  """quantize_base: each adapted kernel is its NF4 round trip in blocks along its input (a
  torch weight [out, in] flattened); int4: codes in [-7, 7] times each block's absmax / 7.
  Unadapted leaves (embeddings, norms, adapters) are untouched."""
  mc, _, params, _ = _model_and_params(False)
  q = lora.quantize_base(params, "nf4", 16, _n_in)
  w = params["layers_0"]["attn"]["out"]["kernel"]  # [H, D, E]: two input axes
  expect = nf4.nf4_roundtrip(w.reshape(-1, w.shape[-1]).T, 16).T.reshape(w.shape)
  np.testing.assert_array_equal(q["layers_0"]["attn"]["out"]["kernel"], expect)
  np.testing.assert_array_equal(q["embed"]["embedding"], params["embed"]["embedding"])
  np.testing.assert_array_equal(
    q["layers_1"]["mlp"]["wi"]["lora"]["a"], params["layers_1"]["mlp"]["wi"]["lora"]["a"]
  )
  q4 = lora.quantize_base(params, "int4", 16, _n_in)
  w = params["layers_1"]["mlp"]["wi"]["kernel"]  # [E, F]
  blocks = np.asarray(q4["layers_1"]["mlp"]["wi"]["kernel"]).T.reshape(-1, 16)
  step = np.abs(np.asarray(w).T.reshape(-1, 16)).max(1, keepdims=True) / 7
  codes = blocks / step
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  assert np.abs(np.round(codes)).max() == 7
  with pytest.raises(ValueError, match="lora.block=24 does not divide the input size 32"):
    lora.quantize_base(params, "nf4", 24, _n_in)


def _lora_config(**lora_fields):
  c = lm.get_config("tiny")
  c.lora.update(**{"method": "lora", "rank": 4, **lora_fields})
  return c


@pytest.mark.parametrize("fields", [dict(), dict(base="nf4", dropout=0.1)], ids=["lora", "qlora"])
def test_sharded_lora_equals_one_device(fields):
  """The first steps' losses on a 2x2x2 mesh equal one device's; the adapters shard like
  their kernels (the query's B [r, H, D] splits heads over "tensor")."""
  one, _, _ = run_steps(_lora_config(**fields), 3, jax.devices()[:1])
  sharded, state, _ = run_steps(_mesh(_lora_config(**fields)), 3)
  np.testing.assert_allclose(sharded, one, atol=2e-5, rtol=0)
  assert one[0] != one[-1]  # the adapters train
  b = state["params"]["layers_0"]["attn"]["query"]["lora"]["b"]
  assert "tensor" in tuple(b.sharding.spec), b.sharding


def _mesh(c):
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_only_adapters_train_from_a_trained_base(tiny_lm_run, tmp_path, base):
  """LoRA from a trained run: after training the base is bitwise the loaded one (QLoRA: the
  loaded one rounded to NF4); the optimizer state holds the adapters only (its bytes in the
  eval row); the merged model's eval loss equals the adapted one's; the PEFT adapter files
  are written and read back exactly. QLoRA: the base's NF4 storage (about 4.1 bits a weight)
  reads back as the base it trained on and gives the same eval loss."""
  base_dir, _, _ = tiny_lm_run
  c = _lora_config(base=base)
  c.init_from = str(base_dir)
  c.train.update(steps=8, checkpoint_every=8, log_every=4)
  c.eval.update(every=8, steps=2)
  workdir = tmp_path / "lora"
  final = train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
  _, loaded = chaos._state(str(base_dir))
  _, trained = chaos._state(str(workdir))
  if base == "nf4":  # the adapted layers' kernels rounded, as prepare rounds them
    grafted = {
      **traverse_util.flatten_dict(loaded["params"]),
      **traverse_util.flatten_dict(lora.adapters(trained["params"])),
    }
    rounded = jax.jit(lambda p: lora.quantize_base(p, "nf4", 64, _n_in))(
      traverse_util.unflatten_dict(grafted)
    )
    flat = traverse_util.flatten_dict(rounded)
    loaded["params"] = traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if "lora" not in k}
    )
  flat_a = traverse_util.flatten_dict(loaded["params"], sep="/")
  flat_b = traverse_util.flatten_dict(trained["params"], sep="/")
  adapters = {k for k in flat_b if lora.trains(k)}
  assert adapters and set(flat_b) - adapters == set(flat_a)
  for k, v in flat_a.items():
    np.testing.assert_array_equal(flat_b[k], v, err_msg=k)
  assert any(np.abs(flat_b[k]).max() > 0 for k in adapters if k.endswith("/b"))
  opt = jax.tree_util.tree_flatten_with_path(trained["opt"])[0]
  arrays = {jax.tree_util.keystr(p): v for p, v in opt if np.ndim(v) > 0}
  assert arrays and all("['lora']" in k for k in arrays), sorted(arrays)[:5]
  n = sum(np.size(flat_b[k]) for k in adapters)
  assert final["trainable_params"] == n
  assert 2 * 4 * n <= final["opt_state_bytes"] < 2 * 4 * n + 64  # Adam's mu and nu, a count
  assert final["merged_eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
  if base == "nf4":
    assert final["nf4_eval_loss"] == final["eval_loss"]
    assert final["nf4_base_bytes"] < 0.15 * final["nf4_base_float32_bytes"]
  mc = experiment.model_config(c, get_tokenizer(c.data.tokenizer))
  read, rank, alpha = peft_files.load_adapter(mc, str(workdir / "adapter"))
  assert (rank, alpha) == (4, c.lora.alpha)
  got = traverse_util.flatten_dict(read, sep="/")
  assert set(got) == adapters
  for k in adapters:
    np.testing.assert_array_equal(got[k], flat_b[k], err_msg=k)


def test_kill_and_resume_with_lora_and_qat_is_bit_exact(tmp_path, monkeypatch):
  """LoRA on a 4-bit QAT base, SIGKILLed after step 10 and rerun: every metrics row and every
  array of the final checkpoint equal the uninterrupted run's."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  config = f"{REPO}/experiments/configs/lm.py:tiny"
  overrides = [
    *("--config.train.steps=20", "--config.train.checkpoint_every=5"),
    *("--config.train.log_every=5", "--config.eval.every=20", "--config.eval.steps=1"),
    *("--config.lora.method=lora", "--config.lora.rank=4", "--config.lora.export=false"),
    *("--config.quant.method=qat", "--config.quant.bits=4", "--config.quant.export=false"),
  ]
  reference = str(tmp_path / "reference")
  chaos.run_to_end(config, reference, overrides)
  workdir = str(tmp_path / "run")
  kill = chaos.interrupt(chaos.Run(config, workdir, overrides), "kill", 0, after_step=10)
  assert kill["exit"] == -9 and kill["latest_checkpoint"] is not None, kill
  rerun = chaos.run_to_end(config, workdir, overrides)
  assert rerun.said(f"Restored the checkpoint at step {kill['latest_checkpoint']}")
  assert chaos.compare(reference, workdir) == []


@pytest.mark.parametrize(
  "update,message",
  [
    (dict(rank=0), r"lora.rank=0: the rank must be a positive integer"),
    (dict(alpha=0.0), r"lora.alpha=0.0: alpha must be > 0"),
    (dict(rank=200), r"lora.rank=200 exceeds layers_0/attn/query's kernel \(128, 4, 32\)"),
    (dict(select="nothing_here"), r"lora.select='nothing_here' matched no layer"),
    (dict(base="nf4", block=48), r"lora.block=48 does not divide the input size 128"),
    (dict(base="fp4"), r"lora.base='fp4': choose one of"),
  ],
)
def test_bad_lora_config_fails_before_compiling(no_compile, update, message):
  with pytest.raises(ValueError, match=message):
    experiment.build(_lora_config(**update))


def test_lora_from_an_hf_checkpoint_exports_what_peft_loads(tmp_path):
  """LoRA from `hf:` (a random GPT-2 with the tiny preset's shapes, saved here): the base
  stays the HF weights bit for bit, and PEFT's model with the exported adapter gives our
  adapted model's logits (1e-4, float32)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(
    vocab_size=264, n_embd=128, n_layer=2, n_head=4, n_positions=256
  )
  hf_dir = str(tmp_path / "gpt2")
  transformers.GPT2LMHeadModel(hf_config).save_pretrained(hf_dir)
  c = _lora_config()
  c.init_from = "hf:" + hf_dir
  c.train.update(steps=4, checkpoint_every=4, log_every=2, batch_size=8, seq_len=32)
  c.eval.update(every=4, steps=1, batch_size=8)
  c.optim.lr = 1e-2  # B moves away from zero in 4 steps
  workdir = tmp_path / "run"
  train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
  _, state = chaos._state(str(workdir))
  hf_params = models.hf.from_pretrained(hf_dir)[1]
  mc = experiment.model_config(c, get_tokenizer(c.data.tokenizer))
  trained = traverse_util.flatten_dict(state["params"], sep="/")
  for k, v in traverse_util.flatten_dict(hf_params, sep="/").items():
    np.testing.assert_array_equal(trained[k], v, err_msg=k)
  ids = np.arange(24).reshape(2, 12) % 264
  model = models.build(mc, dot_general_cls=lora.lora_dot(SELECT, 4, c.lora.alpha))
  ours = model.apply({"params": state["params"]}, ids)
  base = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    theirs = peft.PeftModel.from_pretrained(base, str(workdir / "adapter"))(
      torch.tensor(ids)
    ).logits.numpy()
  without = models.build(mc).apply({"params": lora.merge(state["params"], 0.0)}, ids)
  assert np.abs(np.asarray(ours) - np.asarray(without)).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
