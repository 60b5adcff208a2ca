"""Tiny random transformers models shared by the HF import/export tests: configs, inputs with
padding, and a module fixture body that saves each model with save_pretrained."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, L = 96, 12  # V splits over a 2 x 2 mesh


def bert_config(**kw):
  return transformers.BertConfig(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    **kw,
  )


def gpt2_config(**kw):
  return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw)


def llama_config(cls=None, **kw):
  """A tiny Llama-family config (LlamaConfig, MistralConfig, Qwen2Config)."""
  return (cls or transformers.LlamaConfig)(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    intermediate_size=48,
    max_position_embeddings=64,
    **kw,
  )


def inputs():
  """Random ids [3, L] with right padding in two of the three rows, and their mask."""
  ids = np.random.default_rng(0).integers(0, V, (3, L))
  mask = np.ones((3, L), np.int64)
  mask[1, 8:] = 0
  mask[2, 5:] = 0
  return ids, mask


def save_randomized(tmp_path_factory, makers):
  """name -> (directory, torch model): each maker's model with every weight randomized (norms
  and biases too, which HF initializes to 1 and 0), saved with save_pretrained."""
  torch.manual_seed(0)
  out = {}
  for name, make in makers.items():
    model = make().eval()
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    directory = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(directory)
    out[name] = (directory, model)
  return out
