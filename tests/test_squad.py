"""SQuAD v1.1 windows and postprocessing (experiments/data/squad.py), offline: hand-written
questions with real answers in long contexts given to `tfds.testing.mock_data`, a BERT
WordPiece tokenizer built here from a small vocabulary, and the byte tokenizer."""

import random

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
transformers = pytest.importorskip("transformers")

from experiments.data import squad  # noqa: E402
from experiments.data.tfds import _tf  # noqa: E402
from experiments.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer  # noqa: E402

BYTES = ByteTokenizer()
WORDS = (
  "the a red big small dog cat bird ran sat flew over under near river park city old new "
  "house tree green blue north south king queen castle bridge"
).split()
PUNCT = [".", ",", "?"]
NAME = "squad/v1.1"


def make_examples(split: str, n: int, seed: int) -> list[dict]:
  """n questions on contexts of 10 to 90 words (some sentences end with "."), each answer a
  2-3 word span of its context; validation questions have a second, shorter gold answer."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    words = [
      rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(rng.randint(10, 90))
    ]
    if i % 5 == 0:
      words[rng.randrange(len(words))] = "café"  # two bytes for one character
    k = rng.randrange(len(words) - 3)
    span = " ".join(words[k : k + 3 if i % 2 else k + 2]).rstrip(".")
    context = " ".join(words)
    start = len(" ".join(words[:k])) + (k > 0)
    assert context[start : start + len(span)] == span
    answers = [(span, start)]
    if split == "validation":
      short = span.split(" ")[0]
      answers.append((short, start))
    question = "  which " + " ".join(rng.choices(WORDS, k=rng.randint(2, 14))) + " ?"
    out.append({"id": f"{split}{i}", "question": question, "context": context, "answers": answers})
  return out


EXAMPLES = {"train": make_examples("train", 24, 0), "validation": make_examples("validation", 9, 1)}


def as_dataset(self, split, **kwargs):
  """Mocked `_as_dataset`: EXAMPLES[split], or a process's even part of it (the split that
  tfds.split_for_jax_process gives)."""
  tf, _ = _tf()
  name, index, count = (
    (split, 0, 1) if isinstance(split, str) else (split.split, split.index, split.count)
  )
  examples = EXAMPLES[name]
  part = -(-len(examples) // count)
  examples = examples[index * part : (index + 1) * part]

  def gen():
    for ex in examples:
      texts, starts = zip(*ex["answers"])
      yield {
        "id": ex["id"],
        "title": "t",
        "question": ex["question"],
        "context": ex["context"],
        "answers": {"text": list(texts), "answer_start": np.array(starts, np.int32)},
      }

  text = tf.TensorSpec((), tf.string)
  return tf.data.Dataset.from_generator(
    gen,
    output_signature={
      "id": text,
      "title": text,
      "question": text,
      "context": text,
      "answers": {
        "text": tf.TensorSpec((None,), tf.string),
        "answer_start": tf.TensorSpec((None,), tf.int32),
      },
    },
  )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A directory with vocab.txt over WORDS, and the fast BERT WordPiece tokenizer of it
  saved in saved/."""
  root = tmp_path_factory.mktemp("squad_bert")
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "which", "cafe", *WORDS, *PUNCT]
  (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
  transformers.BertTokenizerFast.from_pretrained(str(root)).save_pretrained(str(root / "saved"))
  return str(root)


@pytest.fixture(scope="module")
def bert(bert_dir):
  """The fast tokenizer, wrapped as data.tokenizer=<dir> gives it."""
  tok = get_tokenizer(bert_dir + "/saved")
  assert tok.tok.is_fast
  assert tok.encode("near café") == [tok.tok.vocab[w] for w in ("near", "cafe")]
  return tok


@pytest.fixture(autouse=True)
def mocked():
  """TFDS reads EXAMPLES during each test (train windows are read on the first train batch)."""
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


def source(tokenizer, **kw):
  kw = dict(batch_size=4, eval_batch_size=8, seq_len=40, doc_stride=8, max_query_len=10) | kw
  return squad.SquadSource(NAME, tokenizer, **kw)


def uncased(text):
  """What the uncased BERT tokenizer decodes `text` to."""
  return text.lower().replace("é", "e")


def equal(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def check_windows(src, decode, fold=lambda t: t):
  feats, L = src._eval, src.seq_len
  n_windows = np.bincount(feats["example"], minlength=len(src.eval_examples))
  assert (n_windows >= 1).all() and n_windows.max() >= 3  # long contexts: several windows
  inside_seen = outside_seen = 0
  for i, e in enumerate(feats["example"]):
    ex = src.eval_examples[e]
    text, start = ex["answers"][0]
    offs = feats["offsets"][i]
    ctx = np.flatnonzero(offs[:, 0] >= 0)
    lo, hi = offs[ctx[0], 0], offs[ctx[-1], 1]  # the window's context characters
    s, t = feats["targets"][i]
    if lo <= start and start + len(text) <= hi:
      inside_seen += 1
      assert 0 < s <= t < L
      assert ex["context"][offs[s, 0] : offs[t, 1]] == text  # offsets map back to the answer
      last = t + np.sum((offs[t + 1 :] == offs[t]).all(axis=1))  # é: 2 bytes, 1 character
      assert decode(feats["inputs"][i, s : last + 1]) == fold(text)
    else:
      outside_seen += 1
      assert s == t == 0  # not (wholly) inside: the [CLS] position
    # the question comes first, the context after it
    tt, m = feats["token_type_ids"][i], feats["attention_mask"][i]
    assert (tt[ctx] == 1).all() and (tt[: ctx[0] - 1] == 0).all() and m[ctx].all()
  assert inside_seen >= len(src.eval_examples) and outside_seen > 0
  # consecutive windows of one example share doc_stride context tokens
  for e in np.flatnonzero(n_windows > 1):
    rows = np.flatnonzero(feats["example"] == e)
    for a, b in zip(rows, rows[1:]):
      ca = feats["inputs"][a][feats["offsets"][a][:, 0] >= 0]
      cb = feats["inputs"][b][feats["offsets"][b][:, 0] >= 0]
      np.testing.assert_array_equal(ca[-src.doc_stride :], cb[: src.doc_stride])
      oa = feats["offsets"][a][feats["offsets"][a][:, 0] >= 0]
      ob = feats["offsets"][b][feats["offsets"][b][:, 0] >= 0]
      assert (oa[-src.doc_stride :] == ob[: src.doc_stride]).all() and ob[-1, 1] > oa[-1, 1]
    assert feats["attention_mask"][rows[:-1]].all()  # all but the last window are full
  return n_windows


def test_windows_with_bert(bert):
  src = source(bert)
  n_windows = check_windows(src, bert.decode, uncased)
  feats = src._eval
  # the windows are the fast tokenizer's own: as many as its overflow gives, same ids
  for e, ex in enumerate(src.eval_examples):
    q = ex["question"].lstrip()  # cut after its first max_query_len = 10 tokens
    q_offsets = bert.tok(q, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    q = q[: q_offsets[min(10, len(q_offsets)) - 1][1]]
    enc = bert.tok(
      q,
      ex["context"],
      truncation="only_second",
      max_length=40,
      stride=8,
      return_overflowing_tokens=True,
      padding="max_length",
    )
    assert len(enc["input_ids"]) == n_windows[e]
    np.testing.assert_array_equal(feats["inputs"][feats["example"] == e], enc["input_ids"])
  assert (feats["inputs"][:, 0] == bert.cls_id).all()


def test_windows_with_bytes():
  src = source(BYTES, seq_len=64, doc_stride=16)
  n_windows = check_windows(src, BYTES.decode)
  # byte windows: [CLS] question [SEP] context [SEP], the context in windows() of its bytes
  for e, ex in enumerate(src.eval_examples):
    q = BYTES.encode(ex["question"].lstrip())[:10]
    room = 64 - len(q) - 3
    assert n_windows[e] == len(squad.windows(len(BYTES.encode(ex["context"])), room, 16))
  assert squad.windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
  assert squad.windows(4, 4, 1) == [(0, 4)] and squad.windows(5, 4, 3) == [(0, 4), (1, 5)]


def gold_logits(src, rng, which=None):
  """Eval batches' logits [E, 2, L] with, per question, the max on the gold span of one window
  holding it (`which`: example -> (start, end) token span to use instead, in its first
  window holding the answer)."""
  feats, L = src._eval, src.seq_len
  n = len(feats["inputs"])
  logits = rng.uniform(-1, 0, (src.eval_steps * src.rows["eval"], 2, L)).astype(np.float32)
  done = set()
  for i in range(n):
    e = int(feats["example"][i])
    s, t = feats["targets"][i]
    if e in done or s == 0:
      continue
    done.add(e)
    if which and e in which:
      s, t = which[e](i)
    logits[i, 0, s] = logits[i, 1, t] = 5.0
  assert done == set(range(len(src.eval_examples)))
  return list(logits.reshape(src.eval_steps, src.rows["eval"], 2, L))


def test_postprocess_and_score(bert):
  src = source(bert)
  rng = np.random.default_rng(0)
  logits = gold_logits(src, rng)
  preds = src.postprocess(logits)
  assert preds == {ex["id"]: ex["answers"][0][0] for ex in src.eval_examples}
  assert src.score(logits) == {"exact_match": 100.0, "f1": 100.0, "unanswered": 0}
  # example 1: gold "green old south" (and "green"); the span shifted one token right
  feats = src._eval
  assert src.references["validation1"] == ["green old south", "green"]

  def shifted(i):
    s, t = feats["targets"][i]
    return s + 1, t + 1

  logits = gold_logits(src, rng, {1: shifted})
  assert src.postprocess(logits)["validation1"] == "old south over"
  # EM 0 and F1 2/3 (2 of 3 words shared with the first gold, none with "green") on 1 of n
  n = len(src.eval_examples)
  got = src.score(logits)
  assert got["exact_match"] == pytest.approx(100 * (n - 1) / n)
  assert got["f1"] == pytest.approx(100 * (n - 1 + 2 / 3) / n) and got["unanswered"] == 0


def test_span_rules(bert):
  """Spans with end < start, longer than max_answer_length, or on non-context tokens lose to
  lower-scoring valid ones; a question with no valid span gets "empty"."""
  src = source(bert)
  feats, L = src._eval, src.seq_len
  E = src.rows["eval"]
  logits = np.full((src.eval_steps * E, 2, L), -10.0, np.float32)
  i = int(np.flatnonzero(feats["example"] == 0)[0])  # example 0's first window
  ctx = np.flatnonzero(feats["offsets"][i][:, 0] >= 0)
  a = ctx[2]
  context = src.eval_examples[0]["context"]
  span = lambda s, t: context[feats["offsets"][i][s, 0] : feats["offsets"][i][t, 1]]  # noqa: E731
  batches = lambda: list(logits.reshape(src.eval_steps, E, 2, L))  # noqa: E731
  logits[i, 0, 0] = logits[i, 1, 0] = 9.0  # [CLS]: not a context token
  logits[i, 0, a + 6], logits[i, 1, a + 5] = 8.0, 8.0  # end < start: 16
  logits[i, 0, a] = 7.0  # a..a+5: 15, 6 tokens
  logits[i, 1, a + 3] = 6.0  # a..a+3: 13, 4 tokens
  assert src.postprocess(batches())["validation0"] == span(a, a + 5)
  assert src.postprocess(batches(), max_answer_length=6)["validation0"] == span(a, a + 5)
  assert src.postprocess(batches(), max_answer_length=5)["validation0"] == span(a, a + 3)
  # only non-context tokens among the n best: "empty"; the others' best spans are anywhere
  logits[i] = -10.0
  logits[i, :, 0] = 9.0
  logits[i, :, ctx[-1] + 1 :] = 9.0  # [SEP] and padding
  assert src.postprocess(batches(), n_best=2)["validation0"] == "empty"
  assert src.postprocess(batches(), n_best=L)["validation0"] != "empty"


def test_tokenizer_and_config_errors(bert, bert_dir):
  slow = HFTokenizer.__new__(HFTokenizer)
  slow.name = "slow-bert"
  slow.tok = transformers.BertTokenizerLegacy(vocab_file=f"{bert_dir}/vocab.txt")
  with pytest.raises(ValueError, match=r"data\.tokenizer='slow-bert'.*no offset.*fast"):
    squad.SquadSource(NAME, slow, batch_size=4, eval_batch_size=4, seq_len=40)
  kw = dict(batch_size=4, eval_batch_size=4)
  with pytest.raises(ValueError, match=r"data\.squad\.doc_stride=27 must be in \[0, 27\)"):
    squad.SquadSource(NAME, bert, seq_len=40, doc_stride=27, max_query_len=10, **kw)
  with pytest.raises(ValueError, match=r"data\.squad\.doc_stride"):
    squad.SquadSource(NAME, BYTES, seq_len=384, doc_stride=128, max_query_len=300, **kw)
  with pytest.raises(ValueError, match=r"train\.seq_len=12 .*data\.squad\.max_query_len=10"):
    squad.SquadSource(NAME, bert, seq_len=12, doc_stride=0, max_query_len=10, **kw)
  with pytest.raises(ValueError, match=r"data\.tokenizer"):
    squad.SquadSource(NAME, object(), seq_len=40, **kw)
  with pytest.raises(ValueError, match=r"data\.tfds\.name='squad/v2\.0' has unanswerable"):
    squad.SquadSource("squad/v2.0", bert, seq_len=40, doc_stride=8, max_query_len=10, **kw)


def test_long_questions_are_cut(bert):
  src = source(bert, seq_len=24, doc_stride=4, max_query_len=5)
  feats = src._eval
  sep = np.argmax(feats["inputs"] == bert.sep_id, axis=1)
  assert sep.max() == 6 and (feats["offsets"][:, : sep.max() + 1] == -1).all()
  check_windows(src, bert.decode, uncased)


def test_train_batches_are_a_function_of_step(bert):
  src = source(bert, seed=3, batch_size=8)
  run = [src.batch(i) for i in range(12)]
  b = run[0]
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
    "inputs": ((8, 40), np.int32),
    "attention_mask": ((8, 40), np.int32),
    "token_type_ids": ((8, 40), np.int32),
    "targets": ((8, 2), np.int32),
    "weights": ((8,), np.float32),
  }
  n = len(src._train["inputs"])
  assert 48 < n < 96  # 12 steps x 8 rows: more than an epoch
  seen = np.concatenate([r["inputs"] for r in run])
  first = {x.tobytes() for x in seen[:n]}
  assert len(first) == n and first == {x.tobytes() for x in src._train["inputs"]}  # one epoch
  assert not (seen[n:] == seen[: len(seen) - n]).all()  # reshuffled
  equal(source(bert, seed=3, batch_size=8).batch(9), run[9])  # a fresh source at step 9
  equal(src.batch(4), run[4])  # back, and on
  equal(src.batch(5), run[5])
  assert (source(bert, seed=4, batch_size=8).batch(0)["inputs"] != b["inputs"]).any()
  # the targets still map to the answers
  for r in run[:3]:
    for x, (s, t) in zip(r["inputs"], r["targets"]):
      if s:
        text = bert.decode(x[s : t + 1])
        assert any(text == uncased(ex["answers"][0][0]) for ex in EXAMPLES["train"])


def test_processes(bert):
  parts = [source(bert, process_index=p, process_count=2) for p in range(2)]
  for p in parts:
    assert p.batch(0)["inputs"].shape == (2, 40)  # this process's rows
  t0 = {x.tobytes() for x in parts[0]._train["inputs"]}
  t1 = {x.tobytes() for x in parts[1]._train["inputs"]}
  assert t0 and t1 and not t0 & t1  # disjoint parts of the train split
  # eval: each process has its part of the windows; the global logits score 100
  whole = source(bert)
  n = len(whole._eval["inputs"])
  assert parts[0].eval_part == parts[1].eval_part == -(-n // 2)
  assert parts[0].eval_steps == -(-parts[0].eval_part // 4)
  got = [
    np.concatenate([p.batch(s, "eval")["inputs"] for p in parts])
    for s in range(parts[0].eval_steps)
  ]
  w = [
    np.concatenate([p.batch(s, "eval")["weights"] for p in parts])
    for s in range(parts[0].eval_steps)
  ]
  real = np.concatenate(got)[np.concatenate(w) > 0]
  assert len(real) == n and sorted(x.tobytes() for x in real) == sorted(
    x.tobytes() for x in whole._eval["inputs"]
  )
  # logits: the gold span on every window holding it, in the global batches' row order
  L = 40
  logits = []
  for s in range(len(got)):
    out = np.full((8, 2, L), -1.0, np.float32)
    for r in range(8):
      p, j = divmod(r, 4)
      b = parts[p].batch(s, "eval")
      st, en = b["targets"][j]
      if b["weights"][j] and st:
        out[r, 0, st] = out[r, 1, en] = 5.0
    logits.append(out)
  assert parts[1].score(logits)["exact_match"] == 100.0


def test_eval_batches(bert):
  src = source(bert, eval_batch_size=8)
  n = len(src._eval["inputs"])
  assert src.eval_steps == -(-n // 8)
  bs = [src.batch(s, "eval") for s in range(src.eval_steps)]
  w = np.concatenate([b["weights"] for b in bs])
  assert w.sum() == n and (w[:n] == 1).all() and (w[n:] == 0).all()
  last = bs[-1]
  pad = w[-8:] == 0
  assert (last["inputs"][pad] == bert.pad_id).all() and (last["targets"][pad] == 0).all()
  assert (last["attention_mask"][pad].sum(axis=1) == 1).all()
  with pytest.raises(ValueError, match="eval batches"):
    src.score([np.zeros((8, 2, 40))])
