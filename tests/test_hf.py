"""HF import/export: tiny random transformers models, saved with save_pretrained, must give
the same logits through models.hf as in torch, scanned or not, sharded or not, and back."""

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import PRESETS, hf  # noqa: E402
import parallel  # noqa: E402

TOL = 1e-4  # float32
V, L = 96, 12  # V splits over a 2 x 2 mesh


def _bert_config(**kw):
  return transformers.BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    **kw,
  )


def _llama_config(**kw):
  return transformers.LlamaConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    intermediate_size=48,
    max_position_embeddings=64,
    **kw,
  )


MAKERS = {
  "bert_mlm": lambda: transformers.BertForMaskedLM(_bert_config()),
  "bert_classify": lambda: transformers.BertForSequenceClassification(_bert_config(num_labels=3)),
  "bert_base": lambda: transformers.BertModel(_bert_config()),
  "gpt2": lambda: transformers.GPT2LMHeadModel(
    transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)
  ),
  "llama": lambda: transformers.LlamaForCausalLM(_llama_config()),
  "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
    _llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_theta=500.0)
  ),
}


def _inputs():
  """Random ids with right padding in two of the three rows."""
  ids = np.random.default_rng(0).integers(0, V, (3, L))
  mask = np.ones((3, L), np.int64)
  mask[1, 8:] = 0
  mask[2, 5:] = 0
  return ids, mask


def _torch_out(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


def _ours(model, params, ids, mask):
  return np.asarray(
    model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, torch model, reference logits); every weight randomized (norms and
  biases too, which HF initializes to 1 and 0)."""
  torch.manual_seed(0)
  ids, mask = _inputs()
  out = {}
  for name, make in MAKERS.items():
    model = make().eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory)
    out[name] = (directory, model, _torch_out(model, ids, mask))
  return out


@pytest.mark.parametrize(
  "name,scan", [(n, False) for n in MAKERS] + [("bert_mlm", True), ("gpt2", True), ("llama", True)]
)
def test_import_matches_transformers(saved, name, scan):
  directory, _, ref = saved[name]
  model, params = hf.from_pretrained(directory, scan_layers=scan)
  assert ("layers" in params) == scan
  np.testing.assert_allclose(_ours(model, params, *_inputs()), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_export_reloads_in_transformers(saved, name, tmp_path):
  directory, torch_model, ref = saved[name]
  model, params = hf.from_pretrained(directory, scan_layers=name == "gpt2")
  hf.save_pretrained(model.config, params, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no .tmp left
  reloaded = type(torch_model).from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_out(reloaded, *_inputs()), ref, atol=TOL, rtol=0)
  model2, params2 = hf.from_pretrained(str(tmp_path))  # and back: the same config
  assert model2.config == dataclasses.replace(model.config, scan_layers=False)
  np.testing.assert_allclose(_ours(model2, params2, *_inputs()), ref, atol=TOL, rtol=0)


def test_bin_bf16_and_sharded_files(saved, tmp_path):
  """pytorch_model.bin, bfloat16 safetensors and a sharded *.index.json load the same."""
  directory, torch_model, ref = saved["llama"]
  _, params = hf.from_pretrained(directory)
  os.makedirs(tmp_path / "bin")  # the older format of many hub checkpoints
  torch.save(torch_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  torch_model.config.to_json_file(tmp_path / "bin" / "config.json")
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  for sub in ("bin", "sharded"):
    _, got = hf.from_pretrained(str(tmp_path / sub))
    jax.tree.map(np.testing.assert_array_equal, got, params)
  torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  torch_model.float()
  _, got = hf.from_pretrained(str(tmp_path / "bf16"))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert a.dtype == jnp.float32  # params are float32 whatever the file holds
    np.testing.assert_array_equal(a, jnp.asarray(b).astype(jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("scan", [False, True])
def test_load_onto_mesh(saved, scan):
  """Each parameter lands in the sharding its logical names ask for, and computes the same."""
  directory, _, ref = saved["llama"]
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  rules = parallel.get_rules("fsdp_tp")
  model, params = hf.from_pretrained(directory, mesh=mesh, rules=rules, scan_layers=scan)
  ids = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  want = parallel.logical_to_shardings(boxed, mesh, rules)
  for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.sharding.is_equivalent_to(spec, got.ndim), (got.sharding, spec)
    for shard in got.addressable_shards:  # each device holds its shard, not the whole tensor
      assert shard.data.shape == spec.shard_shape(got.shape)
  flat = flax.traverse_util.flatten_dict(params)
  matrices = [x for path, x in flat.items() if path[-1] in ("kernel", "embedding")]
  assert all(x.sharding.shard_shape(x.shape) != x.shape for x in matrices)  # really split
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(_ours(model, params, *_inputs()), ref, atol=TOL, rtol=0)


def test_mesh_that_does_not_divide_a_tensor(saved):
  directory = saved["bert_mlm"][0]
  mesh = parallel.make_mesh(data=1, fsdp=1, tensor=8)  # 4 heads over 8 devices
  with pytest.raises(ValueError, match="does not split over the mesh as the rules ask"):
    hf.from_pretrained(directory, mesh=mesh, rules=parallel.get_rules("fsdp_tp"))


def test_new_head_on_a_pretrained_body(saved):
  """An MLM checkpoint as a classifier: the body is the checkpoint's, the head is new."""
  directory = saved["bert_mlm"][0]
  _, mlm = hf.from_pretrained(directory)
  model, params = hf.from_pretrained(directory, head="classify", num_labels=5, seed=1)
  assert model.config.head == "classify" and params["classifier"]["kernel"].shape == (32, 5)
  for k in mlm:
    if k != "mlm_head":
      jax.tree.map(np.testing.assert_array_equal, params[k], mlm[k])
  logits = _ours(model, params, *_inputs())
  assert logits.shape == (3, 5) and np.isfinite(logits).all()


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  """A copy of checkpoint `src` with its tensors / config.json edited."""
  ckpt = hf.Checkpoint(src)
  tensors = {k: ckpt.get(k) for k in ckpt.keys()}
  config = dict(ckpt.config)
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  os.makedirs(dst)
  hf._write_safetensors(
    {k: (v.shape, lambda v=v: v) for k, v in tensors.items()}, f"{dst}/model.safetensors"
  )
  with open(f"{dst}/config.json", "w") as f:
    json.dump(config, f)
  return str(dst)


def test_bad_checkpoints_name_the_problem(saved, tmp_path):
  src = saved["gpt2"][0]
  qkv = "transformer.h.1.attn.c_attn.weight"

  def drop(t):
    del t[qkv]

  def extra(t):
    t["transformer.h.1.attn.rotary.weight"] = np.zeros(3, np.float32)

  def reshape(t):
    t[qkv] = t[qkv][:, :48]

  for edit, words in (
    (drop, ["missing weights", qkv]),
    (extra, ["unexpected weights", "transformer.h.1.attn.rotary.weight"]),
    (reshape, ["shape mismatches", qkv, "(32, 48)", "(32, 96)"]),
  ):
    bad = _rewrite(src, tmp_path / edit.__name__, edit_tensors=edit)
    with pytest.raises(ValueError) as e:
      hf.from_pretrained(bad)
    for w in words:
      assert w in str(e.value)

  def t5(c):
    c.update(architectures=["T5ForConditionalGeneration"], model_type="t5")

  with pytest.raises(ValueError, match="Unsupported architecture 'T5ForConditionalGeneration'"):
    hf.from_pretrained(_rewrite(src, tmp_path / "t5", edit_config=t5))

  def scaled_rope(c):
    c["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}

  llama = saved["llama"][0]
  with pytest.raises(ValueError, match="rope type='llama3'.*only default RoPE"):
    hf.from_pretrained(_rewrite(llama, tmp_path / "rope", edit_config=scaled_rope))
  os.makedirs(tmp_path / "no_weights")
  with open(tmp_path / "no_weights" / "config.json", "w") as f:
    f.write("{}")
  with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
    hf.from_pretrained(str(tmp_path / "no_weights"))
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    hf.from_pretrained(str(tmp_path / "absent"))


def test_offline_hub_name_says_what_to_do(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(OSError, match="not a local directory and could not be fetched"):
    hf.from_pretrained("no-such-org/no-such-model")


def test_export_refuses_what_hf_cannot_hold():
  cfg = dataclasses.replace(PRESETS["tiny"], norm="rmsnorm")  # rmsnorm + learned positions
  with pytest.raises(ValueError, match="No HF architecture matches"):
    hf.save_pretrained(cfg, {}, "/nonexistent")


@pytest.mark.parametrize(
  "preset,hf_config,arch",
  [
    ("bert-base", transformers.BertConfig(), "BertForMaskedLM"),  # bert-base-uncased
    ("gpt2-small", transformers.GPT2Config(), "GPT2LMHeadModel"),  # gpt2
  ],
)
def test_presets_are_the_hub_models(preset, hf_config, arch):
  """glue.py / lm_tfds.py start the bert-base / gpt2-small presets from bert-base-uncased /
  gpt2 (transformers' default configs): their architectures must be the same."""
  theirs = hf.config_from_hf({**hf_config.to_dict(), "architectures": [arch]})
  assert theirs == PRESETS[preset]
