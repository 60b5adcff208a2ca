"""The train loop from a Hugging Face checkpoint: `init_from="hf:<dir>"` reads its weights
into the sharded state (a new classifier keeps its init), and a checkpoint of another
architecture is refused before anything compiles."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models  # noqa: E402
import parallel  # noqa: E402
from experiments import experiment, train  # noqa: E402
from experiments.configs import classify  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A random BertForMaskedLM with the tiny-encoder preset's shapes."""
  torch.manual_seed(0)
  config = transformers.BertConfig(
    vocab_size=264,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=512,
    max_position_embeddings=256,
  )
  directory = str(tmp_path_factory.mktemp("bert"))
  transformers.BertForMaskedLM(config).save_pretrained(directory)
  return directory


def _config(init_from, steps):
  c = classify.get_config("tiny")
  del c["pretrain"]
  c.init_from = init_from
  c.train.update(steps=steps, batch_size=8, seq_len=32, checkpoint_every=100)
  c.eval.update(steps=1, batch_size=8)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


def test_classifier_from_hf_encoder(bert_dir, tmp_path):
  """steps=0: the saved state is the HF body plus a fresh classifier."""
  workdir = str(tmp_path / "run")
  row = train.train_and_evaluate(_config("hf:" + bert_dir, 0), workdir)
  assert np.isfinite(row["eval_loss"])
  exp = experiment.build(_config("hf:" + bert_dir, 0))
  abstract, _ = exp.shard_shapes()
  saved = parallel.load_variables(
    os.path.join(workdir, "checkpoints"), {"params": abstract["params"]}
  )["params"]
  hf_params = models.hf.from_pretrained(bert_dir)[1]
  for k in hf_params:
    if k != "mlm_head":  # the MLM head is not the classifier's
      jax.tree.map(np.testing.assert_array_equal, saved[k], hf_params[k])
  assert "classifier" in saved and "mlm_head" not in saved


def test_architecture_mismatch_names_the_override(bert_dir):
  c = _config("hf:" + bert_dir, 1)
  c.model.activation = "gelu_tanh"  # BERT's is the erf GELU
  with pytest.raises(ValueError, match="--config.model.activation=gelu"):  # before any load
    experiment.build(c).load_hf(bert_dir, params=None, shardings=None)
