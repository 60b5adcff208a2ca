"""Built-in data sources with a known optimum (pure NumPy; the train loop converts to jax).

- `MarkovSource`: an order-k Markov chain over printable characters; its entropy rate and the
  best achievable loss are exact, so runs report *excess loss*.
- `ClassifySource`: a GLUE-like classification task with an exact Bayes accuracy.
- `mlm_mask` / `mlm_batch`: BERT masking.

Every batch is a pure function of (seed, split, step, row): row r of the global batch draws its
uniforms from its own slice of a counter-based Philox stream, so a resumed run sees the same
batches and the process slices concatenate to the same global batch for any process count.
"""

import time

import numpy as np

from experiments.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
# 64 printable symbols, so decoded samples are readable.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
# Class-marker characters for ClassifySource; disjoint from ALPHABET.
CLASS_CHARS = "+!-?*#/%&@^~=<>$"
_SPLITS = {"train": 0, "eval": 1}
_STREAMS = {"markov": 0, "classify": 1, "mlm": 2}


def row_uniforms(
  seed: int, stream: str, split: str, step: int, row_start: int, rows: int, width: int
) -> np.ndarray:
  """Uniforms in [0, 1), shape [rows, width], for global rows [row_start, row_start + rows).

  One Philox stream per (seed, stream, split, step); global row r owns draws
  [r * width, (r + 1) * width). Philox is counter-based, so jumping to row_start is free.
  """
  assert width % 4 == 0, "Philox.advance counts blocks of four 64-bit draws"
  entropy = [seed, _STREAMS[stream], _SPLITS[split], step]
  bitgen = np.random.Philox(key=np.random.SeedSequence(entropy).generate_state(2, np.uint64))
  bitgen.advance(row_start * width // 4)
  return np.random.Generator(bitgen).random((rows, width))


def _round4(n):
  return -(-n // 4) * 4


def _process_rows(batch_size, process_index, process_count):
  """(first global row, number of rows) of this process's slice of the global batch."""
  assert batch_size % process_count == 0, (batch_size, process_count)
  assert 0 <= process_index < process_count
  rows = batch_size // process_count
  return process_index * rows, rows


def _entropy(p, axis=None):
  """Entropy in nats with 0 log 0 = 0."""
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


class MarkovSource:
  """Order-k Markov chain over `n_symbols` printable characters with an exact entropy rate.

  Next-symbol logits for context c = (x_{t-k}, ..., x_{t-1}) are
      beta_c * (sqrt(w) * shared[x_{t-1}] + sqrt(1 - w) * private[c]),
  with standard-normal `shared` / `private` tables, w = `low_order_weight`, and a per-context
  inverse temperature beta_c drawn log-uniformly from `inv_temp`. The shared part is learnable
  from the last symbol alone (a bigram curriculum); the private part (n^k x n entries) must be
  memorised; beta_c mixes near-deterministic and near-uniform contexts. Optionally each
  context allows only `support` next symbols (some contexts may then be unreachable; the
  power iteration still returns a stationary distribution, and sampling starts from it).
  """

  def __init__(
    self, *, n_symbols=64, order=2, seed=0, inv_temp=(0.5, 8.0), low_order_weight=0.5, support=None
  ):
    assert 2 <= n_symbols <= len(ALPHABET) and order >= 1
    assert 0.0 <= low_order_weight <= 1.0
    self.n_symbols, self.order, self.seed = n_symbols, order, seed
    n, self.n_contexts = n_symbols, n_symbols**order
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n, n))
    private = rng.standard_normal((self.n_contexts, n))
    last = np.arange(self.n_contexts) % n  # the most recent symbol of each context
    logits = np.sqrt(low_order_weight) * shared[last] + np.sqrt(1 - low_order_weight) * private
    lo, hi = inv_temp
    logits *= np.exp(rng.uniform(np.log(lo), np.log(hi), self.n_contexts))[:, None]
    if support is not None:  # drawn last, so toggling it leaves the other draws unchanged
      rank = np.argsort(np.argsort(rng.random((self.n_contexts, n)), axis=1), axis=1)
      logits = np.where(rank < support, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    self.probs = probs / probs.sum(axis=1, keepdims=True)  # [n_contexts, n]
    with np.errstate(divide="ignore"):
      self.log_probs = np.log(self.probs)
    self.cdf = np.cumsum(self.probs, axis=1)
    self.cdf[:, -1] = 1.0  # so inverse-CDF sampling never runs past the last symbol
    self.stationary = self._stationary()
    self.stationary_cdf = np.cumsum(self.stationary)
    self.stationary_cdf[-1] = 1.0
    self.entropy_rate = float(self.stationary @ _entropy(self.probs, axis=1))
    self.symbol_ids = np.array([TOKENIZER.byte_id(ch) for ch in ALPHABET[:n]])
    self.id_to_symbol = np.full(TOKENIZER.vocab_size, -1)
    self.id_to_symbol[self.symbol_ids] = np.arange(n)

  def _next_context_mass(self, pi):
    """One step of the chain on contexts: (a, rest) -> (rest, x) with prob P[(a, rest), x]."""
    n = self.n_symbols
    return (pi[:, None] * self.probs).reshape(n, -1, n).sum(axis=0).ravel()

  def _stationary(self, tol=1e-15, max_iter=100_000):
    """Stationary distribution over contexts, by power iteration to float64 convergence."""
    pi = np.full(self.n_contexts, 1.0 / self.n_contexts)
    for _ in range(max_iter):
      new = self._next_context_mass(pi)
      new /= new.sum()
      if np.abs(new - pi).sum() < tol:
        return new
      pi = new
    raise RuntimeError("power iteration did not converge; is the chain irreducible?")

  # ---- exact quantities -------------------------------------------------------------------

  def block_marginal(self, m):
    """Stationary probability of m consecutive symbols, flattened (first symbol major)."""
    n, k = self.n_symbols, self.order
    assert 0 <= m <= k + 1
    if m <= k:
      return self.stationary.reshape(n**m, -1).sum(axis=1)
    return (self.stationary[:, None] * self.probs).ravel()

  def conditional_entropy(self, j):
    """H(X_t | previous j symbols) under stationarity, nats: the exact expected loss of the
    best order-j predictor (j=0: unigram, j=1: bigram, j>=order: the entropy rate)."""
    if j >= self.order:
      return self.entropy_rate
    return float(_entropy(self.block_marginal(j + 1)) - _entropy(self.block_marginal(j)))

  @property
  def unigram_loss(self):
    return self.conditional_entropy(0)

  @property
  def bigram_loss(self):
    return self.conditional_entropy(1)

  def optimal_loss(self, seq_len):
    """Exact expected per-token loss of the Bayes-optimal predictor on targets x_1..x_L of
    a stationary sequence x_0..x_L (early positions see fewer than `order` symbols)."""
    return float(np.mean([self.conditional_entropy(t) for t in range(1, seq_len + 1)]))

  def logprob(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """Exact log P(x_t | x_<t) of tokenizer ids [B, T] under the source, float64 [B, T].
    Position 0 is log pi(x_0); positions t < order use the stationary marginals."""
    syms_BxT = self.id_to_symbol[np.asarray(tokens_BxT)]
    assert (syms_BxT >= 0).all(), "tokens outside the source alphabet"
    n, k, T = self.n_symbols, self.order, syms_BxT.shape[1]
    out_BxT = np.empty(syms_BxT.shape)
    prev_B, index_B = 0.0, 0
    for t in range(min(k, T)):  # log P(x_0..x_t) - log P(x_0..x_{t-1})
      index_B = index_B * n + syms_BxT[:, t]
      cur_B = np.log(self.block_marginal(t + 1)[index_B])
      out_BxT[:, t], prev_B = cur_B - prev_B, cur_B
    if T > k:
      ctx = sum(syms_BxT[:, i : T - k + i] * n ** (k - 1 - i) for i in range(k))
      out_BxT[:, k:] = self.log_probs[ctx, syms_BxT[:, k:]]
    return out_BxT

  # ---- sampling ----------------------------------------------------------------------------

  def sample(self, u_BxT: np.ndarray) -> np.ndarray:
    """Tokenizer ids [B, T] from uniforms [B, T]: column 0 draws the first `order` symbols
    jointly from the stationary distribution, column t >= order draws x_t by inverse CDF.
    Columns 1..order-1 are unused, so each row is a pure function of its own uniforms."""
    B, T = u_BxT.shape
    n, k = self.n_symbols, self.order
    assert T >= k
    syms_BxT = np.empty((B, T), np.int64)
    ctx_B = np.minimum(
      np.searchsorted(self.stationary_cdf, u_BxT[:, 0], side="right"), self.n_contexts - 1
    )
    for i in range(k):
      syms_BxT[:, i] = ctx_B // n ** (k - 1 - i) % n
    # Sequential in t, vectorised over the batch. The number of cumulative probabilities
    # <= u is the sampled symbol (the last is exactly 1.0, so it is always < n).
    for t in range(k, T):
      x_B = (self.cdf[ctx_B] <= u_BxT[:, t, None]).sum(axis=1)
      syms_BxT[:, t] = x_B
      ctx_B = (ctx_B * n + x_B) % self.n_contexts
    return self.symbol_ids[syms_BxT]

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
    """This process's rows of the global LM batch at `step`: int32 inputs/targets
    [b, seq_len] (targets = inputs shifted by one) and float32 weights (all ones),
    b = batch_size // process_count."""
    start, rows = _process_rows(batch_size, process_index, process_count)
    u = row_uniforms(self.seed, "markov", split, step, start, rows, _round4(seq_len + 1))
    ids = self.sample(u[:, : seq_len + 1]).astype(np.int32)
    return {
      "inputs": np.ascontiguousarray(ids[:, :-1]),
      "targets": np.ascontiguousarray(ids[:, 1:]),
      "weights": np.ones((rows, seq_len), np.float32),
    }


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


def _tokens_per_second(fn, tokens, min_time=1.0):
  fn(0)  # warm-up
  t0, step = time.perf_counter(), 1
  while time.perf_counter() - t0 < min_time:
    fn(step)
    step += 1
  return tokens * (step - 1) / (time.perf_counter() - t0)


if __name__ == "__main__":
  t0 = time.perf_counter()
  src = MarkovSource()
  print(
    f"MarkovSource(n_symbols={src.n_symbols}, order={src.order}): "
    f"{src.n_contexts} x {src.n_symbols} table, built in {time.perf_counter() - t0:.2f}s"
  )
  for b, L in [(64, 128), (256, 128), (64, 256), (256, 256)]:
    tps = _tokens_per_second(lambda s: src.batch(s, b, L), b * L)
    print(f"  batch {b:3d} x seq {L:3d}: {tps / 1e6:5.2f}M tokens/s")
  print(f"uniform loss   ln({src.n_symbols}) = {np.log(src.n_symbols):.4f} nats/token")
  print(f"unigram loss   {src.unigram_loss:.4f}")
  print(f"bigram loss    {src.bigram_loss:.4f}")
  print(f"entropy rate   {src.entropy_rate:.4f}")
  print(f"optimal_loss(128) = {src.optimal_loss(128):.4f}")
  print("sample:", repr(TOKENIZER.decode(src.batch(0, 1, 100)["inputs"][0])))

  cls_src = ClassifySource(src)
  cb = cls_src.batch(0, 256, 128)
  tps = _tokens_per_second(lambda s: cls_src.batch(s, 256, 128), 256 * 128)
  print(
    f"ClassifySource: bayes_accuracy {cls_src.bayes_accuracy:.2f}, "
    f"batch 256 x 128: {tps / 1e6:.2f}M tokens/s, label balance {cb['label'].mean():.2f}"
  )
  for row in range(2):
    print(f"  label {cb['label'][row]}:", repr(TOKENIZER.decode(cb["inputs"][row])))
