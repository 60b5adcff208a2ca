"""The encoder's data, built on the synthetic language (pure NumPy).

- `ClassifySource`: a GLUE-like classification task with an exact Bayes accuracy.
- `SpanSource`: extractive QA (SQuAD-like): the answer is a span of the context that the
  question's key opens; exact answers, so a perfect model scores 100 EM.
- `TagSource`: token classification (NER-like, IOB2 tags): entities of several types, each a
  stretch of the language between a type's opening character and a shared closing one.
- `mlm_mask` / `mlm_batch`: BERT masking.

Same guarantees as experiments/data/markov.py: every batch is a pure function of
(seed, split, step, row), so process slices concatenate to the global batch.
"""

import numpy as np

from experiments.data.markov import (
  ALPHABET,
  TOKENIZER,
  MarkovSource,
  _process_rows,
  _round4,
  row_uniforms,
)

# Class-marker characters for ClassifySource; disjoint from ALPHABET.
CLASS_CHARS = "+!-?*#/%&@^~=<>$"
assert not set(CLASS_CHARS) & set(ALPHABET)
# SpanSource's question keys and TagSource's entity openers (one per type); the closer ends a
# span or an entity. Disjoint from ALPHABET, and the closer from the others.
KEY_CHARS, CLOSER = "+!-?*#/%&@^~<>$", "="


class ClassifySource:
  """GLUE-like sequence classification with an exact Bayes accuracy.

  Example: [CLS] + a Markov background of random length in [min_len, max_len] (max_len
  defaults to seq_len - 1), with an odd number n <= max_sentiment of class-marker tokens
  inserted at random positions, then padding. Class c has its own `tokens_per_class` marker
  characters (disjoint from the Markov alphabet). The clean label y holds a strict majority of
  the n markers (the minority count is uniform in [0, (n-1)/2], spread over the other classes),
  so it is a deterministic function of the input with no ties. The returned label is flipped
  to a uniformly random other class with probability `label_noise`; hence the Bayes accuracy
  is exactly 1 - label_noise (as long as label_noise < (C-1)/C).
  """

  def __init__(
    self,
    source: MarkovSource | None = None,
    *,
    num_classes=2,
    label_noise=0.1,
    min_len=8,
    max_len=None,
    max_sentiment=7,
    tokens_per_class=2,
    seed=None,
  ):
    assert num_classes >= 2 and num_classes * tokens_per_class <= len(CLASS_CHARS)
    assert 0.0 <= label_noise < (num_classes - 1) / num_classes
    assert max_sentiment >= 1 and max_sentiment % 2 == 1 and min_len >= max_sentiment
    self.source = source if source is not None else MarkovSource(seed=seed or 0)
    self.seed = self.source.seed if seed is None else seed
    self.num_classes, self.label_noise = num_classes, label_noise
    self.min_len, self.max_len, self.max_sentiment = min_len, max_len, max_sentiment
    chars = CLASS_CHARS[: num_classes * tokens_per_class]
    # class_tokens[c] = the marker ids of class c
    self.class_tokens = np.array([TOKENIZER.byte_id(ch) for ch in chars]).reshape(
      num_classes, tokens_per_class
    )

  @property
  def bayes_accuracy(self):
    return 1.0 - self.label_noise

  def batch(
    self,
    step: int,
    batch_size: int,
    seq_len: int,
    *,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict:
    """This process's rows of the global batch: int32 inputs, attention_mask and
    token_type_ids [b, seq_len], int32 label [b]."""
    max_len = self.max_len or seq_len - 1
    assert self.min_len <= max_len <= seq_len - 1
    C, S, L = self.num_classes, self.max_sentiment, seq_len - 1  # L: positions after [CLS]
    start, B = _process_rows(batch_size, process_index, process_count)
    u = row_uniforms(self.seed, "classify", split, step, start, B, _round4(6 + 2 * S + 2 * L))
    u_len_B, u_n_B, u_minor_B, u_label_B, u_flip_B, u_noisy_B = u[:, :6].T
    u_other_BxS, u_tok_BxS, u_pos_BxL, u_bg_BxL, _ = np.split(
      u[:, 6:], np.cumsum([S, S, L, L]), axis=1
    )

    def draw(u, count):  # uniform integer in [0, count)
      return np.minimum((u * count).astype(np.int64), count - 1)

    length_B = self.min_len + draw(u_len_B, max_len - self.min_len + 1)
    n_B = 2 * draw(u_n_B, (S + 1) // 2) + 1
    majority_B = n_B - draw(u_minor_B, (n_B - 1) // 2 + 1)
    y_B = draw(u_label_B, C)
    # marker slot s < majority has class y, later slots a random other class
    slot_class_BxS = np.where(
      np.arange(S) < majority_B[:, None],
      y_B[:, None],
      (y_B[:, None] + 1 + draw(u_other_BxS, C - 1)) % C,
    )
    slot_token_BxS = self.class_tokens[slot_class_BxS, draw(u_tok_BxS, self.class_tokens.shape[1])]

    # The n markers go at the n smallest random keys among the first `length` positions; a
    # marker's rank among them picks its slot, so the classes land in random order.
    pos_L = np.arange(L)
    real_BxL = pos_L < length_B[:, None]
    rank_BxL = np.argsort(np.argsort(np.where(real_BxL, u_pos_BxL, 2.0), axis=1), axis=1)
    is_marker_BxL = rank_BxL < n_B[:, None]
    marker_BxL = np.take_along_axis(slot_token_BxS, np.minimum(rank_BxL, S - 1), axis=1)
    # The background stays one contiguous Markov sequence around the inserted markers:
    # position j takes background symbol j - (#markers at or before j).
    background_BxL = self.source.sample(u_bg_BxL)
    bg_index_BxL = np.maximum(pos_L - np.cumsum(is_marker_BxL, axis=1), 0)
    content_BxL = np.where(
      is_marker_BxL, marker_BxL, np.take_along_axis(background_BxL, bg_index_BxL, axis=1)
    )
    content_BxL = np.where(real_BxL, content_BxL, TOKENIZER.pad_id)

    flip_B = u_flip_B < self.label_noise
    label_B = np.where(flip_B, (y_B + 1 + draw(u_noisy_B, C - 1)) % C, y_B)
    ones_Bx1 = np.ones((B, 1), np.int32)
    inputs_BxL = np.concatenate([TOKENIZER.cls_id * ones_Bx1, content_BxL], axis=1)
    return {
      "inputs": inputs_BxL.astype(np.int32),
      "attention_mask": np.concatenate([ones_Bx1, real_BxL], axis=1).astype(np.int32),
      "token_type_ids": np.zeros((B, seq_len), np.int32),
      "label": label_B.astype(np.int32),
    }


def _draw(u, count):
  """Uniform integers in [0, count) from uniforms u in [0, 1)."""
  return np.minimum((u * count).astype(np.int64), np.asarray(count) - 1)


def _place(u_gaps, lengths, room: int) -> np.ndarray:
  """Start offsets of segments of `lengths`, in order, with the `room - sum(lengths)` free
  positions split at random into the len(lengths) + 1 gaps around them (uniforms u_gaps, one
  per segment)."""
  free = room - int(np.sum(lengths))
  cuts = np.sort(_draw(u_gaps, free + 1))  # gap before segment k ends at cuts[k]
  return cuts + np.concatenate([[0], np.cumsum(lengths)[:-1]])


class SpanSource:
  """Extractive QA with exact answers: [CLS] key [SEP] context [SEP].

  The context is a stretch of the Markov language holding `n_keys` segments at random places,
  each `key answer =`: a distinct key character (KEY_CHARS), 1 to `max_answer` symbols of the
  language, the closer. The question is one of the keys; the answer is its whole segment, from
  the key to the closer, as targets (start, end), token positions in the whole sequence, end
  inclusive. The answer is a function of the input, so the Bayes EM and F1 are 100; a model must
  find the question's key in the context (content attention) and the first closer after it.
  (With the start one past the key, the tiny encoder must first learn to attend to the previous
  position; with learned positions it had not in 1,000 steps.) Every row is full (no padding).
  """

  def __init__(self, source: MarkovSource, *, n_keys=4, max_answer=6, seed=None):
    assert 1 <= n_keys <= len(KEY_CHARS) and max_answer >= 1
    self.source, self.n_keys, self.max_answer = source, n_keys, max_answer
    self.seed = source.seed if seed is None else seed
    self.key_ids = np.array([TOKENIZER.byte_id(ch) for ch in KEY_CHARS])
    self.closer_id = TOKENIZER.byte_id(CLOSER)

  def min_seq_len(self) -> int:
    return 4 + self.n_keys * (self.max_answer + 2)

  def batch(
    self,
    step: int,
    batch_size: int,
    seq_len: int,
    *,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict:
    """This process's rows: int32 inputs, attention_mask, token_type_ids [b, seq_len], int32
    targets [b, 2] (answer start, end) and float32 weights [b] (all 1)."""
    if seq_len < self.min_seq_len():
      raise ValueError(
        f"train.seq_len={seq_len} cannot hold {self.n_keys} answers of up to {self.max_answer} "
        f"symbols: give seq_len >= {self.min_seq_len()} or fewer data.span.n_keys / max_answer."
      )
    K, C = self.n_keys, seq_len - 4  # C: context positions
    start, B = _process_rows(batch_size, process_index, process_count)
    u = row_uniforms(self.seed, "span", split, step, start, B, _round4(C + 3 * K + 1))
    u_bg_BxC, u_key_BxK, u_len_BxK, u_gap_BxK, u_q_B = np.split(
      u[:, : C + 3 * K + 1], np.cumsum([C, K, K, K]), axis=1
    )
    context_BxC = self.source.sample(u_bg_BxC)
    # K distinct keys per row: the keys ranked by random numbers, the first K.
    keys_BxK = np.argsort(np.concatenate([u_key_BxK, np.ones((B, len(KEY_CHARS) - K))], 1), 1)
    keys_BxK = self.key_ids[keys_BxK[:, :K]]
    answer_BxK = 1 + _draw(u_len_BxK, self.max_answer)
    q_B = _draw(u_q_B[:, 0], K)
    targets_Bx2 = np.empty((B, 2), np.int64)
    for row in range(B):
      starts = _place(u_gap_BxK[row], answer_BxK[row] + 2, C)
      for k, (at, n) in enumerate(zip(starts, answer_BxK[row])):
        context_BxC[row, at] = keys_BxK[row, k]
        context_BxC[row, at + n + 1] = self.closer_id
        if k == q_B[row]:  # 3: [CLS] key [SEP] come before the context
          targets_Bx2[row] = 3 + at, 3 + at + n + 1
    col = lambda v: np.full((B, 1), v)  # noqa: E731
    inputs = np.concatenate(
      [col(TOKENIZER.cls_id), keys_BxK[np.arange(B), q_B][:, None], col(TOKENIZER.sep_id)]
      + [context_BxC, col(TOKENIZER.sep_id)],
      axis=1,
    )
    types = np.concatenate([np.zeros((B, 3)), np.ones((B, C + 1))], axis=1)
    return {
      "inputs": inputs.astype(np.int32),
      "attention_mask": np.ones((B, seq_len), np.int32),
      "token_type_ids": types.astype(np.int32),
      "targets": targets_Bx2.astype(np.int32),
      "weights": np.ones(B, np.float32),
    }


class TagSource:
  """Token classification with exact IOB2 tags: [CLS] text [SEP].

  The text is a stretch of the Markov language with 1 to `max_entities` entities at random
  places, each `opener symbols... closer`: type t's opening character (KEY_CHARS[t]), 1 to
  `max_len` symbols of the language tagged B-T{t} then I-T{t}, the shared closer. Every other
  position is "O". A symbol's tag depends on what came before it (an open entity, of which
  type, and whether it is the first symbol), not on the symbol: the model must read context.
  The tags are a function of the input, so the Bayes F1 is 1. Weights: 1 on the text, 0 on
  [CLS] and [SEP].
  """

  def __init__(self, source: MarkovSource, *, n_types=3, max_entities=4, max_len=4, seed=None):
    assert 1 <= n_types <= len(KEY_CHARS) and max_entities >= 1 and max_len >= 1
    self.source, self.n_types = source, n_types
    self.max_entities, self.max_len = max_entities, max_len
    self.seed = source.seed if seed is None else seed
    self.opener_ids = np.array([TOKENIZER.byte_id(ch) for ch in KEY_CHARS[:n_types]])
    self.closer_id = TOKENIZER.byte_id(CLOSER)
    self.label_names = ["O"] + [f"{p}-T{t}" for t in range(n_types) for p in "BI"]

  def min_seq_len(self) -> int:
    return 2 + self.max_entities * (self.max_len + 2)

  def batch(
    self,
    step: int,
    batch_size: int,
    seq_len: int,
    *,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict:
    """This process's rows: int32 inputs, attention_mask, token_type_ids, targets (tag ids,
    label_names' order) [b, seq_len] and float32 weights [b, seq_len]."""
    if seq_len < self.min_seq_len():
      raise ValueError(
        f"train.seq_len={seq_len} cannot hold {self.max_entities} entities of up to "
        f"{self.max_len} symbols: give seq_len >= {self.min_seq_len()} or fewer "
        "data.tags.max_entities / max_len."
      )
    E, C = self.max_entities, seq_len - 2
    start, B = _process_rows(batch_size, process_index, process_count)
    u = row_uniforms(self.seed, "tags", split, step, start, B, _round4(C + 3 * E + 1))
    u_bg_BxC, u_type_BxE, u_len_BxE, u_gap_BxE, u_n_B = np.split(
      u[:, : C + 3 * E + 1], np.cumsum([C, E, E, E]), axis=1
    )
    text_BxC = self.source.sample(u_bg_BxC)
    tags_BxC = np.zeros((B, C), np.int64)
    types_BxE = _draw(u_type_BxE, self.n_types)
    lengths_BxE = 1 + _draw(u_len_BxE, self.max_len)
    n_B = 1 + _draw(u_n_B[:, 0], E)
    for row in range(B):
      n = n_B[row]
      starts = _place(u_gap_BxE[row, :n], lengths_BxE[row, :n] + 2, C)
      for at, t, m in zip(starts, types_BxE[row, :n], lengths_BxE[row, :n]):
        text_BxC[row, at] = self.opener_ids[t]
        text_BxC[row, at + m + 1] = self.closer_id
        tags_BxC[row, at + 1] = 1 + 2 * t  # B-
        tags_BxC[row, at + 2 : at + m + 1] = 2 + 2 * t  # I-
    col = lambda v: np.full((B, 1), v)  # noqa: E731
    inputs = np.concatenate([col(TOKENIZER.cls_id), text_BxC, col(TOKENIZER.sep_id)], axis=1)
    zero = np.zeros((B, 1))
    return {
      "inputs": inputs.astype(np.int32),
      "attention_mask": np.ones((B, seq_len), np.int32),
      "token_type_ids": np.zeros((B, seq_len), np.int32),
      "targets": np.concatenate([zero, tags_BxC, zero], axis=1).astype(np.int32),
      "weights": np.concatenate([zero, np.ones((B, C)), zero], axis=1).astype(np.float32),
    }


def _mlm_from_uniforms(inputs, attention_mask, u, *, mask_id, vocab_size, n_special, mask_prob):
  """BERT masking driven by uniforms u [..., 3]: select, choose the corruption, random id."""
  selected = (attention_mask > 0) & (inputs >= n_special) & (u[..., 0] < mask_prob)
  random_id = n_special + np.minimum(
    (u[..., 2] * (vocab_size - n_special)).astype(np.int64), vocab_size - n_special - 1
  )
  corrupted = np.where(u[..., 1] < 0.8, mask_id, np.where(u[..., 1] < 0.9, random_id, inputs))
  return {
    "inputs": np.where(selected, corrupted, inputs).astype(np.int32),
    "targets": np.asarray(inputs, np.int32),
    "weights": selected.astype(np.float32),
  }


def mlm_mask(
  inputs, attention_mask, rng_or_seed, *, mask_id, vocab_size, n_special, mask_prob=0.15
):
  """BERT masking of real, non-special tokens: each is selected with prob `mask_prob`; a
  selected token becomes [MASK] (80%), a random regular id (10%) or stays (10%).
  Returns inputs, targets (original ids) and weights (1.0 at selected positions)."""
  inputs = np.asarray(inputs)
  u = np.random.default_rng(rng_or_seed).random(inputs.shape + (3,))
  return _mlm_from_uniforms(
    inputs,
    np.asarray(attention_mask),
    u,
    mask_id=mask_id,
    vocab_size=vocab_size,
    n_special=n_special,
    mask_prob=mask_prob,
  )


def mlm_batch(
  source,
  step: int,
  batch_size: int,
  seq_len: int,
  *,
  split: str = "train",
  mask_id: int,
  vocab_size: int,
  n_special: int,
  mask_prob: float = 0.15,
  process_index: int = 0,
  process_count: int = 1,
) -> dict:
  """MLM batch from any source here (MarkovSource or ClassifySource inputs) at `step`, with
  per-row masking streams so it keeps the determinism and slicing guarantees of `batch`.
  Returns inputs, targets, weights, attention_mask, token_type_ids."""
  batch = source.batch(
    step, batch_size, seq_len, split=split, process_index=process_index, process_count=process_count
  )
  inputs = batch["inputs"]
  mask = batch.get("attention_mask", np.ones_like(inputs))
  start, rows = _process_rows(batch_size, process_index, process_count)
  u = row_uniforms(source.seed, "mlm", split, step, start, rows, _round4(3 * seq_len))
  out = _mlm_from_uniforms(
    inputs,
    mask,
    u[:, : 3 * seq_len].reshape(rows, seq_len, 3),
    mask_id=mask_id,
    vocab_size=vocab_size,
    n_special=n_special,
    mask_prob=mask_prob,
  )
  return {
    **out,
    "attention_mask": mask.astype(np.int32),
    "token_type_ids": np.zeros_like(inputs, np.int32),
  }
