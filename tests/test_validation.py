"""Bad input is refused with an error naming the problem and the fix: unknown config keys and
values out of range in `experiment.build` (before anything compiles), token ids and sequence
lengths the model cannot read in `Experiment.batch`, empty TFDS splits and a missing text
feature (mocked with tfds.testing.mock_data)."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import checks, experiment, reproduce, tasks, train
from experiments.data import tfds as tfds_data
from experiments.configs import classify, common, distill, glue, lm, lm_tfds, prune, quant
from experiments.configs import lora as lora_configs
from experiments.configs import oneshot as oneshot_configs


def tiny_lm(steps=2):
  c = lm.get_config("tiny")
  c.train.steps = steps
  return c


def build(c):
  return experiment.build(c, devices=jax.devices()[:1])


def with_key(c, key: str, value):
  """`c` with the dotted `key` set to `value` (a `pretrain.` key: in a pretraining run added)."""
  if key.startswith("pretrain."):
    c.pretrain = tiny_lm()
  *path, name = key.split(".")
  node = c
  for p in path:
    node = node[p]
  node[name] = value
  return c


def config_files():
  """Every variant of every config file."""
  yield from (lm.get_config(a) for a in ("tiny", "gpt2-small", "llama-1b"))
  yield from (lm_tfds.get_config(a) for a in ("lm1b", "c4,hf", "lm1b,tiny"))
  yield from (glue.get_config(f"{t}{f}") for t in tfds_data.GLUE for f in ("", ",distil,tiny"))
  yield from (classify.get_config(a) for a in ("tiny", "bert-base"))
  yield from (distill.get_config(a) for a in distill.ARGS)
  yield from (prune.get_config(a) for a in ("tiny", "nm", "oneshot"))
  yield from (quant.get_config(a) for a in ("tiny", "ptq", "lsq"))
  yield from (lora_configs.get_config(a) for a in lora_configs.ARGS)
  yield from (oneshot_configs.get_config(a) for a in oneshot_configs.ARGS)


def test_every_config_file_and_table_passes_the_checks():
  configs = list(config_files())
  for table in reproduce.TABLES:
    for scale in ("tiny", "full"):
      arms = reproduce.table_module(table).arms(scale)
      configs += [job["config"] for job in reproduce._jobs(table, arms, "/unused", seeds=1)]
  for c in configs:
    common.check_keys(c)
    checks.check_ranges(c)


@pytest.mark.parametrize(
  "key, message",
  [
    ("train.setps", r"Unknown config key train.setps \(did you mean train.steps\?\)"),
    ("steps", r"Unknown config key steps \(did you mean eval.steps or train.steps\?\)"),
    ("model.dtype", r"Unknown config key model.dtype \(did you mean dtype\?\)"),
    ("quant.bitz", r"quant.bitz \(did you mean quant.bits\?\)"),
    ("data.markov.oder", r"data.markov.oder \(did you mean data.markov.order\?\)"),
    ("pretrain.optim.lrr", r"pretrain.optim.lrr \(did you mean pretrain.optim.lr\?\)"),
  ],
)
def test_unknown_config_key_fails_before_compiling(no_compile, key, message):
  with pytest.raises(ValueError, match=message):
    build(with_key(tiny_lm(), key, 3))  # an unlocked ConfigDict takes any new key


def test_keys_the_sources_take_are_known():
  c = tiny_lm()
  c.data.markov.low_order_weight = 0.3  # a MarkovSource argument base_config leaves out
  c.teacher = tiny_lm()
  common.check_keys(c)


def test_unknown_command_line_override():
  from experiments import configs

  argv = ["train", "--config", "experiments/configs/classify.py:tiny", "--workdir=/tmp/unused"]
  configs.check_overrides(argv + ["--config.pretrain.train.steps=3", "--noconfig.quant.lsq"])
  with pytest.raises(ValueError, match=r"--config.train.setps \(did you mean --config.train.steps"):
    configs.check_overrides(argv + ["--config.train.setps=3"])
  argv = ["train", "--config=experiments/configs/classify.py", "--config.pretrain.optim.lrr", "1"]
  with pytest.raises(ValueError, match=r"--config.pretrain.optim.lrr \(did you mean --config.pre"):
    configs.check_overrides(argv)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("train.steps", -1, "train.steps=-1 must be >= 0"),
    ("train.log_every", 0, "train.log_every=0 must be >= 1"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be >= 1"),
    ("train.microbatches", 0, "train.microbatches=0 must be >= 1"),
    ("eval.every", 0, "eval.every=0 must be >= 1"),
    ("eval.steps", -1, "eval.steps=-1 must be >= 0"),
    ("optim.b2", 1.0, r"optim.b2=1.0 must be in \[0, 1\)"),
    ("optim.lr", -1e-3, "optim.lr=-0.001 must be >= 0"),
    ("quant.step_lr_scale", 0.0, "quant.step_lr_scale=0.0 must be > 0"),
    ("data.markov.order", 0, "data.markov.order=0 must be >= 1"),
    ("pretrain.train.log_every", 0, "pretrain.train.log_every=0 must be >= 1"),
    ("train.max_nonfinite", -1, "train.max_nonfinite=-1 must be >= 0"),
    ("train.nonfinite", "ignore", "train.nonfinite='ignore': 'skip' .* or 'stop'"),
  ],
)
def test_value_out_of_range_fails_before_compiling(no_compile, key, value, message):
  with pytest.raises(ValueError, match=message):
    build(with_key(tiny_lm(), key, value))


@pytest.fixture(scope="module")
def tiny_exp():
  return build(tiny_lm())


def with_batch(exp, batch):
  """`exp` whose task returns `batch` (copied) at every step."""
  task = dataclasses.replace(exp.task, batch=lambda step, split: dict(batch))
  return dataclasses.replace(exp, task=task)


def lm_batch(exp):
  b = exp.task.batch(0, "train")
  return {k: v.copy() for k, v in b.items()}


def test_token_ids_outside_the_vocabulary(no_compile, tiny_exp):
  b = lm_batch(tiny_exp)
  b["inputs"][1, 5] = 300
  with pytest.raises(ValueError, match=r"train batch at step 3: inputs\[row 1, position 5\] = 300"):
    with_batch(tiny_exp, b).batch(3)
  b = lm_batch(tiny_exp)
  b["targets"][2, 7] = -1
  with pytest.raises(ValueError, match=r"eval batch at step 0: targets\[row 2, position 7\] = -1 "):
    with_batch(tiny_exp, b).batch(0, "eval")
  b["weights"][2, 7] = 0.0  # an ignored position may hold anything
  assert with_batch(tiny_exp, b).batch(0, "eval")["targets"].shape == b["targets"].shape


def test_sequences_longer_than_the_learned_positions(no_compile, tiny_exp):
  b = lm_batch(tiny_exp)
  width = tiny_exp.model_config.max_len + 1
  b = {k: np.resize(v, (v.shape[0], width)) for k, v in b.items()}
  with pytest.raises(ValueError, match=f"sequences of {width} tokens.*model.max_len=256"):
    with_batch(tiny_exp, b).batch(0)


def test_a_vocabulary_smaller_than_the_bytes_on_the_synthetic_language(tmp_path):
  """An LM on the synthetic language reads its symbols, which no tokenizer makes: with 64 ids
  (fewer than the bytes' 127) it reads the same sequences relabelled 0..63, with the same
  exact log-probabilities, and trains; 200 ids keep the byte ids."""
  small, bytes_ = tiny_lm(steps=3), tiny_lm()
  small.model.vocab_size, bytes_.model.vocab_size = 64, 200
  small.eval.update(every=3, steps=1)
  ref = build(tiny_lm()).task
  ids = {
    n: build(c).task.batch(5, "train")["inputs"] for n, c in (("small", small), ("bytes", bytes_))
  }
  byte_ids = ref.batch(5, "train")["inputs"]
  np.testing.assert_array_equal(ids["bytes"], byte_ids)
  source = tasks.markov_source(tiny_lm())
  np.testing.assert_array_equal(ids["small"], source.id_to_symbol[byte_ids])
  assert ids["small"].max() == 63
  relabelled = tasks.markov_source(small)
  np.testing.assert_array_equal(relabelled.logprob(ids["small"]), source.logprob(byte_ids))
  final = train.train_and_evaluate(small, str(tmp_path), devices=jax.devices()[:1])
  assert np.isfinite(final["eval_loss"]) and final["eval_loss"] < np.log(64) + 1


def test_a_vocabulary_smaller_than_the_data_fails_before_compiling(no_compile):
  """Below the synthetic language's symbols, or below the tokenizer's ids where the tokenizer
  makes the data (MLM's [MASK], classification's [CLS] and [SEP]), the error names the fix."""
  c = tiny_lm()
  c.model.vocab_size = 32
  with pytest.raises(ValueError, match=r"64 symbols \(data.markov.n_symbols\).*at least 64"):
    build(c)
  c = classify.get_config("tiny")
  c.model.vocab_size = 200
  with pytest.raises(ValueError, match=r"tokenizer's vocabulary \(260 ids\).*at least 260"):
    build(c)


# ---- TFDS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def documents(train: int, eval_: int):
  """A mocked `_as_dataset` of short documents: `train` in the train split, `eval_` in others."""

  def as_dataset(self, split, **kwargs):
    tf, _ = tfds_data._tf()
    n = train if "train" in str(split) else eval_
    return tf.data.Dataset.from_tensor_slices({"text": tf.constant(["a b c"] * n, tf.string)})

  return as_dataset


def sentences(train: int, eval_: int):
  """A mocked glue/sst2 `_as_dataset`: `train` examples in the train split, `eval_` in others."""

  def as_dataset(self, split, **kwargs):
    tf, _ = tfds_data._tf()
    n = train if "train" in str(split) else eval_
    return tf.data.Dataset.from_tensor_slices(
      {
        "sentence": tf.constant(["a b c"] * n, tf.string),
        "label": tf.zeros([n], tf.int64),
        "idx": tf.range(n, dtype=tf.int32),
      }
    )

  return as_dataset


def test_text_key_not_a_feature(tfds):
  c = lm_tfds.get_config("lm1b,tiny")
  c.data.tfds.text_key = "sentence"
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(
      ValueError, match=r"text_key='sentence' is not a feature of lm1b: .*\['text'\]"
    ):
      build(c)


def test_empty_text_splits(tfds):
  c = lm_tfds.get_config("lm1b,tiny")
  with tfds.testing.mock_data(as_dataset_fn=documents(train=0, eval_=1)):
    exp = build(c)
    message = (
      "train split 'train' of lm1b holds no documents: check data.tfds.name, data.tfds.text_key"
    )
    with pytest.raises(ValueError, match=message):
      exp.task.batch(0, "train")
    with pytest.raises(
      ValueError, match=r"eval split 'test' of lm1b holds 6 tokens, less than one"
    ):
      exp.task.batch(0, "eval")


def test_empty_glue_splits(tfds):
  c = glue.get_config("sst2,tiny")
  with tfds.testing.mock_data(as_dataset_fn=sentences(train=0, eval_=4)):
    exp = build(c)
    with pytest.raises(ValueError, match="train split 'train' of glue/sst2 holds no examples"):
      exp.task.batch(0, "train")
  with tfds.testing.mock_data(as_dataset_fn=sentences(train=4, eval_=0)):
    with pytest.raises(ValueError, match="eval split 'validation' of glue/sst2 holds no examples"):
      build(c)


def test_a_student_mesh_that_does_not_fit_fails_before_its_teacher_trains(tmp_path, no_compile):
  """The tensor axis (8) does not divide the student's 4 heads: refused before the teacher's
  run starts (it would take minutes first), and before anything compiles."""
  from experiments import train

  c = distill.get_config("tiny")
  c.mesh.update(data=1, tensor=8)
  with pytest.raises(ValueError, match="mesh.tensor"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "teacher").exists()


def test_a_workdir_written_before_a_field_existed_resumes(tmp_path):
  """A run's config.json without fields added since (a model field, a method's key, a whole
  method section) is the same model when the new fields hold their defaults; a changed value
  is refused."""
  import json

  c = prune.get_config("tiny")
  old = json.loads(c.to_json())
  del old["model"]["sliding_window"], old["prune"]["calib_batches"], old["quant"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  checks.check_workdir(str(tmp_path), c)
  c.model.sliding_window = 8
  with pytest.raises(ValueError, match="sliding_window: 0 -> 8"):
    checks.check_workdir(str(tmp_path), c)
