"""Built-in data sources with a known optimum (pure NumPy; the train loop converts to jax).

- `MarkovSource`: an order-k Markov chain over printable characters; its entropy rate and the
  best achievable loss are exact, so runs report *excess loss*.

The encoder's data built on it (classification, MLM masking) is in experiments/data/encoder.py.

Every batch is a pure function of (seed, split, step, row): row r of the global batch draws its
uniforms from its own slice of a counter-based Philox stream, so a resumed run sees the same
batches and the process slices concatenate to the same global batch for any process count.
"""

import numpy as np

from experiments.data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
# 64 printable symbols, so decoded samples are readable.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
_SPLITS = {"train": 0, "eval": 1}
_STREAMS = {"markov": 0, "classify": 1, "mlm": 2, "span": 3, "tags": 4}


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
    self.relabel(np.array([TOKENIZER.byte_id(ch) for ch in ALPHABET[:n]]))

  def relabel(self, symbol_ids) -> "MarkovSource":
    """Token ids `symbol_ids[i]` for symbol i, in batches and in `logprob`: the byte
    tokenizer's ids by default (readable samples), or `np.arange(n_symbols)` for a model
    whose vocabulary cannot hold the bytes' (experiments/tasks.py `markov_source`)."""
    self.symbol_ids = np.asarray(symbol_ids)
    assert self.symbol_ids.shape == (self.n_symbols,) and self.symbol_ids.min() >= 0
    self.id_to_symbol = np.full(max(TOKENIZER.vocab_size, self.symbol_ids.max() + 1), -1)
    self.id_to_symbol[self.symbol_ids] = np.arange(self.n_symbols)
    return self

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
