"""Tests for the built-in data sources: exact quantities against Monte Carlo, determinism."""

import numpy as np
import pytest

from experiments.data.markov import ALPHABET, MarkovSource, _entropy
from experiments.data.encoder import CLASS_CHARS, ClassifySource, mlm_batch, mlm_mask
from experiments.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MLM_KW = dict(mask_id=TOK.mask_id, vocab_size=TOK.vocab_size, n_special=TOK.n_special)


@pytest.fixture(scope="module")
def src():
  return MarkovSource()


def _mean_and_se(row_values):
  """Mean over independent rows and its standard error."""
  return row_values.mean(), row_values.std(ddof=1) / np.sqrt(len(row_values))


# ---- tokenizer -------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip():
  text = "héllo wörld — 日本語 🙂 \n\t"
  ids = TOK.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == TOK.bos_id == TOK.cls_id and ids[-1] == TOK.eos_id == TOK.sep_id
  assert all(TOK.n_special <= i < TOK.vocab_size for i in ids[1:-1])
  assert TOK.decode(ids) == text
  assert TOK.decode([TOK.pad_id, TOK.mask_id] + TOK.encode("a")) == "a"
  assert TOK.decode([0xFF + 4]) == "\ufffd"  # invalid UTF-8 is replaced, not raised
  assert TOK.vocab_size == 260 and TOK.byte_id("a") == ord("a") + 4


# ---- MarkovSource: exact quantities ---------------------------------------------------------


def test_stationary_is_a_fixed_point(src):
  assert src.stationary.min() >= 0 and abs(src.stationary.sum() - 1) < 1e-12
  np.testing.assert_allclose(
    src._next_context_mass(src.stationary), src.stationary, rtol=0, atol=1e-15
  )
  # block marginals are consistent: summing out the last symbol of m+1 gives m
  for m in range(src.order + 1):
    np.testing.assert_allclose(
      src.block_marginal(m + 1).reshape(-1, src.n_symbols).sum(1), src.block_marginal(m), atol=1e-15
    )


@pytest.mark.parametrize(
  "kwargs,rows,cols",
  [
    ({}, 1024, 2000),  # ~2M tokens
    (dict(n_symbols=8, seed=3), 256, 800),
    (dict(n_symbols=16, order=1, seed=3), 256, 800),
  ],
)
def test_entropy_rate_matches_monte_carlo(kwargs, rows, cols):
  s = MarkovSource(**kwargs)
  tokens = s.batch(0, rows, cols)["inputs"]  # independent rows, each started at stationarity
  nll = -s.logprob(tokens)[:, s.order :]
  mc, se = _mean_and_se(nll.mean(axis=1))
  assert abs(mc - s.entropy_rate) < 4 * se, (mc, se, s.entropy_rate)
  # The test has teeth: weighting contexts uniformly (what solving P pi = pi instead of
  # pi P = pi gives) is far enough off that the check above would reject it.
  uniform_weighted = _entropy(s.probs, axis=1).mean()
  assert abs(uniform_weighted - s.entropy_rate) > 8 * se, (uniform_weighted, se)


def test_baselines_are_ordered(src):
  h = [src.conditional_entropy(j) for j in range(src.order + 1)]
  assert np.log(src.n_symbols) > h[0] > h[1] > h[2] == src.entropy_rate
  assert src.unigram_loss == h[0] and src.bigram_loss == h[1]


@pytest.mark.parametrize("n_symbols,order,seq_len", [(64, 2, 4), (16, 3, 3), (16, 1, 2)])
def test_optimal_loss_matches_monte_carlo(n_symbols, order, seq_len):
  s = MarkovSource(n_symbols=n_symbols, order=order, seed=1)
  b = s.batch(3, 20_000, seq_len)
  seq = np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)  # x_0 .. x_L
  mc, se = _mean_and_se(-s.logprob(seq)[:, 1:].mean(axis=1))
  exact = s.optimal_loss(seq_len)
  assert abs(mc - exact) < 4 * se, (mc, se, exact)
  if order > 1:  # the early positions matter: the entropy rate alone would be rejected
    assert abs(s.entropy_rate - exact) > 8 * se
  expected = (
    sum(s.conditional_entropy(t) for t in range(1, order)) + (seq_len - order + 1) * s.entropy_rate
  ) / seq_len
  assert abs(exact - expected) < 1e-12


def test_empirical_stationary_distribution():
  s = MarkovSource(n_symbols=16, order=2, seed=2)
  # The context after 10 transitions, one per independent row: exactly multinomial(pi) iff
  # pi is stationary (a wrong pi would drift towards the true one).
  syms = s.id_to_symbol[s.batch(0, 100_000, 11)["inputs"]]
  ctx = syms[:, -2] * s.n_symbols + syms[:, -1]
  counts = np.bincount(ctx, minlength=s.n_contexts)
  n, p, c = len(ctx), s.stationary, s.n_contexts
  chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
  # exact mean and variance of Pearson's statistic under a multinomial
  mean, var = c - 1, 2 * (c - 1) + ((1 / p).sum() - c**2 - 2 * c + 2) / n
  assert abs(chi2 - mean) < 5 * np.sqrt(var), (chi2, mean, var)
  # and the wrong answer is rejected
  uniform = np.full(c, 1 / c)
  assert ((counts - n * uniform) ** 2 / (n * uniform)).sum() > mean + 50 * np.sqrt(var)


def test_power_iteration_on_a_periodic_chain_raises():
  s = MarkovSource(n_symbols=4, order=1)
  # period 2 ({0, 1, 3} <-> {2}) and not doubly stochastic, so power iteration oscillates
  s.probs = np.array([[0, 0, 1, 0], [0, 0, 1, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0]])
  with pytest.raises(RuntimeError):
    s._stationary(max_iter=1000)


# ---- MarkovSource: batches ------------------------------------------------------------------


def test_markov_batch_format(src):
  b = src.batch(5, 8, 32)
  assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (8, 32)
  assert b["inputs"].dtype == b["targets"].dtype == np.int32
  assert b["weights"].dtype == np.float32 and (b["weights"] == 1).all()
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert (b["inputs"] < TOK.vocab_size).all()
  text = TOK.decode(b["inputs"].ravel())
  assert set(text) <= set(ALPHABET) and text.isprintable()
  assert len(set(text)) > 40  # the whole alphabet is used


def test_markov_determinism_and_slicing(src):
  a = src.batch(7, 16, 24)
  for key in a:
    np.testing.assert_array_equal(a[key], src.batch(7, 16, 24)[key])
  assert (a["inputs"] != src.batch(8, 16, 24)["inputs"]).mean() > 0.5
  assert (a["inputs"] != src.batch(7, 16, 24, split="eval")["inputs"]).mean() > 0.5
  assert (a["inputs"] != MarkovSource(seed=1).batch(7, 16, 24)["inputs"]).mean() > 0.5
  parts = [src.batch(7, 16, 24, process_index=i, process_count=4) for i in range(4)]
  for key in a:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])


# ---- ClassifySource -------------------------------------------------------------------------


def _marker_counts(source, inputs):
  """Per-row count of each class's marker tokens, recounted from the inputs: [b, C]."""
  return np.stack([np.isin(inputs, t).sum(axis=1) for t in source.class_tokens], axis=1)


@pytest.mark.parametrize("num_classes,noise", [(2, 0.1), (3, 0.2)])
def test_classify_bayes_accuracy(src, num_classes, noise):
  cs = ClassifySource(src, num_classes=num_classes, label_noise=noise)
  b = cs.batch(0, 20_000, 48)
  counts = _marker_counts(cs, b["inputs"])
  n = counts.sum(axis=1)
  assert (n % 2 == 1).all() and n.max() <= cs.max_sentiment
  top2 = np.sort(counts, axis=1)[:, -2:]
  assert (top2[:, 1] > top2[:, 0]).all()  # no ties
  assert (2 * top2[:, 1] > n).all()  # in fact a strict majority
  correct = (counts.argmax(axis=1) == b["label"]).astype(float)
  acc, se = _mean_and_se(correct)
  assert abs(acc - cs.bayes_accuracy) < 4 * se, (acc, se)
  balance = np.bincount(b["label"], minlength=num_classes) / len(correct)
  np.testing.assert_allclose(balance, 1 / num_classes, atol=0.02)


def test_classify_batch_format(src):
  cs = ClassifySource(src, min_len=10)
  b = cs.batch(1, 64, 40)
  x, m = b["inputs"], b["attention_mask"]
  assert x.shape == m.shape == b["token_type_ids"].shape == (64, 40) and b["label"].shape == (64,)
  assert all(v.dtype == np.int32 for v in b.values())
  assert (x[:, 0] == TOK.cls_id).all() and (m[:, 0] == 1).all()
  assert (np.diff(m, axis=1) <= 0).all()  # real tokens first, then padding
  assert ((x == TOK.pad_id) == (m == 0)).all()
  assert 1 + 10 <= m.sum(axis=1).min() and m.sum(axis=1).max() <= 40
  assert (b["token_type_ids"] == 0).all() and set(np.unique(b["label"])) <= {0, 1}
  body = TOK.decode(x[:, 1:].ravel())
  assert set(body) <= set(ALPHABET + CLASS_CHARS[:4])
  assert not set(ALPHABET) & set(CLASS_CHARS)


def test_classify_determinism_and_slicing(src):
  cs = ClassifySource(src)
  a = cs.batch(3, 12, 32)
  parts = [cs.batch(3, 12, 32, process_index=i, process_count=4) for i in range(4)]
  for key in a:
    np.testing.assert_array_equal(a[key], cs.batch(3, 12, 32)[key])
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])
  assert (a["inputs"] != cs.batch(4, 12, 32)["inputs"]).mean() > 0.3
  assert (a["inputs"] != cs.batch(3, 12, 32, split="eval")["inputs"]).mean() > 0.3


# ---- MLM masking ----------------------------------------------------------------------------


def test_mlm_mask_statistics(src):
  b = ClassifySource(src).batch(0, 2000, 64)
  x, m = b["inputs"], b["attention_mask"]
  out = mlm_mask(x, m, 0, **MLM_KW)
  np.testing.assert_array_equal(out["targets"], x)
  sel = out["weights"] > 0
  eligible = (m == 1) & (x >= TOK.n_special)
  assert not (sel & ~eligible).any()  # never CLS or padding
  np.testing.assert_array_equal(out["inputs"][~sel], x[~sel])

  def check(k, n, p):  # binomial count within 4 standard errors
    assert abs(k / n - p) < 4 * np.sqrt(p * (1 - p) / n), (k / n, p)

  check(sel.sum(), eligible.sum(), 0.15)
  new, old = out["inputs"][sel], x[sel]
  regular = TOK.vocab_size - TOK.n_special
  check((new == TOK.mask_id).sum(), sel.sum(), 0.8)
  check((new == old).sum(), sel.sum(), 0.1 + 0.1 / regular)  # a random id may equal the old
  rand = new[(new != TOK.mask_id) & (new != old)]
  assert (rand >= TOK.n_special).all() and (rand < TOK.vocab_size).all()
  # deterministic given the seed
  for key, v in mlm_mask(x, m, 0, **MLM_KW).items():
    np.testing.assert_array_equal(v, out[key])
  assert (mlm_mask(x, m, 1, **MLM_KW)["weights"] != out["weights"]).any()


def test_mlm_batch_determinism_and_slicing(src):
  a = mlm_batch(src, 2, 8, 32, **MLM_KW)
  assert set(a) == {"inputs", "targets", "weights", "attention_mask", "token_type_ids"}
  np.testing.assert_array_equal(a["targets"], src.batch(2, 8, 32)["inputs"])
  assert a["weights"].sum() > 0 and (a["attention_mask"] == 1).all()
  parts = [mlm_batch(src, 2, 8, 32, process_index=i, process_count=2, **MLM_KW) for i in range(2)]
  for key in a:
    np.testing.assert_array_equal(a[key], mlm_batch(src, 2, 8, 32, **MLM_KW)[key])
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])
  assert (a["weights"] != mlm_batch(src, 3, 8, 32, **MLM_KW)["weights"]).any()
