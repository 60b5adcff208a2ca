"""Named-entity recognition data: TFDS's conll2003 (or another TFDS dataset of tokens and tag
sequences), or CoNLL-2003 format files; words tokenized into subtokens, each word's tag on its
first subtoken (the anchor of transformers' run_ner example).

    source = NerSource("conll2003", tokenizer, batch_size=32, eval_batch_size=64, seq_len=128)
    source.label_names             # ["O", "B-PER", "I-PER", ...]: tag ids' names
    batch = source.batch(step, "train")
    source.score(eval_predictions)  # entity-level precision / recall / F1, token accuracy

Names (`data.tfds.name`):
- "conll2003": TFDS's builder (features tokens, pos, chunks, ner; splits train, dev, test; the
  eval split defaults to "dev"). Its tags are CoNLL-2003's own, IOB1 in the original files
  (an entity opens with I-, B- only between two adjacent entities of a type); the scoring
  chunks IOB1 and IOB2 alike. Another TFDS dataset of a tokens feature (`tokens_key`) and a
  sequence of ClassLabel tags (`tags_key`) works the same way.
- "conll:<train file>,<eval file>": CoNLL-2003 format files, for TFDS installs that cannot
  download conll2003: one token per line, the word in the first column and its tag in the last
  (columns split on whitespace), blank lines between sentences, `-DOCSTART-` lines skipped.
  The tags must be among `labels` (CoNLL-2003's tag set, in TFDS's order, unless given), so a
  model trained on the files reads TFDS's ids and the other way round. `data_dir`,
  `train_split` and `eval_split` do not apply. Paths with "://" (gs://) are read through
  tf.io.gfile.

Tokenizing: a fast Hugging Face tokenizer tokenizes the words (`is_split_into_words=True`) with
its own template ([CLS] ... [SEP] for BERT) and `word_ids()` says which word each subtoken
comes from (a byte-level BPE, GPT-2's kind, tokenizes each word as a text of its own unless
its config sets add_prefix_space=True, which gives running text's leading-space tokens; older
transformers refuse pre-split words without it). The byte tokenizer joins the words with
spaces between [CLS] and [SEP], and each word's first byte carries its tag. Rows are truncated
to seq_len (the words cut off are not trained on and are scored as predicted "O", as the
official evaluation counts words a system leaves out) and padded.

Order: each process holds its own contiguous part of the train split (TFDS:
`tfds.split_for_jax_process`; files: near-equal parts in file order) in memory and reads it in
a permutation drawn from (seed, process index, epoch), so `batch(step)` is a pure function of
(seed, step, process index, process count): resuming costs nothing, and the order does not
depend on `shuffle_buffer` (accepted for the other sources' sake, unused). Sentences without
words (conll2003's files end with one) are dropped. Eval reads the whole eval split on every
process, one sentence a row, cut into equal parts in order, as GlueSource; `eval_steps`
batches cover it, the last ones padded with rows of weight 0.

TensorFlow is imported on first use only (through experiments.data.tfds).
"""

import math
import os

import numpy as np

from experiments import scores
from experiments.data.tfds import _Source, _tf, pad_rows, read_eval
from experiments.data.tokenizer import ByteTokenizer

# CoNLL-2003's tags, in the order of TFDS's conll2003 ClassLabel.
CONLL2003_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
FILES_PREFIX = "conll:"
# Eval splits of TFDS NER datasets without a "validation" split.
EVAL_SPLITS = {"conll2003": "dev"}


def read_conll(path: str, labels) -> list[tuple[list[str], np.ndarray]]:
  """The sentences of a CoNLL-2003 format file: (words, int32 tag ids into `labels`) each.

  One token per line, columns split on whitespace, the word first and the tag last; blank
  lines end a sentence, `-DOCSTART-` lines are skipped (and end one too). A tag outside
  `labels` or a line with a single column is a ValueError naming the file and line."""
  ids = {t: i for i, t in enumerate(labels)}
  if "://" in path:
    tf, _ = _tf()
    opener = tf.io.gfile.GFile
  else:
    if not os.path.isfile(path):
      raise ValueError(f"CoNLL file {path!r}: no such file.")
    opener = open
  sentences, words, tags = [], [], []

  def end():
    if words:
      sentences.append((list(words), np.array(tags, np.int32)))
    words.clear()
    tags.clear()

  with opener(path, "r") as f:
    for n, line in enumerate(f, 1):
      cols = line.split()
      if not cols or cols[0] == "-DOCSTART-":
        end()
        continue
      if len(cols) < 2:
        raise ValueError(
          f"{path}, line {n}: {line.strip()!r} has one column; CoNLL lines are a token, "
          "optional columns (part of speech, chunk) and the NER tag last."
        )
      if cols[-1] not in ids:
        raise ValueError(
          f"{path}, line {n}: tag {cols[-1]!r} is not among the labels {list(labels)}."
        )
      words.append(cols[0])
      tags.append(ids[cols[-1]])
  end()
  return sentences


def parse_files(name: str) -> tuple[str, str]:
  """(train file, eval file) of "conll:<train file>,<eval file>"."""
  paths = name.removeprefix(FILES_PREFIX).split(",")
  if len(paths) != 2 or not all(p.strip() for p in paths):
    raise ValueError(
      f"data.tfds.name={name!r}: CoNLL files are named {FILES_PREFIX}<train file>,<eval file>."
    )
  return paths[0].strip(), paths[1].strip()


def _even_part(items: list, index: int, count: int) -> list:
  """Part `index` of `count` contiguous, near-equal parts of `items`."""
  lo, hi = (len(items) * index) // count, (len(items) * (index + 1)) // count
  return items[lo:hi]


def _first_positions(word_ids, n_words: int) -> np.ndarray:
  """int32 [n_words]: each word's first subtoken's position in the row, -1 for words with no
  subtoken there (cut off by truncation, or tokenized to nothing)."""
  first = np.full(n_words, -1, np.int32)
  for pos, w in enumerate(word_ids):
    if w is not None and first[w] < 0:
      first[w] = pos
  return first


class NerSource(_Source):
  """Token classification batches of a NER dataset (see the module's docstring).

  batch(step, split) -> int32 inputs, attention_mask, token_type_ids, targets [b, seq_len]
  (targets: the word's tag id on each word's first subtoken, 0 elsewhere) and float32 weights
  [b, seq_len] (1 on first subtokens, 0 on the other subtokens, special tokens, padding and
  padding rows); b = this process's rows. `label_names` names the tag ids; `eval_steps`
  batches cover the eval split; `score` turns the eval batches' predictions into
  entity-level precision, recall and F1 (experiments.scores.ner_scores) and accuracy.
  """

  prepare_on_init = False  # CoNLL files need no TFDS builder; a TFDS name prepares it below

  def __init__(
    self,
    name: str,
    tokenizer,
    *,
    eval_split: str = "",
    tokens_key: str = "tokens",
    tags_key: str = "ner",
    labels=None,
    **kwargs,
  ):
    """`kwargs`: _Source's (batch_size, eval_batch_size, seq_len, seed, data_dir, train_split,
    shuffle_buffer (unused: the whole part is shuffled in memory), process_index,
    process_count)."""
    if not name:
      raise ValueError("NER data needs a dataset: set data.tfds.name (e.g. conll2003).")
    eval_split = eval_split or EVAL_SPLITS.get(name.split("/")[0], "")
    super().__init__(name, tokenizer, eval_split=eval_split, **kwargs)
    process_index, process_count = self.process_index, self.process_count
    if self.seq_len < 3:
      raise ValueError(f"seq_len={self.seq_len} has no room for a word between special tokens.")
    self._encode_words = self._word_encoder(tokenizer)
    if name.startswith(FILES_PREFIX):
      self.label_names = list(labels or CONLL2003_LABELS)
      train_file, eval_file = parse_files(name)
      self.splits = {"train": train_file, "eval": eval_file}
      train = _even_part(read_conll(train_file, self.label_names), process_index, process_count)
      evals = read_conll(eval_file, self.label_names)
    else:
      self.tokens_key, self.tags_key = tokens_key, tags_key
      self.label_names = self._tfds_labels(labels)  # prepares self.builder
      train = self._read_tfds(self.process_split("train"), "train")
      evals = self._read_tfds(self.splits["eval"], "eval")
    if not train:
      raise self._empty("train")
    if not evals:
      raise self._empty("eval")
    self._train = train
    self._perm = (None, None)  # (epoch, permutation) of the last epoch asked for
    self._eval_sentences = evals
    self._eval_all = self.encode(evals)  # every process's rows: score() maps them all
    self._eval_first = self._eval_all.pop("first")
    self.eval_part = math.ceil(len(evals) / process_count)  # sentences a process evaluates
    lo = process_index * self.eval_part
    self._eval = {k: v[lo : lo + self.eval_part] for k, v in self._eval_all.items()}
    self.eval_steps = math.ceil(self.eval_part / self.rows["eval"])
    # eval words with no subtoken in their row (scored as predicted "O")
    self.eval_words_cut = int(sum((f < 0).sum() for f in self._eval_first))

  # ---- reading ---------------------------------------------------------------------------

  def _empty(self, split: str) -> ValueError:
    where = "file" if self.name.startswith(FILES_PREFIX) else "split"
    part = f" (process {self.process_index}'s part)" if self.process_count > 1 else ""
    return ValueError(
      f"The {split} {where} {self.splits[split]!r} of {self.name}{part} holds no sentences."
    )

  def _tfds_labels(self, labels) -> list[str]:
    features = self.builder.info.features
    missing = [k for k in (self.tokens_key, self.tags_key) if k not in features.keys()]
    if missing:
      raise ValueError(
        f"{self.name} has no feature {missing}: set data.tfds.tokens_key / tags_key to its "
        f"words and tags, among {sorted(features.keys())}."
      )
    names = getattr(getattr(features[self.tags_key], "feature", None), "names", None)
    if not names:
      raise ValueError(f"{self.name}'s {self.tags_key!r} is not a sequence of ClassLabel tags.")
    if labels is not None and list(labels) != list(names):
      raise ValueError(f"labels={list(labels)} differ from {self.name}'s tags {list(names)}.")
    return list(names)

  def _read_tfds(self, split, what: str) -> list[tuple[list[str], np.ndarray]]:
    """(words, int32 tag ids) of every non-empty sentence of `split`, in file order."""
    _, tfds = _tf()
    sentences, n = [], len(self.label_names)
    for ex in tfds.as_numpy(read_eval(self.builder, split)):
      words = [w.decode("utf-8") for w in ex[self.tokens_key]]
      tags = np.asarray(ex[self.tags_key]).astype(np.int32)
      if len(words) != len(tags):
        raise ValueError(
          f"{self.name} ({what}): a sentence of {len(words)} words has {len(tags)} tags."
        )
      if ((tags < 0) | (tags >= n)).any():
        raise ValueError(
          f"{self.name} ({what}): tag ids {sorted(set(tags.tolist()))} outside [0, {n})."
        )
      if words:
        sentences.append((words, tags))
    return sentences

  # ---- tokenizing ------------------------------------------------------------------------

  def _word_encoder(self, tok):
    """A function: list of word lists -> (inputs, attention_mask, token_type_ids [n, L], list
    of each row's word id per position, None off words), for `tok`."""
    L = self.seq_len
    if isinstance(tok, ByteTokenizer):
      return self._encode_bytes
    hf = getattr(tok, "tok", None)
    if hf is None:
      raise ValueError(f"NER needs the byte tokenizer or a Hugging Face one, not {tok!r}.")
    name = getattr(tok, "name", repr(tok))
    if not getattr(hf, "is_fast", False):
      raise ValueError(
        f"data.tokenizer={name!r} is a slow (Python) tokenizer: NER aligns words with "
        "subtokens through word_ids(), which only fast (Rust) tokenizers give. Save a fast "
        "one (transformers.AutoTokenizer.from_pretrained(name, use_fast=True)"
        ".save_pretrained(dir), which converts it when `tokenizers` can) and set "
        "data.tokenizer=dir."
      )

    def encode(words_list):
      enc = hf(
        [list(w) for w in words_list],
        is_split_into_words=True,
        truncation=True,
        max_length=L,
        padding="max_length",
        return_attention_mask=True,
        return_token_type_ids=True,
        return_tensors="np",
      )
      word_ids = [enc.word_ids(i) for i in range(len(words_list))]
      ids = (enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
      return (*ids, word_ids)

    try:
      encode([["a", "b"]])
    except Exception as e:
      raise ValueError(
        f"data.tokenizer={name!r} cannot tokenize words given one by one ({type(e).__name__}: "
        f"{e}); a byte-level BPE (GPT-2's kind) may need add_prefix_space=True in its config."
      ) from e
    return encode

  def _encode_bytes(self, words_list):
    """The byte tokenizer's rows: [CLS] w1 ' ' w2 ... [SEP], truncated and padded."""
    tok, L = self.tokenizer, self.seq_len
    n = len(words_list)
    inputs = np.full((n, L), tok.pad_id, np.int32)
    mask = np.zeros((n, L), np.int32)
    word_ids = []
    space = tok.encode(" ")
    for row, words in enumerate(words_list):
      ids, wid = [tok.cls_id], [None]
      for i, w in enumerate(words):
        piece = (space if i else []) + tok.encode(w)
        ids += piece
        wid += [None] * (len(piece) - len(w.encode("utf-8"))) + [i] * len(w.encode("utf-8"))
      ids, wid = ids[: L - 1] + [tok.sep_id], wid[: L - 1] + [None]
      inputs[row, : len(ids)] = ids
      mask[row, : len(ids)] = 1
      word_ids.append(wid + [None] * (L - len(wid)))
    return inputs, mask, np.zeros((n, L), np.int32), word_ids

  def encode(self, sentences) -> dict:
    """Rows of (words, tag ids) sentences: inputs, attention_mask, token_type_ids, targets,
    weights [n, seq_len], and "first": each sentence's first-subtoken positions (-1: none)."""
    inputs, mask, types, word_ids = self._encode_words([w for w, _ in sentences])
    n, L = len(sentences), self.seq_len
    targets = np.zeros((n, L), np.int32)
    weights = np.zeros((n, L), np.float32)
    first = []
    for row, ((words, tags), wid) in enumerate(zip(sentences, word_ids)):
      f = _first_positions(wid, len(words))
      kept = f >= 0
      targets[row, f[kept]] = tags[kept]
      weights[row, f[kept]] = 1.0
      first.append(f)
    return {
      "inputs": inputs,
      "attention_mask": mask,
      "token_type_ids": types,
      "targets": targets,
      "weights": weights,
      "first": first,
    }

  # ---- batches ---------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      rng = np.random.default_rng([self.seed % 2**32, self.process_index, epoch])
      self._perm = (epoch, rng.permutation(len(self._train)))
    return self._perm[1]

  def batch(self, step: int, split: str = "train") -> dict:
    """This process's rows of the batch at `step` of `split` ("train" or "eval")."""
    if split == "eval":
      return self._eval_batch(step)
    if split != "train":
      raise ValueError(f"split={split!r}: choose 'train' or 'eval'.")
    b, n = self.rows["train"], len(self._train)
    pos = step * b + np.arange(b)
    chosen = [self._train[self._permutation(int(p // n))[p % n]] for p in pos]
    out = self.encode(chosen)
    del out["first"]
    return out

  def _eval_batch(self, step: int) -> dict:
    """Eval rows [step * b, (step + 1) * b) of this process's part; weight-0 rows past it."""
    b = self.rows["eval"]
    rows = {k: v[step * b : (step + 1) * b] for k, v in self._eval.items()}
    return pad_rows(rows, b, self.tokenizer.pad_id)

  # ---- scoring ---------------------------------------------------------------------------

  def eval_rows(self, step: int) -> list[int]:
    """The eval sentences (indices into the eval split) of the global eval batch at `step`:
    every process's rows in process order, -1 for padding rows."""
    b, part, n = self.rows["eval"], self.eval_part, len(self._eval_sentences)
    out = []
    for p in range(self.process_count):
      for j in range(b):
        local = step * b + j
        i = p * part + local
        out.append(i if local < part and i < n else -1)
    return out

  def score(self, preds_list) -> dict[str, float]:
    """Entity-level {"precision", "recall", "f1"} (experiments.scores.ner_scores, seqeval's
    conventions) over the eval split's word-level tag sequences, and "accuracy" over the words
    that have a subtoken in their row.

    preds_list: the eval_steps eval batches' predicted tag ids (argmax), each int [E, seq_len]
    with E = eval.batch_size, every process's rows in process order (as gathered across
    processes; with one process, the batch). A word's prediction is its first subtoken's; a
    word with no subtoken in its row (cut off by truncation) is predicted "O".
    """
    if len(preds_list) != self.eval_steps:
      raise ValueError(
        f"{len(preds_list)} eval batches of predictions; the split needs "
        f"{self.eval_steps} (eval.steps=0)."
      )
    E, n_labels = self.rows["eval"] * self.process_count, len(self.label_names)
    pred_ids = [None] * len(self._eval_sentences)
    for step, preds in enumerate(preds_list):
      preds = np.asarray(preds)
      if preds.shape != (E, self.seq_len):
        raise ValueError(
          f"eval batch {step}: predictions {preds.shape}, expected {(E, self.seq_len)} (tag ids "
          "of every process's rows, not logits)."
        )
      for row, i in enumerate(self.eval_rows(step)):
        if i >= 0:
          f = self._eval_first[i]
          pred_ids[i] = np.where(f >= 0, preds[row, np.maximum(f, 0)], -1)  # -1: "O"
    if any(p is None for p in pred_ids):
      raise ValueError("some eval sentences have no predictions: pass every eval batch.")
    true_seqs, pred_seqs, right, counted = [], [], 0, 0
    for (_, tags), pred, f in zip(self._eval_sentences, pred_ids, self._eval_first):
      kept = f >= 0
      if ((pred[kept] < 0) | (pred[kept] >= n_labels)).any():
        bad = sorted(set(pred[kept].tolist()))
        raise ValueError(f"predicted tag ids outside [0, {n_labels}): {bad}")
      true_seqs.append([self.label_names[t] for t in tags])
      pred_seqs.append([self.label_names[t] if t >= 0 else "O" for t in pred])
      right += int((pred[kept] == tags[kept]).sum())
      counted += int(kept.sum())
    out = scores.ner_scores(true_seqs, pred_seqs)
    return {
      "precision": float(out["precision"]),
      "recall": float(out["recall"]),
      "f1": float(out["f1"]),
      "accuracy": right / counted if counted else 0.0,
    }
