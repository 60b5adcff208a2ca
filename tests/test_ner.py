"""NER data (experiments/data/ner.py), offline: TFDS's conll2003 mocked with hand-written
sentences (`tfds.testing.mock_data`), CoNLL-format files written here, and a BERT WordPiece
tokenizer over a small vocabulary built here, under which longer words split into several
subtokens."""

import os
import types

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
transformers = pytest.importorskip("transformers")
seqeval_metrics = pytest.importorskip("seqeval.metrics")

from experiments.data import ner  # noqa: E402
from experiments.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer  # noqa: E402

LABELS = list(ner.CONLL2003_LABELS)
ID = {t: i for i, t in enumerate(LABELS)}


def sentence(text: str):
  """ "John/B-PER lives/O" -> (words, tag ids); a bare word is "O"."""
  pairs = [w.split("/") if "/" in w else (w, "O") for w in text.split()]
  return [w for w, _ in pairs], np.array([ID[t] for _, t in pairs], np.int32)


TRAIN = [
  sentence(s)
  for s in [
    "John/B-PER lives/O in/O Washington/B-LOC .",
    "The United/B-ORG Nations/I-ORG met/O",
    "Paris/B-LOC and/O Berlin/B-LOC",
    "Mary/B-PER Ann/I-PER Smith/I-PER spoke",
    "EU/B-ORG rejects German/B-MISC call",
    "Peter/B-PER Blackburn/I-PER",
    "it/O rained/O",
  ]
]
EVAL = [
  sentence(s)
  for s in [
    "Japan/B-LOC began/O the defence/O of their/O Asian/B-MISC Cup/I-MISC title",
    "Nadim/B-PER Ladki/I-PER",
    "AL-AIN/B-LOC ,/O United/B-LOC Arab/I-LOC Emirates/I-LOC 1996-12-06",
    "But/O China/B-LOC saw their/O luck/O desert/O them/O in/O the/O second/O match",
    "Germany/B-LOC",
  ]
]


def fake_conll2003(self, split, **kwargs):
  """Mocked conll2003 `_as_dataset`: TRAIN (and an empty sentence, as conll2003's files end
  with) for the train split, EVAL for the others."""
  import tensorflow as tf

  sentences = TRAIN + [([], np.zeros(0, np.int32))] if "train" in str(split) else EVAL

  def examples():
    for words, tags in sentences:
      n = len(words)
      yield {
        "tokens": np.array([w.encode() for w in words], dtype=bytes).reshape(n),
        "pos": np.zeros(n, np.int64),
        "chunks": np.zeros(n, np.int64),
        "ner": tags.astype(np.int64),
      }

  spec = {k: tf.TensorSpec([None], tf.int64) for k in ("pos", "chunks", "ner")}
  spec["tokens"] = tf.TensorSpec([None], tf.string)
  return tf.data.Dataset.from_generator(examples, output_signature=spec)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
  """A WordPiece vocabulary: a few whole words, then letters and ##letters, so any other
  lowercase word splits into one subtoken per letter."""
  path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  letters = "abcdefghijklmnopqrstuvwxyz0123456789"
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "john", "the", "in", "un", "##ited"]
  vocab += [".", ",", "-"] + list(letters) + ["##" + c for c in letters]
  path.write_text("\n".join(vocab) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def bert(vocab_file, tmp_path_factory):
  """The fast BERT tokenizer over `vocab_file`, saved and loaded as data.tokenizer=<dir>."""
  root = str(tmp_path_factory.mktemp("bert"))
  # from the vocabulary's directory: transformers 5's BertTokenizerFast(vocab_file=...) builds
  # an empty vocabulary
  hf = transformers.BertTokenizerFast.from_pretrained(os.path.dirname(vocab_file))
  assert len(hf.tokenize("japan")) == 5  # j ##a ##p ##a ##n
  hf.save_pretrained(root)
  return get_tokenizer(root)


def mocked(tokenizer, **kw):
  kw = dict(batch_size=4, eval_batch_size=2, seq_len=48, seed=1) | kw
  with tfds.testing.mock_data(as_dataset_fn=fake_conll2003):
    return ner.NerSource("conll2003", tokenizer, **kw)


def write_conll(path, sentences, extra=""):
  """A CoNLL-2003 file of `sentences` (four columns, -DOCSTART- lines between documents)."""
  lines = ["-DOCSTART- -X- -X- O", ""]
  for i, (words, tags) in enumerate(sentences):
    lines += [f"{w} NNP B-NP {LABELS[t]}" for w, t in zip(words, tags)] + [""]
    if i == 2:
      lines += ["-DOCSTART- -X- -X- O", ""]
  path.write_text("\n".join(lines) + extra)
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("conll")
  return f"conll:{write_conll(root / 'train.txt', TRAIN)},{write_conll(root / 'eval.txt', EVAL)}"


def eval_preds(src, fill=None, rng=None):
  """Predictions of every eval batch: the targets on first subtokens, `fill` (or random tags
  from `rng`) elsewhere."""
  out = []
  for s in range(src.eval_steps):
    b = src.batch(s, "eval")
    if rng is not None:
      out.append(rng.integers(0, len(src.label_names), b["targets"].shape))
    else:
      out.append(np.where(b["weights"] > 0, b["targets"], fill))
  return out


def word_predictions(src, preds_list, sentences):
  """The word-level tag sequences the predictions mean, worked out here from the tokenizer
  alone: each word's first subtoken's position in [CLS] w1 w2 ... [SEP] ("O" when cut off)."""
  hf, L = src.tokenizer.tok, src.seq_len
  seqs = []
  for i, (words, _) in enumerate(sentences):
    step, row = divmod(i, src.rows["eval"])
    pos, tags = 1, []
    for w in words:
      n = len(hf.tokenize(w))
      tags.append(LABELS[preds_list[step][row, pos]] if n and pos < L - 1 else "O")
      pos += n
    seqs.append(tags)
  return seqs


# ---- alignment -------------------------------------------------------------------------------


def test_conll2003_alignment_with_wordpiece(bert):
  src = mocked(bert)
  assert src.label_names == LABELS and src.splits == {"train": "train", "eval": "dev"}
  assert len(src._train) == len(TRAIN)  # the empty sentence is dropped
  assert src.eval_steps == 3 and src.eval_words_cut == 0
  hf, split_words = bert.tok, 0
  for i, (words, tags) in enumerate(EVAL):
    b = src.batch(i // 2, "eval")
    row = i % 2
    pieces = [hf.convert_tokens_to_ids(hf.tokenize(w)) for w in words]
    split_words += sum(len(p) > 1 for p in pieces)
    ids = [bert.cls_id, *sum(pieces, []), bert.sep_id]
    n = len(ids)
    np.testing.assert_array_equal(b["inputs"][row, :n], ids)
    assert (b["inputs"][row, n:] == bert.pad_id).all()
    assert b["attention_mask"][row].sum() == n and (b["token_type_ids"][row] == 0).all()
    first = 1 + np.cumsum([0] + [len(p) for p in pieces[:-1]])
    weights = np.zeros(src.seq_len, np.float32)
    weights[first] = 1
    targets = np.zeros(src.seq_len, np.int32)
    targets[first] = tags
    np.testing.assert_array_equal(b["weights"][row], weights)  # other subtokens: weight 0
    np.testing.assert_array_equal(b["targets"][row], targets)
  assert split_words >= 5  # e.g. "washington" -> w ##a ##s ...
  last = src.batch(2, "eval")  # 5 sentences in batches of 2: one padding row
  assert (last["weights"][1] == 0).all() and last["attention_mask"][1].sum() == 1
  train = src.batch(0)
  assert {k: (v.shape, v.dtype.name) for k, v in train.items()} == {
    "inputs": ((4, 48), "int32"),
    "attention_mask": ((4, 48), "int32"),
    "token_type_ids": ((4, 48), "int32"),
    "targets": ((4, 48), "int32"),
    "weights": ((4, 48), "float32"),
  }


def test_byte_tokenizer_labels_first_bytes():
  tok = ByteTokenizer()
  src = mocked(tok, seq_len=64)
  b = src.batch(0, "eval")
  for row, (words, tags) in enumerate(EVAL[:2]):
    text = " ".join(words)
    np.testing.assert_array_equal(b["inputs"][row, : len(text) + 2], tok.encode(text, True, True))
    (pos,) = np.nonzero(b["weights"][row])
    starts = 1 + np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
    np.testing.assert_array_equal(pos, starts)
    np.testing.assert_array_equal(b["targets"][row, pos], tags)
    assert [tok.decode([i]) for i in b["inputs"][row, pos]] == [w[0] for w in words]


def test_truncation(bert):
  src = mocked(bert, seq_len=12)
  b = src.batch(0, "eval")
  row = b["inputs"][0]  # "japan began the defence ...": cut after 10 subtokens
  assert row[0] == bert.cls_id and row[-1] == bert.sep_id and b["attention_mask"][0].all()
  assert b["weights"][0, -1] == 0 and b["weights"][0].sum() < len(EVAL[0][0])
  assert src.eval_words_cut > 0
  perfect = src.score(eval_preds(src, fill=0))
  # the cut words are predicted "O": their entities are missed ("United Arab Emirates" is cut
  # after "arab", a wrong entity); accuracy counts the words in the rows only
  assert perfect["recall"] < 1.0 and perfect["f1"] < 1.0 and perfect["accuracy"] == 1.0


# ---- scores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [48, 12])
def test_score_matches_seqeval(bert, seq_len):
  src = mocked(bert, seq_len=seq_len)
  perfect = src.score(eval_preds(src, fill=ID["B-PER"]))  # other subtokens do not count
  if seq_len == 48:
    assert perfect == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}
  true = [[LABELS[t] for t in tags] for _, tags in EVAL]
  for seed in range(4):
    preds = eval_preds(src, rng=np.random.default_rng(seed))
    for p, t in zip(preds, eval_preds(src, fill=0)):  # keep about half the tags right
      keep = np.random.default_rng(seed + 10).random(p.shape) < 0.5
      p[keep] = t[keep]
    got = src.score(preds)
    pred = word_predictions(src, preds, EVAL)
    assert got["precision"] == pytest.approx(seqeval_metrics.precision_score(true, pred))
    assert got["recall"] == pytest.approx(seqeval_metrics.recall_score(true, pred))
    assert got["f1"] == pytest.approx(seqeval_metrics.f1_score(true, pred))
    kept = [(t, p) for ts, ps, (w, _) in zip(true, pred, EVAL) for t, p in zip(ts, ps)]
    if seq_len == 48:  # every word has its subtoken: accuracy over all words
      assert got["accuracy"] == pytest.approx(np.mean([t == p for t, p in kept]))
  with pytest.raises(ValueError, match="eval batches"):
    src.score(eval_preds(src, fill=0)[:-1])


# ---- CoNLL files -----------------------------------------------------------------------------


def test_conll_files(files, bert, tmp_path):
  kw = dict(batch_size=4, eval_batch_size=2, seq_len=48, seed=1)
  src = ner.NerSource(files, bert, **kw)
  assert src.label_names == LABELS and src.eval_steps == 3
  assert [w for w, _ in src._train] == [w for w, _ in TRAIN]
  for (w, t), (w2, t2) in zip(src._eval_sentences, EVAL):
    assert w == w2 and (t == t2).all()
  tfds_src = mocked(bert)  # the same sentences through TFDS give the same batches
  for s in range(3):
    for k, v in tfds_src.batch(s, "eval").items():
      np.testing.assert_array_equal(src.batch(s, "eval")[k], v, err_msg=k)
    for k, v in tfds_src.batch(s).items():
      np.testing.assert_array_equal(src.batch(s)[k], v, err_msg=k)
  assert src.score(eval_preds(src, fill=0))["f1"] == 1.0

  bad = tmp_path / "bad.txt"
  bad.write_text(
    "-DOCSTART- -X- O O\n\nJohn NNP B-NP B-PER\nlives VBZ B-VP O\n\nBob NNP B-NP B-PERSON\n"
  )
  with pytest.raises(ValueError, match=r"bad.txt, line 6: tag 'B-PERSON' .*'I-MISC'"):
    ner.NerSource(f"conll:{bad},{files.split(',')[1]}", bert, **kw)
  with pytest.raises(ValueError, match="conll:<train file>,<eval file>"):
    ner.NerSource(f"conll:{bad}", bert, **kw)
  own = ner.NerSource(f"conll:{bad},{bad}", bert, labels=["O", "B-PER", "B-PERSON"], **kw)
  assert own.label_names == ["O", "B-PER", "B-PERSON"] and len(own._train) == 2


def test_processes_split_train_and_score_together(files, bert):
  kw = dict(batch_size=4, eval_batch_size=4, seq_len=48, seed=1)
  parts = [ner.NerSource(files, bert, process_index=p, process_count=2, **kw) for p in (0, 1)]
  trains = [[" ".join(w) for w, _ in p._train] for p in parts]
  assert not set(trains[0]) & set(trains[1]) and len(trains[0] + trains[1]) == len(TRAIN)
  assert parts[0].eval_steps == 2  # 3 + 2 sentences, 2 rows a step on each process
  # the gathered global batches (process 0's rows, then process 1's) score the whole split
  gathered = [
    np.concatenate([np.where(b["weights"] > 0, b["targets"], 0) for b in batches])
    for batches in zip(*[[p.batch(s, "eval") for s in range(2)] for p in parts])
  ]
  assert parts[0].score(gathered) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "accuracy": 1.0}
  gathered[1][2, 1] = ID["B-ORG"]  # process 1's first row, step 1 (none): a padding row
  assert parts[1].score(gathered)["f1"] == 1.0
  gathered[0][2, 1] = ID["I-PER"]  # process 1's first row, step 0: "But" (O) -> I-PER
  assert parts[1].score(gathered)["accuracy"] < 1.0 and parts[1].score(gathered)["f1"] < 1.0


# ---- order -----------------------------------------------------------------------------------


def test_train_batches_are_a_function_of_step(files, bert):
  kw = dict(batch_size=4, eval_batch_size=2, seq_len=48, seed=5)
  a, b = ner.NerSource(files, bert, **kw), ner.NerSource(files, bert, **kw)
  steps = [a.batch(s) for s in range(6)]
  for s in (4, 1, 5, 0):  # any order, from a fresh source or not
    for k in steps[s]:
      np.testing.assert_array_equal(b.batch(s)[k], steps[s][k], err_msg=k)
  # 7 sentences in batches of 4: each epoch shows every sentence once, in a new order
  rows = np.concatenate([x["inputs"] for x in steps])
  firsts = [tuple(r) for r in rows[:7]]
  assert len(set(firsts)) == 7 and firsts != [tuple(r) for r in rows[7:14]]
  other = ner.NerSource(files, bert, **(kw | {"seed": 6}))
  assert not all((other.batch(s)["inputs"] == steps[s]["inputs"]).all() for s in range(3))


# ---- errors ----------------------------------------------------------------------------------


def test_tokenizer_errors():
  slow = HFTokenizer.__new__(HFTokenizer)  # a Python tokenizer, as HFTokenizer would wrap it
  slow.tok, slow.name = types.SimpleNamespace(is_fast=False), "some/slow-tokenizer"
  with pytest.raises(ValueError, match=r"data.tokenizer='some/slow-tokenizer' is a slow .*fast"):
    mocked(slow)
  with pytest.raises(ValueError, match="byte tokenizer or a Hugging Face"):
    mocked(object())
