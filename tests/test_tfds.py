"""Real data from TFDS (experiments/data/tfds.py) and the Hugging Face tokenizer wrapper,
offline: GLUE batches from `tfds.testing.mock_data`; packed text from a small dataset of 4
shards prepared here (the mock ignores splits, shards and file shuffling); the training run
on a glue/sst2 prepared here from made-up sentences; tokenizers built here."""

import json
import random
from unittest import mock

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from experiments import tasks, train  # noqa: E402
from experiments.data import tfds as tfds_data  # noqa: E402
from experiments.data.markov import row_uniforms  # noqa: E402
from experiments.configs import glue, lm_tfds  # noqa: E402
from experiments.metrics import read_metrics  # noqa: E402
from experiments.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer  # noqa: E402

TOK = ByteTokenizer()
WORDS = "the of and to in a is that for it as was with be by on héllo wörld".split()
DOCS = "trimformer_test_docs"  # the dataset prepared by the `docs` fixture


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
  """data_dir of DOCS: train (200 documents) and validation (30), 4 shards each."""

  class TrimformerTestDocs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(200), "validation": self._generate_examples(30)}

    def _generate_examples(self, n):
      for i in range(n):
        rng = random.Random(i)
        yield i, {"text": f"doc{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  b = tfds.builder(DOCS, data_dir=data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  assert b.info.splits["train"].num_shards == 4
  return data_dir


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory):
  """data_dir of a real, prepared glue/sst2 of made-up sentences: 32 train, 24 validation.
  (Not the mock: it swaps the file system while TFDS reads, which races with orbax's
  background threads in a training run.)"""
  data_dir = str(tmp_path_factory.mktemp("glue"))
  b = tfds.builder("glue/sst2", data_dir=data_dir)

  def examples(n, split):
    for i in range(n):
      rng = random.Random(f"{split}{i}")
      sentence = " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))
      yield i, {"sentence": sentence, "label": i % 2, "idx": i}

  def splits(self, dl_manager):
    return {"train": examples(32, "train"), "validation": examples(24, "validation")}

  cls = type(b)
  cls.url_infos = {}  # shadows the builder's checksums: nothing is downloaded
  try:
    with mock.patch.object(cls, "_split_generators", splits):
      b.download_and_prepare()
  finally:
    del cls.url_infos
  return data_dir


def texts(name, split, data_dir=None):
  """The documents of a split read straight from TFDS, in file order."""
  ds = tfds.load(
    name,
    split=split,
    data_dir=data_dir,
    shuffle_files=False,
    read_config=tfds.ReadConfig(interleave_cycle_length=1),
  )
  decode = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
  return [{k: decode(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]


def text_source(data_dir, **kw):
  kw = dict(batch_size=4, eval_batch_size=2, seq_len=32, data_dir=data_dir, seed=3) | kw
  return tfds_data.TextSource(DOCS, kw.pop("tokenizer", TOK), **kw)


def equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def stream(batches):
  """Packed rows (LM: inputs + the last target) of consecutive batches, flattened."""
  rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
  return np.concatenate(rows).ravel()


def split_docs(ids, end=TOK.eos_id):
  """Token ids -> the decoded documents; the last (unfinished) one dropped."""
  docs, cur = [], []
  for i in ids:
    if i == end:
      docs.append(TOK.decode(cur))
      cur = []
    else:
      cur.append(i)
  return docs


# ---- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A BERT WordPiece tokenizer over a tiny vocabulary, saved as a local directory."""
  transformers = pytest.importorskip("transformers")
  root = tmp_path_factory.mktemp("bert")
  letters = "abcdefghij"
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!"]
  vocab += list(letters) + ["##" + c for c in letters]
  (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast.from_pretrained(str(root)).save_pretrained(str(root / "saved"))
  return str(root / "saved")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
  """A GPT-2 style byte-level BPE (one special token, no pad / [CLS] / [MASK]), saved."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tk.train_from_iterator([" ".join(WORDS), "hello world, the quick brown fox"] * 5, trainer)
  eot = "<|endoftext|>"
  wrapped = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tk, bos_token=eot, eos_token=eot, unk_token=eot
  )
  path = str(tmp_path_factory.mktemp("gpt2"))
  wrapped.save_pretrained(path)
  return path


def test_hf_bert_tokenizer(bert_dir):
  tok = get_tokenizer(bert_dir)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == 28 and tok.n_special == 0
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.eos_id is None and tok.bos_id is None and {0, 1, 2, 3, 4} == tok.special_ids
  ids = tok.encode("Hello world abc")
  assert ids == [5, 6, 8, 19, 20] and tok.decode(ids) == "hello world abc"
  assert tok.encode_batch(["hello", "j!"]) == [[5], [17, 7]]
  with pytest.raises(ValueError, match="no EOS"):
    tok.encode("hello", add_eos=True)
  out = tok.encode_pairs(["hello abc", "j"], ["world", "hello"], 12)
  assert out["inputs"].dtype == np.int32 and out["inputs"].shape == (2, 12)
  np.testing.assert_array_equal(out["inputs"][0], [2, 5, 8, 19, 20, 3, 6, 3, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["token_type_ids"][0], [0] * 6 + [1, 1] + [0] * 4)
  np.testing.assert_array_equal(out["attention_mask"][0], [1] * 8 + [0] * 4)
  short = tok.encode_pairs(["a b c d e f"], ["g h i j"], 8)["inputs"][0]
  assert short[0] == 2 and short[-1] == 3 and (short != 0).all()  # truncated to fit
  (sep,) = np.flatnonzero(short[:-1] == 3)
  assert list(short[1:sep]) == [8, 9, 10, 11, 12, 13][: sep - 1]
  assert list(short[sep + 1 : -1]) == [14, 15, 16, 17][: 6 - sep]
  single = tok.encode_pairs(["hello"], None, 4)
  assert list(single["inputs"][0]) == [2, 5, 3, 0] and not single["token_type_ids"].any()


def test_hf_gpt2_style_tokenizer(gpt2_dir):
  tok = get_tokenizer(gpt2_dir)
  assert tok.eos_id == tok.bos_id == tok.pad_id == 0  # no pad token: pads with EOS
  assert tok.cls_id is tok.sep_id is tok.mask_id is None
  text = "héllo wörld, the fox 日本 🙂"
  ids = tok.encode(text, add_eos=True)
  assert ids[-1] == tok.eos_id and tok.decode(ids) == text  # byte-level: exact round trip
  assert tok.encode_batch([text, "the"], add_bos=True) == [[0] + ids[:-1], [0, *tok.encode("the")]]
  out = tok.encode_pairs(["the fox"], ["of"], 8)
  n = len(tok.encode("the fox")) + len(tok.encode("of"))
  np.testing.assert_array_equal(out["attention_mask"][0], [1] * n + [0] * (8 - n))
  assert (out["inputs"][0, n:] == tok.pad_id).all()


def test_get_tokenizer_errors(tmp_path):
  assert isinstance(get_tokenizer("byte"), ByteTokenizer)
  missing = str(tmp_path / "nope")
  with pytest.raises(ValueError, match="no such directory"):
    get_tokenizer(missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="local directory") as e:
    get_tokenizer(str(tmp_path / "empty"))
  assert str(tmp_path / "empty") in str(e.value)


def test_byte_tokenizer_pairs():
  out = TOK.encode_pairs(["abcdef", "ab"], ["xy", None], 9)
  cls, sep, pad = TOK.cls_id, TOK.sep_id, TOK.pad_id
  a, x = TOK.encode("abcdef"), TOK.encode("xy")
  assert list(out["inputs"][0]) == [cls, *a[:4], sep, *x, sep]  # the longer one truncated
  assert list(out["token_type_ids"][0]) == [0] * 6 + [1] * 3
  assert list(out["inputs"][1]) == [cls, *TOK.encode("ab"), sep] + [pad] * 5
  assert list(out["attention_mask"][1]) == [1] * 4 + [0] * 5
  assert not out["token_type_ids"][1].any()


# ---- packed text: LM and MLM -----------------------------------------------------------------


def test_lm_batches_pack_every_document(docs):
  src = text_source(docs)
  b = src.batch(0)
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
    "inputs": ((4, 32), np.int32),
    "targets": ((4, 32), np.int32),
    "weights": ((4, 32), np.float32),
  }
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert (b["weights"] == 1).all()
  # Eval: in file order, every token of every document, each followed by EOS.
  documents = texts(DOCS, "validation", docs)
  expected = np.concatenate([TOK.encode(t["text"], add_eos=True) for t in documents])
  n = len(expected) // (2 * 33)
  got = stream([src.batch(i, "eval") for i in range(n)])
  np.testing.assert_array_equal(got, expected[: len(got)])
  for _ in range(2):  # and again (the stream that raised is not reused)
    with pytest.raises(ValueError, match=f"only {n} batches"):
      src.batch(n, "eval")
  # Train: the first epoch is a permutation of the split, the next one another.
  train_docs = split_docs(stream([src.batch(i) for i in range(80)]))
  all_docs = sorted(t["text"] for t in texts(DOCS, "train", docs))
  assert sorted(train_docs[:200]) == all_docs and train_docs[:200] != all_docs
  assert train_docs[200:260] != train_docs[:60]


def test_lm_determinism_and_replay(docs):
  a, b = text_source(docs), text_source(docs)
  run = [a.batch(i) for i in range(60)]  # past the first epoch (~50 steps)
  for i in (0, 1, 2):
    equal(b.batch(i), run[i])
  equal(text_source(docs).batch(55), run[55])  # a fresh source replays to step 55
  equal(b.batch(41), run[41])  # ahead
  equal(b.batch(7), run[7])  # and back
  equal(b.batch(8), run[8])
  other = text_source(docs, seed=4).batch(0)["inputs"]
  assert (other != run[0]["inputs"]).mean() > 0.5


def test_lm_processes_read_disjoint_parts(docs):
  parts = [text_source(docs, process_index=i, process_count=2, batch_size=8) for i in range(2)]
  seen = [set(split_docs(stream([p.batch(s) for s in range(20)]))) for p in parts]
  assert len(seen[0]) > 50 and len(seen[1]) > 50 and not seen[0] & seen[1]
  assert seen[0] | seen[1] <= {t["text"] for t in texts(DOCS, "train", docs)}
  assert parts[0].batch(0)["inputs"].shape == (4, 32)  # this process's rows


def test_mlm_batches(docs):
  src = text_source(docs, task="mlm", batch_size=64)
  b = src.batch(2)
  assert set(b) == {"inputs", "targets", "weights", "attention_mask", "token_type_ids"}
  x, y, w = b["inputs"], b["targets"], b["weights"]
  assert x.shape == (64, 32) and x.dtype == y.dtype == np.int32 and w.dtype == np.float32
  assert (y[:, 0] == TOK.cls_id).all() and (b["attention_mask"] == 1).all()
  assert not b["token_type_ids"].any()
  # after [CLS]: the rows the LM packs (31 tokens, here [SEP] = EOS), at the same step
  lm = text_source(docs, task="lm", batch_size=64, seq_len=30).batch(2)
  np.testing.assert_array_equal(y[:, 1:], stream([lm]).reshape(64, 31))
  selected = w > 0
  assert not (selected & (y < TOK.n_special)).any()  # never [CLS] / [SEP]
  np.testing.assert_array_equal(x[~selected], y[~selected])
  assert 0.1 < selected.mean() < 0.2 and (x[selected] == TOK.mask_id).mean() > 0.6
  equal(text_source(docs, task="mlm", batch_size=64).batch(2), b)
  # process 1 of 2 masks its rows with the uniforms of global rows 32..63 at step 2
  half = text_source(docs, task="mlm", batch_size=64, process_index=1, process_count=2)
  h = half.batch(2)
  u = row_uniforms(3, "mlm", "train", 2, 32, 32, 96).reshape(32, 32, 3)
  maskable = h["targets"] >= TOK.n_special
  np.testing.assert_array_equal(h["weights"] > 0, maskable & (u[..., 0] < 0.15))


def test_packed_text_with_hf_tokenizers(docs, gpt2_dir, bert_dir):
  gpt2 = get_tokenizer(gpt2_dir)  # LM: documents end with EOS
  src = text_source(docs, tokenizer=gpt2, eval_batch_size=1, seq_len=15)
  documents = [t["text"] for t in texts(DOCS, "validation", docs)]
  got = stream([src.batch(i, "eval") for i in range(10)])
  expected = np.concatenate([gpt2.encode(t, add_eos=True) for t in documents])
  np.testing.assert_array_equal(got, expected[: len(got)])
  bert = get_tokenizer(bert_dir)  # MLM: [CLS] first, documents end with [SEP]
  with tfds.testing.mock_data(num_examples=50):  # lm1b: letters a-j, in the vocabulary
    b = tfds_data.TextSource(
      "lm1b", bert, task="mlm", batch_size=32, eval_batch_size=32, seq_len=16
    ).batch(0)
  x, y, selected = b["inputs"], b["targets"], b["weights"] > 0
  assert (y[:, 0] == bert.cls_id).all() and (y == bert.sep_id).any()
  assert not (y == 1).any()  # no [UNK]: every mocked word is in the vocabulary
  assert not (selected & np.isin(y, list(bert.special_ids))).any() and selected.any()
  assert (x < bert.vocab_size).all() and (x[selected] == bert.mask_id).mean() > 0.5


def test_lm_config_builds_on_mocked_lm1b():
  from experiments import experiment

  c = lm_tfds.get_config("lm1b,tiny")
  with tfds.testing.mock_data(num_examples=64):
    exp = experiment.build(c, devices=jax.devices()[:1])
    b = exp.task.batch(1, "train")
    assert b["inputs"].shape == (16, 64) and exp.task.eval_steps is None
    assert TOK.decode(b["inputs"][0]).replace(" ", "").isalpha()  # mock: letters and spaces
  c.eval.steps = 0
  with pytest.raises(ValueError, match="eval.steps=0"):
    with tfds.testing.mock_data(num_examples=8):
      experiment.build(c, devices=jax.devices()[:1])


# ---- GLUE ------------------------------------------------------------------------------------


def glue_source(name, **kw):
  kw = dict(batch_size=4, eval_batch_size=8, seq_len=40) | kw
  return tfds_data.GlueSource(name, kw.pop("tokenizer", TOK), **kw)


def test_glue_single_sentence():
  with tfds.testing.mock_data(num_examples=20):
    src = glue_source("glue/sst2")
    b = src.batch(0)
  assert {k: v.shape for k, v in b.items()} == {
    "inputs": (4, 40),
    "attention_mask": (4, 40),
    "token_type_ids": (4, 40),
    "label": (4,),
    "weights": (4,),
  }
  assert b["weights"].dtype == np.float32 and (b["weights"] == 1).all()
  x, m = b["inputs"], b["attention_mask"]
  n = m.sum(axis=1)
  assert (x[:, 0] == TOK.cls_id).all() and (x[np.arange(4), n - 1] == TOK.sep_id).all()
  assert ((x == TOK.pad_id) == (m == 0)).all() and not b["token_type_ids"].any()
  assert set(b["label"]) <= {0, 1}
  with tfds.testing.mock_data(num_examples=20):
    sentences = {t["sentence"] for t in texts("glue/sst2", "train")}
  assert {TOK.decode(row) for row in x} <= sentences


def test_glue_pair_with_bert_tokenizer(bert_dir):
  tok = get_tokenizer(bert_dir)
  with tfds.testing.mock_data(num_examples=20):
    src = glue_source("glue/mrpc", tokenizer=tok, seq_len=24)
    b = src.batch(1)
    pairs = {(t["sentence1"], t["sentence2"]) for t in texts("glue/mrpc", "train")}
  for x, tt, m in zip(b["inputs"], b["token_type_ids"], b["attention_mask"]):
    n = m.sum()
    (sep1, sep2) = np.flatnonzero(x == tok.sep_id)
    assert x[0] == tok.cls_id and sep2 == n - 1
    assert (tt[: sep1 + 1] == 0).all() and (tt[sep1 + 1 : n] == 1).all()
    assert (x[n:] == tok.pad_id).all() and not tt[n:].any()
  # byte tokenizer: the texts come back whole (mocked sentences are short)
  with tfds.testing.mock_data(num_examples=20):
    x = glue_source("glue/mrpc", seq_len=48).batch(1)["inputs"][0]
  sep1, sep2 = np.flatnonzero(x == TOK.sep_id)
  assert (TOK.decode(x[1:sep1]), TOK.decode(x[sep1 + 1 : sep2])) in pairs


def test_glue_eval_covers_the_split_once():
  with tfds.testing.mock_data(num_examples=21):
    parts = [
      glue_source("glue/mnli", process_index=i, process_count=2, eval_batch_size=8)
      for i in range(2)
    ]
    validation = texts("glue/mnli", "validation_matched")
  expected = sorted((t["premise"], t["hypothesis"], t["label"]) for t in validation)
  assert parts[0].splits["eval"] == "validation_matched"
  assert parts[0].splits["eval_mm"] == "validation_mismatched"  # (the mock's examples are equal)
  # 21 examples: parts of 11 and 10, 4 rows a batch -> 3 batches (1 padding row on p0, 2 on p1)
  assert parts[0].eval_steps == parts[1].eval_steps == 3
  assert parts[0].extra_eval_steps == parts[1].extra_eval_steps == {"eval_mm": 3}
  for split in ("eval", "eval_mm"):
    got, pad_rows = [], 0
    for p in parts:
      for s in range(3):
        b = p.batch(s, split)
        assert b["inputs"].shape == (4, 40) and b["weights"].dtype == np.float32
        for x, label, w in zip(b["inputs"], b["label"], b["weights"]):
          if w == 0:
            pad_rows += 1
            continue
          sep1, sep2 = np.flatnonzero(x == TOK.sep_id)
          got.append((TOK.decode(x[1:sep1]), TOK.decode(x[sep1 + 1 : sep2]), label))
    assert sorted(got) == expected and pad_rows == 2 * 3 * 4 - 21, split


MNLI_EVAL = {"validation_mismatched": (13, "mm"), "validation_matched": (21, "m")}


def mnli_examples(self, split, **kwargs):
  """Mocked glue/mnli `_as_dataset` whose splits differ (TFDS's own mock gives every split the
  same examples): 21 validation_matched, 13 validation_mismatched (hypotheses start with "m"
  and "mm"), 32 train; labels drawn from the split's seed."""
  import tensorflow as tf

  name = next((k for k in MNLI_EVAL if k in str(split)), "train")
  (n, tag), rng = MNLI_EVAL.get(name, (32, "t")), random.Random(name)
  words = lambda: " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))  # noqa: E731
  premise, hypothesis = [words() for _ in range(n)], [f"{tag} {words()}" for _ in range(n)]
  return tf.data.Dataset.from_tensor_slices(
    {
      "premise": premise,
      "hypothesis": hypothesis,
      "label": np.array([rng.randrange(3) for _ in range(n)], np.int64),
      "idx": np.arange(n, dtype=np.int32),
    }
  )


def test_mnli_evaluates_matched_and_mismatched():
  """glue/mnli's eval row: the matched split's metrics and the mismatched one's (eval_mm_*),
  each over its whole split, equal to NumPy's on the model's logits; a named eval split, or
  another task, evaluates one split."""
  from experiments import experiment

  c = glue.get_config("mnli,tiny")
  c.eval.batch_size = 8
  with tfds.testing.mock_data(as_dataset_fn=mnli_examples):
    exp = experiment.build(c, devices=jax.devices()[:1])
    state, shardings = exp.init_state()
    one = c.copy_and_resolve_references()
    one.data.tfds.eval_split = "validation_mismatched"
    assert tasks.make_task(one, TOK).extra_evals == {}
  with tfds.testing.mock_data(num_examples=4):
    assert glue_source("glue/sst2").extra_eval_steps == {}
  assert exp.task.eval_steps == 3 and exp.task.extra_evals == {"eval_mm": 2}  # 21, 13 by 8
  run = experiment.Run(exp, "", shardings)
  run.jit_steps()
  row = run.evaluate(state["params"], state.get("collections", {}))
  assert set(row) == {"eval_loss", "accuracy", "eval_mm_loss", "eval_mm_accuracy"}
  variables = {"params": state["params"], **state.get("collections", {})}
  for prefix, batches, split in (
    ("", run.eval_batches, "validation_matched"),
    ("eval_mm_", run.extra_eval_batches["eval_mm"], "validation_mismatched"),
  ):
    b = {k: np.concatenate([np.asarray(x[k]) for x in batches]) for k in batches[0]}
    real = b["weights"] > 0
    n, tag = MNLI_EVAL[split]
    assert b["weights"].sum() == real.sum() == n  # the whole split, once
    for x in b["inputs"][real]:
      sep1, sep2 = np.flatnonzero(x == TOK.sep_id)
      assert TOK.decode(x[sep1 + 1 : sep2]).split()[0] == tag
    logits = np.concatenate(
      [
        np.asarray(exp.task.forward(exp.model, variables, x, None, False)[0][:, 0], np.float64)
        for x in batches
      ]
    )[real]
    label = b["label"][real]
    ce = np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(label)), label]
    accuracy = np.mean(logits.argmax(-1) == label)
    assert row[prefix + "accuracy"] == pytest.approx(accuracy)
    assert row[(prefix or "eval_") + "loss"] == pytest.approx(ce.mean(), rel=1e-5)


def test_glue_train_determinism():
  with tfds.testing.mock_data(num_examples=10):
    a = glue_source("glue/cola")
    run = [a.batch(i) for i in range(8)]  # 3.2 epochs of 10 examples
    equal(glue_source("glue/cola").batch(6), run[6])  # a fresh source skips ahead
    equal(a.batch(2), run[2])
  seen = [TOK.decode(x) for b in run for x in b["inputs"]]
  assert sorted(seen[:10]) == sorted(seen[10:20]) == sorted(set(seen))  # every epoch whole,
  assert seen[:10] != seen[10:20]  # reshuffled


def test_glue_rejects_regression_and_bad_configs():
  with pytest.raises(ValueError, match="regression"):
    tfds_data.glue_task("glue/stsb")
  with pytest.raises(ValueError, match="regression"):
    glue.get_config("stsb")
  with pytest.raises(ValueError, match="choose glue"):
    tfds_data.glue_task("glue/nope")
  from experiments import experiment

  c = glue.get_config("mnli,tiny")
  c.model.num_labels = 2
  with pytest.raises(ValueError, match="3 classes"):
    experiment.build(c, devices=jax.devices()[:1])
  c = glue.get_config("sst2,tiny")
  c.task = "lm"
  with pytest.raises(ValueError, match="classify"):
    tasks.make_task(c, TOK)


def test_configs():
  for task, (_, labels) in tfds_data.GLUE.items():
    c = glue.get_config(task)
    assert c.data.tfds.name == f"glue/{task}" and c.model.num_labels == labels
    assert c.init_from == "hf:bert-base-uncased" and c.data.tokenizer == "bert-base-uncased"
    assert c.eval.steps == 0 and c.train.seq_len == 128 and c.train.batch_size == 32
    epoch = -(-glue.TRAIN_EXAMPLES[task] // 32)
    assert c.train.steps == 3 * epoch and c.optim.warmup_steps == c.train.steps // 10
  d = glue.get_config("rte,distil")
  assert d.model.n_layers == 6 and d.teacher.model.n_layers == 12 and d.init_from == ""
  assert d.teacher.init_from == "hf:bert-base-uncased" and d.distill.init == "every_other"
  c4, lm1b = lm_tfds.get_config("c4"), lm_tfds.get_config("lm1b,hf")
  assert (c4.train.seq_len, lm1b.train.seq_len, lm1b.init_from) == (1024, 128, "hf:gpt2")
  assert c4.data.tfds.name == "c4/en" and c4.data.tokenizer == "gpt2" and c4.mesh.fsdp == -1
  assert c4.model.vocab_size >= 50257 and c4.dtype == "bfloat16"


def test_glue_trains_end_to_end(tmp_path, sst2_dir):
  """The tiny GLUE config through the train loop (on one device, as tests/test_train.py: the
  8-device mesh triples the time)."""
  c = glue.get_config("sst2,tiny")
  c.train.update(steps=4, checkpoint_every=4, log_every=2)
  c.eval.update(every=2, batch_size=16)
  c.data.tfds.data_dir = sst2_dir
  final = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
  rows = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
  assert [r["step"] for r in rows] == [2, 4] and final["accuracy"] == rows[-1]["accuracy"]
  # 24 validation examples in 2 batches of 16: the accuracy counts the real rows only
  assert abs(final["accuracy"] * 24 - round(final["accuracy"] * 24)) < 1e-6
  assert np.isfinite(final["eval_loss"]) and not [k for k in final if "_mm_" in k]  # MNLI only
  assert json.load(open(tmp_path / "config.json"))["data"]["tfds"]["name"] == "glue/sst2"
