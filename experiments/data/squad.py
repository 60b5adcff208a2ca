"""SQuAD v1.1 (extractive question answering) from TFDS: question / context windows with
token-level answer spans, and the n-best postprocessing back to answer texts.

    source = SquadSource("squad/v1.1", tokenizer, batch_size=32, eval_batch_size=64,
                         seq_len=384, doc_stride=128, max_query_len=64)
    batch = source.batch(step, "train")  # inputs, attention_mask, token_type_ids, targets, weights
    logits = [span_logits(source.batch(s, "eval")) for s in range(source.eval_steps)]
    source.score(logits)  # {"exact_match", "f1", "unanswered"}: the official v1.1 metric

Features follow Hugging Face's `run_qa.py` / `utils_qa.py`: the question (left-stripped, cut
to `max_query_len` tokens) first, then the context, truncated "only_second" into windows of
`seq_len` tokens that overlap by `doc_stride` tokens (the fast tokenizer's
`return_overflowing_tokens` / `stride`); a window's targets are the token indices of the first
answer's first and last characters (from the offset mapping), or (0, 0), the [CLS] position,
when the answer is not wholly inside the window. One deviation: run_qa's start search walks
past the context when the answer starts in the window's last context token (the [SEP] and
padding offsets are (0, 0)); here it stops at the context's end.

The byte tokenizer works too, with the same windows: [CLS] question [SEP] context [SEP], each
byte a token whose offsets are the character it belongs to.

Train: this process's part of the train split (tfds.split_for_jax_process) is read in file
order and windowed on the first train batch (3-4 s per 10k examples on one CPU core, with a
fast tokenizer or bytes), and its windows are drawn without replacement in a permutation of
(seed, epoch): `batch(step)` is a pure function of step, so a resumed run replays nothing.
Eval: every process reads and windows the whole eval split (as GlueSource) and takes its part
of the windows, `process_index` of `process_count` equal parts; `eval_steps` batches cover it,
the last padded with weight-0 rows. `score` takes the logits of the whole eval batches, all
processes' rows (process p's at rows [p * b, (p + 1) * b), b = eval_batch_size / process_count).
"""

import math

import numpy as np

from experiments import scores
from experiments.data.tfds import _decode, _Source, _tf, pad_rows, read_eval
from experiments.data.tokenizer import ByteTokenizer

CHUNK_EXAMPLES = 1000  # examples windowed per tokenizer call
FEATURES = ("id", "question", "context", "answers")


def windows(n: int, room: int, stride: int) -> list[tuple[int, int]]:
  """[start, stop) of the windows of `room` tokens over `n` tokens, consecutive ones sharing
  `stride` tokens: starts 0, room - stride, ... until one reaches the end (Hugging Face
  tokenizers' truncation with stride). One window when the n tokens fit."""
  if n <= room:
    return [(0, n)]
  out, step = [], room - stride
  for start in range(0, n, step):
    out.append((start, min(start + room, n)))
    if start + room >= n:
      break
  return out


def _targets(offsets_NxLx2, seq_NxL, starts_N, ends_N):
  """int32 [N, 2]: the first and last context tokens of the character span [start, end) of
  each window's answer, or (0, 0) when the window does not hold the whole span (or there is
  no answer: start < 0). run_qa's rule, on the context tokens only."""
  N, L = seq_NxL.shape
  ctx = seq_NxL == 1
  pos = np.arange(L)
  first = np.where(ctx, pos, L).min(axis=1)
  last = np.where(ctx, pos, -1).max(axis=1)
  rows = np.arange(N)
  has = (last >= 0) & (starts_N >= 0)
  first_c, last_c = np.minimum(first, L - 1), np.maximum(last, 0)
  inside = (
    has & (offsets_NxLx2[rows, first_c, 0] <= starts_N) & (offsets_NxLx2[rows, last_c, 1] >= ends_N)
  )
  start = np.where(ctx & (offsets_NxLx2[..., 0] <= starts_N[:, None]), pos, -1).max(axis=1)
  end = np.where(ctx & (offsets_NxLx2[..., 1] >= ends_N[:, None]), pos, L).min(axis=1)
  out = np.zeros((N, 2), np.int32)
  out[inside, 0], out[inside, 1] = start[inside], end[inside]
  return out


class SquadSource(_Source):
  """SQuAD v1.1 from TFDS ("squad/v1.1"): windows of seq_len tokens -> int32 inputs,
  attention_mask, token_type_ids [b, seq_len], int32 targets [b, 2] (answer start and end
  token; (0, 0) when the window does not hold the answer) and float32 weights [b] (1: a real
  window, 0: a padding row of the last eval batches).

  `shuffle_buffer` is not used: train windows are shuffled by a whole permutation per epoch.
  """

  def __init__(self, name, tokenizer, *, doc_stride=128, max_query_len=64, **kwargs):
    self.doc_stride, self.max_query_len = doc_stride, max_query_len
    self._check_tokenizer(tokenizer)
    seq_len = kwargs.get("seq_len")
    budget = max_query_len + self.n_special
    if max_query_len < 1 or seq_len is None or seq_len - budget < 1:
      raise ValueError(
        f"train.seq_len={seq_len} leaves no room for a context after a question of up to "
        f"data.squad.max_query_len={max_query_len} tokens and {self.n_special} special tokens: "
        f"raise train.seq_len above {budget} or lower data.squad.max_query_len (>= 1)."
      )
    if not 0 <= doc_stride < seq_len - budget:
      raise ValueError(
        f"data.squad.doc_stride={doc_stride} must be in [0, {seq_len - budget}): the windows "
        f"hold at least train.seq_len - data.squad.max_query_len - {self.n_special} = "
        f"{seq_len - budget} context tokens and consecutive ones share doc_stride of them. "
        "Lower data.squad.doc_stride (128 for seq_len 384) or raise train.seq_len."
      )
    super().__init__(name, tokenizer, **kwargs)
    features = getattr(self.builder.info, "features", None)
    if features is not None:
      keys = set(features.keys())
      if "is_impossible" in keys:
        raise ValueError(
          f"data.tfds.name={name!r} has unanswerable questions (SQuAD v2.0), which this source "
          "does not handle: use squad/v1.1."
        )
      if not set(FEATURES) <= keys:
        raise ValueError(
          f"data.tfds.name={name!r} lacks the SQuAD features {sorted(set(FEATURES) - keys)}: "
          "use squad/v1.1."
        )
    self.eval_examples = self._read(self.splits["eval"])
    if not self.eval_examples:
      raise self.empty("eval", "holds no examples")
    self._eval = self.featurize(self.eval_examples)
    n = len(self._eval["inputs"])
    self.eval_part = math.ceil(n / self.process_count)  # the same on every process
    self.eval_steps = math.ceil(self.eval_part / self.rows["eval"])
    self._train, self._perms = None, {}

  # ---- tokenizing ------------------------------------------------------------------------

  def _check_tokenizer(self, tokenizer):
    if isinstance(tokenizer, ByteTokenizer):
      self.n_special = 3
      return
    tok = getattr(tokenizer, "tok", None)
    if tok is None:
      raise ValueError(
        f"data.tokenizer: SQuAD needs the byte tokenizer or a Hugging Face tokenizer, not "
        f"{tokenizer!r}."
      )
    if not getattr(tok, "is_fast", False):
      raise ValueError(
        f"data.tokenizer={getattr(tokenizer, 'name', tokenizer)!r} is a slow (Python) "
        f"tokenizer ({type(tok).__name__}), which gives no offset mapping: SQuAD maps answers "
        "from characters to tokens through offsets, which need a fast (Rust, tokenizers "
        "library) tokenizer. Use a directory or Hub name that has a tokenizer.json (e.g. save "
        "transformers.AutoTokenizer.from_pretrained(name, use_fast=True) there)."
      )
    self.n_special = tok.num_special_tokens_to_add(pair=True)

  def _cut_questions(self, questions: list[str]) -> list[str]:
    """The questions cut after their first max_query_len tokens (HF tokenizers; a cut text
    that tokenizes to more tokens again is cut again)."""
    tok, m = self.tokenizer.tok, self.max_query_len
    out, todo = list(questions), list(range(len(questions)))
    for _ in range(m + 1):
      if not todo:
        break
      enc = tok([out[i] for i in todo], add_special_tokens=False, return_offsets_mapping=True)
      long = [
        (i, offs)
        for i, ids, offs in zip(todo, enc["input_ids"], enc["offset_mapping"])
        if len(ids) > m
      ]
      for i, offs in long:
        cut = offs[m - 1][1]
        out[i] = out[i][: cut if cut < len(out[i]) else offs[m - 1][0]]
      todo = [i for i, _ in long]
    return out

  def _encode_hf(self, questions, contexts) -> dict:
    tok = self.tokenizer.tok
    side, tok.padding_side = tok.padding_side, "right"  # [CLS] at 0, the question first
    try:
      enc = tok(
        self._cut_questions(questions),
        list(contexts),
        truncation="only_second",
        max_length=self.seq_len,
        stride=self.doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        return_attention_mask=True,
        padding="max_length",
      )
    finally:
      tok.padding_side = side
    n = len(enc["input_ids"])
    seq = np.full((n, self.seq_len), -1, np.int8)
    for i in range(n):
      ids = enc.sequence_ids(i)
      seq[i] = [-1 if s is None else s for s in ids]
    return {
      "inputs": np.asarray(enc["input_ids"], np.int32),
      "attention_mask": np.asarray(enc["attention_mask"], np.int8),
      "token_type_ids": np.asarray(enc["token_type_ids"], np.int8),
      "offsets": np.asarray(enc["offset_mapping"], np.int32).reshape(n, self.seq_len, 2),
      "seq": seq,
      "example": np.asarray(enc["overflow_to_sample_mapping"], np.int32),
    }

  def _encode_bytes(self, questions, contexts) -> dict:
    """[CLS] question [SEP] context [SEP] windows with the byte tokenizer, as _encode_hf."""
    tok, L = self.tokenizer, self.seq_len
    rows = []
    for e, (q, c) in enumerate(zip(questions, contexts)):
      q_ids = tok.encode(q)[: self.max_query_len]
      c_ids = np.asarray(tok.encode(c), np.int32)
      char_of_byte = np.repeat(np.arange(len(c)), [len(ch.encode("utf-8")) for ch in c])
      head = [tok.cls_id, *q_ids, tok.sep_id]
      for a, b in windows(len(c_ids), L - len(head) - 1, self.doc_stride):
        n_head, n = len(head), len(head) + b - a + 1
        row = {
          "inputs": np.full(L, tok.pad_id, np.int32),
          "attention_mask": np.zeros(L, np.int8),
          "token_type_ids": np.zeros(L, np.int8),
          "offsets": np.zeros((L, 2), np.int32),
          "seq": np.full(L, -1, np.int8),
          "example": np.int32(e),
        }
        row["inputs"][:n] = [*head, *c_ids[a:b], tok.sep_id]
        row["attention_mask"][:n] = 1
        row["token_type_ids"][n_head:n] = 1
        row["seq"][1 : n_head - 1], row["seq"][n_head : n - 1] = 0, 1
        row["offsets"][n_head : n - 1, 0] = char_of_byte[a:b]
        row["offsets"][n_head : n - 1, 1] = char_of_byte[a:b] + 1
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}

  def featurize(self, examples: list[dict]) -> dict:
    """The windows of `examples` (dicts of question, context, answers: [(text, start)]):
    inputs int32, attention_mask / token_type_ids int8 [N, L], targets int32 [N, 2],
    example int32 [N] (the index in `examples`), offsets int32 [N, L, 2] (character span of
    each context token; -1 for the other tokens)."""
    encode = self._encode_bytes if isinstance(self.tokenizer, ByteTokenizer) else self._encode_hf
    parts = []
    for lo in range(0, len(examples), CHUNK_EXAMPLES):
      chunk = examples[lo : lo + CHUNK_EXAMPLES]
      enc = encode([ex["question"].lstrip() for ex in chunk], [ex["context"] for ex in chunk])
      if not enc:
        continue
      first = [ex["answers"][0] if ex["answers"] else ("", -1) for ex in chunk]
      starts = np.array([s for _, s in first], np.int64)[enc["example"]]
      ends = starts + np.array([len(t) for t, _ in first], np.int64)[enc["example"]]
      seq = enc.pop("seq")
      enc["targets"] = _targets(enc["offsets"], seq, starts, ends)
      enc["offsets"] = np.where((seq == 1)[..., None], enc["offsets"], -1).astype(np.int32)
      enc["example"] = enc["example"] + lo
      parts.append(enc)
    if not parts:
      return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def _read(self, tfds_split) -> list[dict]:
    """The examples of `tfds_split`, in file order: id, question, context and answers, a
    list of (text, character start)."""
    tf, tfds = _tf()
    ds = read_eval(self.builder, tfds_split).prefetch(tf.data.AUTOTUNE)
    out = []
    for ex in tfds.as_numpy(ds):
      ans = ex["answers"]
      texts = _decode(np.asarray(ans["text"]).reshape(-1))
      starts = np.asarray(ans["answer_start"]).reshape(-1).tolist()
      out.append(
        {
          "id": ex["id"].decode("utf-8") if isinstance(ex["id"], bytes) else str(ex["id"]),
          "question": ex["question"].decode("utf-8"),
          "context": ex["context"].decode("utf-8"),
          "answers": list(zip(texts, starts)),
        }
      )
    return out

  # ---- batches ---------------------------------------------------------------------------

  def batch(self, step: int, split: str = "train") -> dict:
    """This process's rows of the batch at `step` of `split` ("train" or "eval")."""
    if split == "eval":
      return self._eval_batch(step)
    if split != "train":
      raise ValueError(f"split={split!r}: choose 'train' or 'eval'.")
    if self._train is None:
      examples = self._read(self.process_split("train"))
      train = self.featurize(examples)
      if not train:
        raise self.empty("train", "holds no examples")
      train.pop("offsets")
      self._train = train
    n, b = len(self._train["inputs"]), self.rows["train"]
    pos = step * b + np.arange(b)
    epoch, at = pos // n, pos % n
    idx = np.empty(b, np.int64)
    for e in np.unique(epoch):
      idx[epoch == e] = self._perm(int(e), n)[at[epoch == e]]
    return self._rows(self._train, idx)

  def _perm(self, epoch: int, n: int) -> np.ndarray:
    """The order of the train windows in `epoch`: a permutation of (seed, epoch)."""
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.clear()
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
    return self._perms[epoch]

  def _rows(self, feats: dict, idx) -> dict:
    return {
      "inputs": feats["inputs"][idx],
      "attention_mask": feats["attention_mask"][idx].astype(np.int32),
      "token_type_ids": feats["token_type_ids"][idx].astype(np.int32),
      "targets": feats["targets"][idx],
      "weights": np.ones(len(idx), np.float32),
    }

  def _eval_batch(self, step: int) -> dict:
    """Eval rows [step * b, (step + 1) * b) of this process's part; weight-0 rows past it."""
    b, n = self.rows["eval"], len(self._eval["inputs"])
    lo = self.process_index * self.eval_part + step * b
    hi = min(lo + b, (self.process_index + 1) * self.eval_part, n)
    rows = self._rows(self._eval, np.arange(lo, max(lo, hi)))
    return pad_rows(rows, b, self.tokenizer.pad_id)

  # ---- predictions -----------------------------------------------------------------------

  @property
  def references(self) -> dict[str, list[str]]:
    """{question id: [gold answer texts]} of the eval split."""
    return {ex["id"]: [t for t, _ in ex["answers"]] for ex in self.eval_examples}

  def _eval_logits(self, logits_list) -> np.ndarray:
    """float32 [N, 2, L]: the span logits of every eval window, from the eval batches' logits
    (all processes' rows, process p's at [p * b, (p + 1) * b) of each batch)."""
    n, b, P, L = len(self._eval["inputs"]), self.rows["eval"], self.process_count, self.seq_len
    if len(logits_list) != self.eval_steps:
      raise ValueError(f"score: {len(logits_list)} eval batches of logits, not {self.eval_steps}.")
    out = np.zeros((n, 2, L), np.float32)
    local = np.arange(b)
    for s, logits in enumerate(logits_list):
      logits = np.asarray(logits, np.float32)
      if logits.shape != (P * b, 2, L):
        raise ValueError(
          f"score: eval batch {s} has logits of shape {logits.shape}, not {(P * b, 2, L)} "
          "(the whole eval batch, start and end logits)."
        )
      for p in range(P):
        at = s * b + local
        feature = p * self.eval_part + at
        keep = (at < self.eval_part) & (feature < n)
        out[feature[keep]] = logits[p * b : (p + 1) * b][keep]
    return out

  def postprocess(self, logits_list, n_best: int = 20, max_answer_length: int = 30) -> dict:
    """{question id: predicted answer text}, as utils_qa.postprocess_qa_predictions (SQuAD
    v1.1): over every window of a question, the `n_best` highest start and end logits; a span
    counts when both ends are context tokens, end >= start and it has at most
    `max_answer_length` tokens; the best start + end logit wins (the first one on ties, in
    window order) and its text is context[offset of start : end of end]. A question with no
    valid span gets "empty", as there."""
    logits_Nx2xL = self._eval_logits(logits_list)
    feats = self._eval
    best: dict[int, tuple] = {}  # example -> (score, text)
    count: dict[int, int] = {}
    for i in range(len(logits_Nx2xL)):
      e = int(feats["example"][i])
      offs = feats["offsets"][i]
      start_L, end_L = logits_Nx2xL[i, 0], logits_Nx2xL[i, 1]
      starts = np.argsort(start_L)[-1 : -n_best - 1 : -1]
      ends = np.argsort(end_L)[-1 : -n_best - 1 : -1]
      s_, e_ = starts[:, None], ends[None, :]
      ok = (offs[s_, 0] >= 0) & (offs[e_, 0] >= 0) & (e_ >= s_) & (e_ - s_ + 1 <= max_answer_length)
      count[e] = count.get(e, 0) + int(ok.sum())
      if not ok.any():
        continue
      score_NxN = np.where(ok, start_L[s_] + end_L[e_], -np.inf)
      j = int(np.argmax(score_NxN))  # first maximum, start-major as utils_qa's loops
      si, ei = starts[j // len(ends)], ends[j % len(ends)]
      if e not in best or score_NxN.flat[j] > best[e][0]:
        context = self.eval_examples[e]["context"]
        best[e] = (score_NxN.flat[j], context[offs[si, 0] : offs[ei, 1]])
    out = {}
    for e, ex in enumerate(self.eval_examples):
      text = best[e][1] if e in best else ""
      out[ex["id"]] = "empty" if e not in best or (count[e] == 1 and not text) else text
    return out

  def score(self, logits_list, n_best: int = 20, max_answer_length: int = 30) -> dict:
    """{"exact_match", "f1", "unanswered"} (percent, as the official v1.1 script) of the
    postprocessed predictions against every gold answer of the eval split."""
    predictions = self.postprocess(logits_list, n_best, max_answer_length)
    return scores.squad_scores(predictions, self.references)
