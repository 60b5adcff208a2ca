"""models.peft: our LoRA adapters written as PEFT adapter files load onto the transformers model
with the logits of our merged kernels, and PEFT's own adapter files read back into our tree."""

import copy
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_helpers import bert_config, gpt2_config, inputs, llama_config, save_randomized  # noqa: E402
from models import hf  # noqa: E402
from models import peft as mpeft  # noqa: E402

TOL = 1e-4  # float32
RANK, ALPHA = 4, 8.0
ALL = r"attn/(query|key|value|out)|mlp/"

MAKERS = {
  "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2_config()),
  "llama": lambda: transformers.LlamaForCausalLM(llama_config()),
  "bert": lambda: transformers.BertForMaskedLM(bert_config()),
}
TARGETS = {  # what a PEFT user lists for every attention and MLP layer
  "gpt2": ["c_attn", "c_proj", "c_fc"],
  "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  "bert": ["query", "key", "value", "dense"],  # also BERT's MLM transform dense
}


def _torch_out(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return out.logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (directory, torch model); every weight randomized."""
  return save_randomized(tmp_path_factory, MAKERS)


def _ours(model, params):
  ids, mask = inputs()
  return np.asarray(model.apply({"params": params}, ids, attention_mask=mask))


def _random_adapters(params, select=ALL, rank=RANK, seed=0):
  """Random a and b (b not zero: the update matters) beside every kernel matching `select`."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, w in traverse_util.flatten_dict(params).items():
    name = "/".join(path[:-1])
    if path[-1] != "kernel" or not re.search(select, name):
      continue
    stacked = path[0] == "layers"
    shape = w.shape[1:] if stacked else w.shape
    n_in = 2 if name.endswith("attn/out") else 1
    lead = w.shape[:1] if stacked else ()
    a = rng.normal(0, 0.2, (*lead, *shape[:n_in], rank))
    b = rng.normal(0, 0.2, (*lead, rank, *shape[n_in:]))
    out[(*path[:-1], "lora", "a")] = a.astype(np.float32)
    out[(*path[:-1], "lora", "b")] = b.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def merge(params, adapters, alpha):
  """W + alpha / r * tensordot(a, b, 1) for every adapter (r: a's last axis)."""
  flat = dict(traverse_util.flatten_dict(params))
  for path, a in traverse_util.flatten_dict(adapters).items():
    if path[-1] != "a":
      continue
    layer = path[:-2]
    b = traverse_util.flatten_dict(adapters)[(*layer, "lora", "b")]
    w = flat[(*layer, "kernel")]
    if layer[0] == "layers":
      delta = np.stack([np.tensordot(x, y, 1) for x, y in zip(np.asarray(a), np.asarray(b))])
    else:
      delta = np.tensordot(np.asarray(a), np.asarray(b), 1)
    flat[(*layer, "kernel")] = w + (alpha / a.shape[-1]) * delta
  return traverse_util.unflatten_dict(flat)


def _load_peft(torch_model, directory):
  """PeftModel.from_pretrained, every adapter key in the file used and none missing."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wrapped = peft.PeftModel.from_pretrained(torch_model, directory).eval()
  assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]
  return wrapped


def _peft_out(torch_model, directory):
  return _torch_out(_load_peft(copy.deepcopy(torch_model), directory), *inputs())


def _assert_same_tree(x, y):
  fx, fy = traverse_util.flatten_dict(x), traverse_util.flatten_dict(y)
  assert sorted(fx) == sorted(fy)
  for k in fx:
    np.testing.assert_array_equal(np.asarray(fx[k]), np.asarray(fy[k]), err_msg=str(k))


@pytest.mark.parametrize(
  "name,scan", [("gpt2", False), ("llama", False), ("bert", False), ("llama", True)]
)
def test_export_loads_in_peft_and_back(saved, name, scan, tmp_path):
  directory, torch_model = saved[name]
  model, params = hf.from_pretrained(directory, scan_layers=scan)
  adapters = _random_adapters(params)
  mpeft.save_adapter(model.config, adapters, str(tmp_path), rank=RANK, alpha=ALPHA)
  ours = _ours(model, merge(params, adapters, ALPHA))
  assert np.abs(ours - _ours(model, params)).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(ours, _peft_out(torch_model, str(tmp_path)), atol=TOL, rtol=0)
  back, rank, alpha = mpeft.load_adapter(model.config, str(tmp_path))
  assert (rank, alpha) == (RANK, ALPHA)
  _assert_same_tree(back, adapters)


@pytest.mark.parametrize(
  "name,select,targets",
  [
    ("bert", r"layers_1/mlp/wo", ["1.output.dense"]),  # not attention.output.dense
    ("gpt2", r"layers_0/attn/(query|value)", ["0.attn.c_attn"]),  # two of c_attn's parts
    ("llama", r"mlp/", ["down_proj", "gate_proj", "up_proj"]),
    ("bert", ALL, ["intermediate.dense", "key", "output.dense", "query", "value"]),  # not "dense"
  ],
)
def test_partial_selection(saved, name, select, targets, tmp_path):
  directory, torch_model = saved[name]
  model, params = hf.from_pretrained(directory)
  adapters = _random_adapters(params, select)
  mpeft.save_adapter(model.config, adapters, str(tmp_path), rank=RANK, alpha=ALPHA)
  with open(tmp_path / "adapter_config.json") as f:
    assert json.load(f)["target_modules"] == targets
  ours = _ours(model, merge(params, adapters, ALPHA))
  np.testing.assert_allclose(ours, _peft_out(torch_model, str(tmp_path)), atol=TOL, rtol=0)
  back, _, _ = mpeft.load_adapter(model.config, str(tmp_path))
  _assert_same_tree(back, adapters)


def _peft_written(torch_model, directory, **kw):
  """An adapter PEFT trains and saves itself (random B: the update matters)."""
  config = dict(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, **kw)
  wrapped = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(**config)).eval()
  wrapped.save_pretrained(directory)
  return _torch_out(wrapped, *inputs())


@pytest.mark.parametrize(
  "name,scan", [("gpt2", False), ("llama", False), ("bert", False), ("gpt2", True)]
)
def test_import_of_peft_written_adapter(saved, name, scan, tmp_path):
  directory, torch_model = saved[name]
  ref = _peft_written(torch_model, str(tmp_path), target_modules=TARGETS[name])
  model, params = hf.from_pretrained(directory, scan_layers=scan)
  adapters, rank, alpha = mpeft.load_adapter(model.config, str(tmp_path))
  assert rank == RANK  # GPT-2's c_attn: query, key and value each get the whole rank-4 A
  ours = _ours(model, merge(params, adapters, alpha))
  assert np.abs(ours - _ours(model, params)).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def test_bare_body(saved, tmp_path):
  """Head "none" exports BertModel's names (no "bert." prefix); either kind of file reads."""
  directory, _ = saved["bert"]
  model, params = hf.from_pretrained(directory, head="none")
  adapters = _random_adapters(params)
  mpeft.save_adapter(model.config, adapters, str(tmp_path), rank=RANK, alpha=ALPHA)
  body = transformers.BertModel.from_pretrained(directory).eval()
  wrapped = _load_peft(body, str(tmp_path))
  ids, mask = inputs()
  with torch.no_grad():
    ref = wrapped(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  ours = _ours(model, merge(params, adapters, ALPHA))
  np.testing.assert_allclose(ours, ref.last_hidden_state.numpy(), atol=TOL, rtol=0)
  mlm = hf.config_from_hf(hf.Checkpoint(directory).config)  # BertForMaskedLM's
  _assert_same_tree(mpeft.load_adapter(mlm, str(tmp_path))[0], adapters)


def test_ranks_and_scales_that_differ(saved, tmp_path):
  """rank_pattern, alpha_pattern and rsLoRA: one rank only with pad=True, scales folded."""
  directory, torch_model = saved["llama"]
  ref = _peft_written(
    torch_model,
    str(tmp_path),
    target_modules=TARGETS["llama"],
    rank_pattern={"up_proj": 8},
    alpha_pattern={"down_proj": 3.0},
    use_rslora=True,
  )
  model, params = hf.from_pretrained(directory)
  with pytest.raises(ValueError, match="differ in rank.*pad=True"):
    mpeft.load_adapter(model.config, str(tmp_path))
  adapters, rank, alpha = mpeft.load_adapter(model.config, str(tmp_path), pad=True)
  assert rank == 8
  np.testing.assert_allclose(_ours(model, merge(params, adapters, alpha)), ref, atol=TOL, rtol=0)


def test_mixed_ranks_export(saved, tmp_path):
  """Adapters whose rank is not `rank` get rank_pattern entries and keep alpha / their rank."""
  directory, torch_model = saved["gpt2"]
  model, params = hf.from_pretrained(directory)
  adapters = {
    **_random_adapters(params, r"layers_0/(attn/(query|key)|mlp/wi)", rank=2),
    **_random_adapters(params, r"layers_1/", rank=RANK, seed=1),
  }
  mpeft.save_adapter(model.config, adapters, str(tmp_path), rank=RANK, alpha=ALPHA)
  ours = _ours(model, merge(params, adapters, ALPHA))
  np.testing.assert_allclose(ours, _peft_out(torch_model, str(tmp_path)), atol=TOL, rtol=0)


def test_wrong_adapters_name_the_problem(saved, tmp_path):
  llama_dir, llama = saved["llama"]
  _peft_written(llama, str(tmp_path / "llama"), target_modules=TARGETS["llama"])
  gpt2 = hf.config_from_hf(hf.Checkpoint(saved["gpt2"][0]).config)
  with pytest.raises(ValueError, match="LlamaForCausalLM.*config of the model it was trained"):
    mpeft.load_adapter(gpt2, str(tmp_path / "llama"))
  config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
  config.pop("auto_mapping", None)  # no class named: the module names tell
  (tmp_path / "llama" / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="does not have.*another architecture"):
    mpeft.load_adapter(gpt2, str(tmp_path / "llama"))
  llama_cfg = hf.config_from_hf(hf.Checkpoint(llama_dir).config)
  with pytest.raises(ValueError, match=r"up_proj has lora_A .*other sizes"):
    mpeft.load_adapter(dataclasses.replace(llama_cfg, d_ff=64), str(tmp_path / "llama"))
  config["use_dora"] = True
  (tmp_path / "llama" / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="use_dora=True"):
    mpeft.load_adapter(llama_cfg, str(tmp_path / "llama"))
  with pytest.raises(ValueError, match="no kernel at"):
    adapters = {
      "layers_5": {"mlp": {"wi": {"lora": {"a": np.ones((32, 2)), "b": np.ones((2, 48))}}}}
    }
    mpeft.save_adapter(llama_cfg, adapters, str(tmp_path / "x"), rank=2, alpha=4.0)
