"""The "span" (extractive QA) and "tokens" (token classification) heads: shapes, sharding names
and quantization on our side; tiny random BertForQuestionAnswering, BertForTokenClassification,
GPT2ForTokenClassification, LlamaForTokenClassification and Qwen2ForTokenClassification, saved
with save_pretrained, give transformers' logits through models.hf, and an export reloads in the
same classes with the same logits."""

import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from compress.quant import Policy, QuantConfig, QuantDot

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import V, L, bert_config, gpt2_config, inputs, llama_config, save_randomized  # noqa: E402
from models import hf  # noqa: E402

TOL = 1e-4  # float32
B = 3
SMALL = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_len=64)


# name -> (make the torch model, our head, classes per token)
MAKERS = {
  "bert_span": (lambda: transformers.BertForQuestionAnswering(bert_config()), "span", 2),
  "bert_tokens": (
    lambda: transformers.BertForTokenClassification(bert_config(num_labels=5)),
    "tokens",
    5,
  ),
  "gpt2_tokens": (
    lambda: transformers.GPT2ForTokenClassification(gpt2_config(num_labels=4)),
    "tokens",
    4,
  ),
  # No biases in the body; `score` has one.
  "llama_tokens": (
    lambda: transformers.LlamaForTokenClassification(llama_config(num_labels=3)),
    "tokens",
    3,
  ),
  # Biases on q/k/v only.
  "qwen2_tokens": (
    lambda: transformers.Qwen2ForTokenClassification(
      llama_config(transformers.Qwen2Config, num_labels=3)
    ),
    "tokens",
    3,
  ),
}


def _torch_out(model, ids, mask):
  """BxLxC logits, or for QA Bx2xL: start and end logits stacked, as our "span" head."""
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if hasattr(out, "start_logits"):
    return torch.stack([out.start_logits, out.end_logits], 1).numpy()
  return out.logits.numpy()


def _ours(model, params, ids, mask):
  out = model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert out.dtype == jnp.float32
  return np.asarray(out)


def _want_shape(head, classes):
  return (B, 2, L) if head == "span" else (B, L, classes)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> (directory, torch model, reference logits); every weight randomized."""
  models_ = save_randomized(tmp_path_factory, {n: make for n, (make, _, _) in MAKERS.items()})
  return {n: (d, m, _torch_out(m, *inputs())) for n, (d, m) in models_.items()}


# ---- transformers parity --------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,scan", [(n, False) for n in MAKERS] + [("bert_span", True), ("llama_tokens", True)]
)
def test_import_matches_transformers(saved, name, scan):
  """The head comes from config.json's architectures; the logits are transformers'."""
  directory, _, ref = saved[name]
  _, head, classes = MAKERS[name]
  model, params = hf.from_pretrained(directory, scan_layers=scan)
  assert (model.config.head, model.config.num_labels) == (head, classes)
  ours = _ours(model, params, *inputs())
  assert ours.shape == ref.shape == _want_shape(head, classes)
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_export_reloads_in_transformers(saved, name, tmp_path):
  """save_pretrained writes the head's architecture; transformers' class loads it (no weight
  missing or unexpected) with the same logits, and it reads back as the same config."""
  directory, torch_model, ref = saved[name]
  model, params = hf.from_pretrained(directory)
  hf.save_pretrained(model.config, params, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == [type(torch_model).__name__]
  reloaded, info = type(torch_model).from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  np.testing.assert_allclose(_torch_out(reloaded.eval(), *inputs()), ref, atol=TOL, rtol=0)
  model2, params2 = hf.from_pretrained(str(tmp_path))
  assert model2.config == model.config
  np.testing.assert_allclose(_ours(model2, params2, *inputs()), ref, atol=TOL, rtol=0)


def test_new_head_on_a_pretrained_body(saved):
  """A token classifier's body under a new span head (and back): the body is the checkpoint's,
  the new head is initialized; a QA checkpoint's span head is unused by a "tokens" model."""
  _, tokens = hf.from_pretrained(saved["bert_tokens"][0])
  model, params = hf.from_pretrained(saved["bert_tokens"][0], head="span")
  assert model.config.num_labels == 2 and params["qa_outputs"]["kernel"].shape == (32, 2)
  assert set(params) - {"qa_outputs"} == set(tokens) - {"classifier"}
  for k in set(params) - {"qa_outputs"}:
    jax.tree.map(np.testing.assert_array_equal, params[k], tokens[k])
  assert _ours(model, params, *inputs()).shape == (B, 2, L)
  model, params = hf.from_pretrained(saved["bert_span"][0], head="tokens", num_labels=7)
  assert _ours(model, params, *inputs()).shape == (B, L, 7)
  model, params = hf.from_pretrained(saved["gpt2_tokens"][0], head="lm")  # tied: nothing new
  assert _ours(model, params, *inputs()).shape == (B, L, V)


# ---- our side: shapes, logical names, quantization ------------------------------------------


HEAD_CONFIGS = {  # name -> (config, the head's parameter)
  "encoder_span": (models.get_preset("tiny-encoder", head="span", **SMALL), "qa_outputs"),
  "encoder_tokens": (
    models.get_preset("tiny-encoder", head="tokens", num_labels=5, **SMALL),
    "classifier",
  ),
  "gpt2_tokens": (models.get_preset("tiny", head="tokens", num_labels=5, **SMALL), "classifier"),
  "llama_tokens": (  # no biases in the body, untied embeddings
    models.get_preset("llama-1b", head="tokens", num_labels=5, n_kv_heads=2, **SMALL),
    "classifier",
  ),
}


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
@pytest.mark.parametrize("scan", [False, True])
def test_shapes_and_logical_names(name, scan):
  """The head's parameters carry logical names and a bias; "span" gives Bx2xL, "tokens" BxLxC,
  float32; the head adds exactly its kernel and bias to the body."""
  cfg, param = HEAD_CONFIGS[name]
  cfg = dataclasses.replace(cfg, scan_layers=scan)
  model = models.build(cfg)
  ids = jnp.asarray(inputs()[0])
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs[param]["kernel"]) == ("embed", "labels")
  assert tuple(specs[param]["bias"]) == ("labels",)  # a bias even without the body's (Llama)
  assert "lm_head" not in boxed and "pooler" not in boxed and "mlm_head" not in boxed
  out = jax.eval_shape(model.apply, {"params": nn.unbox(boxed)}, ids)
  want = (B, 2, L) if cfg.head == "span" else (B, L, cfg.num_labels)
  assert out.shape == want and out.dtype == jnp.float32
  n_head = cfg.d_model * cfg.num_labels + cfg.num_labels  # classifier or qa_outputs
  other = dataclasses.replace(cfg, head="none" if cfg.kind == "encoder" else "lm")
  lm_kernel = 0 if cfg.kind == "encoder" or cfg.tie_embeddings else cfg.d_model * cfg.vocab_size
  assert models.count_params(cfg) - n_head == models.count_params(other) - lm_kernel


def _draw(shapes):
  """Random values for a (boxed) shape tree, drawn with NumPy (jax's RNG is slow to compile on
  CPU)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes)


@pytest.mark.parametrize("name", list(HEAD_CONFIGS))
def test_quantized_dot_general_reaches_the_head(name):
  """A QuantDot policy that quantizes the head alone (int8 weights and activations): the head
  records its rule and its logits move off the float ones, but not far."""
  cfg, param = HEAD_CONFIGS[name]
  policy = Policy.of((f"^{param}$", QuantConfig(bits=8, act_bits=8)), (r".", None))
  quantized = models.build(cfg, dot_general_cls=functools.partial(QuantDot, policy))
  ids = jnp.asarray(inputs()[0])
  shapes = jax.eval_shape(quantized.init, jax.random.key(0), ids)
  assert jax.tree.leaves(shapes["quant"][param])  # the head's QuantDot
  params = _draw(nn.unbox(shapes["params"]))
  float_out = models.build(cfg).apply({"params": params}, ids)
  quant_out = quantized.apply({"params": params}, ids)
  assert quant_out.shape == float_out.shape
  assert 0 < np.abs(quant_out - float_out).max() < 0.1 * np.abs(float_out).max()


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "fields,words",
  [
    (dict(head="span"), "head='span' is not valid for kind='decoder'"),
    (dict(head="span"), "or set kind='encoder'"),
    (dict(kind="encoder", head="span", num_labels=3), "set num_labels=2, or head='tokens'"),
  ],
)
def test_bad_head_names_the_key_and_the_fix(fields, words):
  with pytest.raises(ValueError, match=re.escape(words)):
    models.get_preset("tiny", **fields)


def test_bad_checkpoint_heads(saved):
  """A span head on a decoder checkpoint; a Llama score without a bias."""
  with pytest.raises(ValueError, match=re.escape("or set kind='encoder'")):
    hf.from_pretrained(saved["gpt2_tokens"][0], head="span")
  config = {**hf.Checkpoint(saved["llama_tokens"][0]).config, "token_classification_bias": False}
  with pytest.raises(ValueError, match="token_classification_bias=False"):
    hf.config_from_hf(config)
