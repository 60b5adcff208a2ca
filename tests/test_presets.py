"""Presets match the published models' sizes; bad configs name the problem and the fix."""

import pytest

import models

# Presets and their sizes.


def _hf_count(build_fn):
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # Shapes only: nothing is allocated.
    model = build_fn()
  return sum(p.numel() for p in model.parameters())  # Tied weights are counted once.


def test_preset_param_counts_match_transformers():
  tf = pytest.importorskip("transformers")
  bert = tf.BertConfig()  # Defaults are bert-base-uncased.
  assert models.count_params(models.get_preset("bert-base")) == _hf_count(
    lambda: tf.BertForMaskedLM(bert)
  )
  assert models.count_params(models.get_preset("bert-base", head="none")) == _hf_count(
    lambda: tf.BertModel(bert, add_pooling_layer=False)
  )
  classify = models.count_params(models.get_preset("bert-base", head="classify"))
  assert classify == _hf_count(lambda: tf.BertForSequenceClassification(bert))
  assert 109e6 < classify < 111e6  # "BERT_BASE ... Total Parameters=110M".
  assert (
    models.count_params(models.get_preset("gpt2-small"))
    == _hf_count(lambda: tf.GPT2LMHeadModel(tf.GPT2Config()))
    == 124_439_808
  )
  tinyllama = tf.LlamaConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
  )
  assert (
    models.count_params(models.get_preset("llama-1b"))
    == _hf_count(lambda: tf.LlamaForCausalLM(tinyllama))
    == 1_100_048_384
  )


def test_larger_presets_match_transformers():
  tf = pytest.importorskip("transformers")
  assert models.count_params(models.get_preset("bert-large")) == _hf_count(
    lambda: tf.BertForMaskedLM(
      tf.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
      )
    )
  )
  assert models.count_params(models.get_preset("gpt2-medium")) == _hf_count(
    lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16))
  )


# Config errors name the problem and the fix.


@pytest.mark.parametrize(
  "make,match",
  [
    (
      lambda: models.ModelConfig(d_model=130, n_heads=4),
      r"d_model=130 is not divisible by n_heads=4: .*set head_dim explicitly",
    ),
    (lambda: models.ModelConfig(n_heads=4, n_kv_heads=3), r"n_kv_heads=3.*choose n_kv_heads"),
    (lambda: models.ModelConfig(activation="swish"), r"activation='swish'.*'gelu_tanh'.*'silu'"),
    (lambda: models.ModelConfig(remat_policy="some"), r"remat_policy='some'.*'dots'"),
    (lambda: models.ModelConfig(head="mlm"), r"head='mlm'.*kind='decoder'.*\['lm', 'tokens'\]"),
    (lambda: models.ModelConfig(n_layers=0), r"n_layers=0 must be a positive integer"),
    (lambda: models.ModelConfig(positions="rotary", head_dim=7), r"even head_dim"),
    (lambda: models.get_preset("gpt5"), r"unknown preset 'gpt5'.*'gpt2-small'"),
    (lambda: models.get_preset("tiny", d_modle=64), r"\['d_modle'\].*valid fields"),
  ],
)
def test_bad_config_raises_informative_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()
