"""HF import/export: tiny random transformers models, saved with save_pretrained, must give
the same logits through models.hf as in torch, scanned or not, sharded or not, and back."""

import dataclasses
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import bert_config, gpt2_config, inputs, llama_config, save_randomized  # noqa: E402
from models import PRESETS, hf  # noqa: E402
import parallel  # noqa: E402

TOL = 1e-4  # float32


LLAMA3 = dict(  # Llama 3.1's scaled RoPE
  rope_type="llama3",
  rope_theta=10000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,  # short: 3 of head_dim 8's 4 wavelengths are longer
)
WINDOW = 8  # < L: the window matters; >= 8: no row of inputs() sees only padding

MAKERS = {
  "bert_mlm": lambda: transformers.BertForMaskedLM(bert_config()),
  "bert_classify": lambda: transformers.BertForSequenceClassification(bert_config(num_labels=3)),
  "bert_base": lambda: transformers.BertModel(bert_config()),
  "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2_config()),
  "llama": lambda: transformers.LlamaForCausalLM(llama_config()),
  "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
    llama_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rope_theta=500.0)
  ),
  "llama3_rope": lambda: transformers.LlamaForCausalLM(llama_config(rope_parameters=LLAMA3)),
  "mistral": lambda: transformers.MistralForCausalLM(
    llama_config(transformers.MistralConfig, sliding_window=WINDOW)
  ),
  "qwen2": lambda: transformers.Qwen2ForCausalLM(llama_config(transformers.Qwen2Config)),
  "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(
    llama_config(transformers.Qwen2Config, tie_word_embeddings=True)
  ),
}


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
  """name -> (directory, torch model, reference logits); every weight randomized."""
  models_ = save_randomized(tmp_path_factory, MAKERS)
  return {n: (d, m, _torch_out(m, *inputs())) for n, (d, m) in models_.items()}


@pytest.mark.parametrize(
  "name,scan",
  [(n, False) for n in MAKERS] + [(n, True) for n in ("bert_mlm", "gpt2", "llama", "qwen2")],
)
def test_import_matches_transformers(saved, name, scan):
  directory, _, ref = saved[name]
  model, params = hf.from_pretrained(directory, scan_layers=scan)
  assert ("layers" in params) == scan
  np.testing.assert_allclose(_ours(model, params, *inputs()), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
  "name,override,same",
  [
    ("mistral", dict(record_attention=True), True),  # the explicit attention path
    ("mistral", dict(attention_impl="xla"), True),
    ("mistral", dict(sliding_window=0), False),  # the window matters
    ("llama3_rope", dict(rope_type="default"), False),  # the scaling matters
  ],
)
def test_window_and_rope_scaling(saved, name, override, same):
  """Every attention path honours the window; without the window or the scaling, the logits
  are not transformers'."""
  directory, _, ref = saved[name]
  model, params = hf.from_pretrained(directory, **override)
  ours = _ours(model, params, *inputs())
  if same:
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
  else:
    assert np.abs(ours - ref).max() > 100 * TOL


def test_qwen2_exports_a_window(saved, tmp_path):
  """Qwen2 with a sliding window on every layer: transformers reads it back as ours."""
  model, params = hf.from_pretrained(saved["qwen2"][0], sliding_window=WINDOW)
  hf.save_pretrained(model.config, params, str(tmp_path))
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert reloaded.config.layer_types == ["sliding_attention"] * 2
  ours = _ours(model, params, *inputs())
  np.testing.assert_allclose(_torch_out(reloaded, *inputs()), ours, atol=TOL, rtol=0)
  assert np.abs(ours - saved["qwen2"][2]).max() > 100 * TOL


@pytest.mark.parametrize("name", list(MAKERS))
def test_export_reloads_in_transformers(saved, name, tmp_path):
  directory, torch_model, ref = saved[name]
  model, params = hf.from_pretrained(directory, scan_layers=name == "gpt2")
  hf.save_pretrained(model.config, params, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no .tmp left
  reloaded = type(torch_model).from_pretrained(str(tmp_path)).eval()
  np.testing.assert_allclose(_torch_out(reloaded, *inputs()), ref, atol=TOL, rtol=0)
  model2, params2 = hf.from_pretrained(str(tmp_path))  # and back: the same config
  assert model2.config == dataclasses.replace(model.config, scan_layers=False)
  np.testing.assert_allclose(_ours(model2, params2, *inputs()), ref, atol=TOL, rtol=0)


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
    np.testing.assert_allclose(_ours(model, params, *inputs()), ref, atol=TOL, rtol=0)


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
  logits = _ours(model, params, *inputs())
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

  os.makedirs(tmp_path / "no_weights")
  with open(tmp_path / "no_weights" / "config.json", "w") as f:
    f.write("{}")
  with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
    hf.from_pretrained(str(tmp_path / "no_weights"))
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    hf.from_pretrained(str(tmp_path / "absent"))


def _qwen2_window(start, layer_types=None):
  """Qwen2's config.json keys for a window of 4 on layers start... (or as layer_types say)."""
  return dict(
    use_sliding_window=True, sliding_window=4, max_window_layers=start, layer_types=layer_types
  )


@pytest.mark.parametrize(
  "name,edit,words",
  [
    ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3 RoPE needs"),
    ("llama", dict(rope_parameters=None, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ("llama", dict(attention_bias=True), "attention_bias / mlp_bias"),
    ("qwen2", _qwen2_window(1), "use_sliding_window / max_window_layers / layer_types"),
    ("qwen2", _qwen2_window(0, ["full_attention", "sliding_attention"]), "some layers only"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("bert_mlm", dict(position_embedding_type="relative_key"), "position_embedding_type"),
  ],
)
def test_unsupported_config_names_the_field(saved, name, edit, words):
  config = {**hf.Checkpoint(saved[name][0]).config, **edit}
  with pytest.raises(ValueError, match=re.escape(words)):
    hf.config_from_hf(config)


@pytest.mark.parametrize(
  "edit,window",
  [
    (dict(use_sliding_window=False, sliding_window=4), 0),
    (_qwen2_window(0), 4),
    (_qwen2_window(2), 0),
  ],
)
def test_qwen2_window_on_all_layers_or_none(saved, edit, window):
  config = {**hf.Checkpoint(saved["qwen2"][0]).config, **edit}
  assert hf.config_from_hf(config).sliding_window == window


def test_offline_hub_name_says_what_to_do(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(OSError, match="not a local directory and could not be fetched"):
    hf.from_pretrained("no-such-org/no-such-model")


@pytest.mark.parametrize(
  "preset,fields,words",
  [
    ("tiny", dict(norm="rmsnorm"), "gpt2 needs norm='layernorm'"),  # with learned positions
    ("llama-1b", dict(use_bias=True, sliding_window=4), "mistral needs use_bias=False"),
    ("tiny", dict(n_kv_heads=2), "gpt2 needs n_kv_heads == n_heads"),
  ],
)
def test_export_refuses_what_hf_cannot_hold(preset, fields, words):
  cfg = dataclasses.replace(PRESETS[preset], **fields)
  with pytest.raises(ValueError, match=re.escape(words)):
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
