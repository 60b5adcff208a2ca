"""compress.oneshot.sparsegpt against plain float64 numpy transliterations of the reference codes
(SparseGPT's `fasterprune`, Wanda's `prune_wanda`), the counts and patterns they reach, jit
invariance, the papers' ordering of output errors (SparseGPT <= Wanda < magnitude) and the
input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.oneshot.sparsegpt import sparsegpt, wanda

N_IN, N_OUT = 24, 6
STATIC = ("sparsity", "prune_n", "prune_m", "block", "bits")


def count(sparsity, size):
  return int(np.floor(sparsity * size + 0.5))


def quant(w, scale, qmax):
  return scale * np.clip(np.round(w / scale), -qmax, qmax)


def reference_sparsegpt(
  w,
  h,
  sparsity=0.0,
  prune_n=0,
  prune_m=0,
  blocksize=128,
  percdamp=0.01,
  bits=None,
  scale=None,
  group_of=None,
):
  """`fasterprune` of the reference sparsegpt.py, line by line in its [out, in] layout, with the
  documented changes: the exact per-block count (cumulative rounding, stable ties, in place of
  `tmp <= sort(tmp)[int(numel * sparsity)]`) and the symmetric grid with fixed group scales."""
  W = np.array(w, np.float64).T.copy()  # [out, in], as the reference
  H = np.array(h, np.float64).copy()
  rows, columns = W.shape
  group_of = np.zeros(columns, int) if group_of is None else np.asarray(group_of)
  qmax = 2 ** (bits - 1) - 1 if bits else None

  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  damp = percdamp * np.mean(np.diag(H))
  H[np.arange(columns), np.arange(columns)] += damp
  H = np.linalg.cholesky(H)
  H = np.linalg.inv(H @ H.T)  # torch.cholesky_inverse
  Hinv = np.linalg.cholesky(H).T  # torch.linalg.cholesky(H, upper=True)

  mask = np.zeros_like(W, bool)  # True: pruned
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count_ = i2 - i1
    W1 = W[:, i1:i2].copy()
    Q1 = np.zeros_like(W1)
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    if prune_n == 0:
      tmp = W1**2 / (np.diag(Hinv1).reshape((1, -1))) ** 2
      k = count(sparsity, i2 * rows) - count(sparsity, i1 * rows)
      order = np.argsort(tmp.T.reshape(-1), kind="stable")[:k]  # ties: input, then output
      mask1 = np.zeros(tmp.T.size, bool)
      mask1[order] = True
      mask1 = mask1.reshape(tmp.T.shape).T
    else:
      mask1 = np.zeros_like(W1, bool)
    for i in range(count_):
      w_ = W1[:, i]
      d = Hinv1[i, i]
      if prune_n != 0 and i % prune_m == 0:
        tmp = (
          W1[:, i : (i + prune_m)] ** 2 / (np.diag(Hinv1)[i : (i + prune_m)].reshape((1, -1))) ** 2
        )
        idx = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]  # topk(largest=False)
        np.put_along_axis(mask1, i + idx, True, axis=1)
      q = w_.copy()
      q[mask1[:, i]] = 0
      if bits:
        q = quant(q, scale[group_of[i1 + i]], qmax)
      Q1[:, i] = q
      err1 = (w_ - q) / d
      W1[:, i:] -= err1[:, None] @ Hinv1[i, i:][None, :]
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    mask[:, i1:i2] = mask1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return W.T, ~mask.T


def reference_wanda(w, sq_norm, sparsity=0.0, prune_n=0, prune_m=0):
  """`prune_wanda` of the reference main.py's lib/prune.py, in its [out, in] layout; the count
  rounded (floor(s * in + 1/2), not int(in * s)) and the sort stable."""
  W_metric = np.abs(np.asarray(w, np.float64).T) * np.sqrt(np.asarray(sq_norm).reshape((1, -1)))
  W_mask = np.zeros_like(W_metric, bool)
  if prune_n != 0:
    for ii in range(W_metric.shape[1]):
      if ii % prune_m == 0:
        tmp = W_metric[:, ii : (ii + prune_m)]
        np.put_along_axis(
          W_mask, ii + np.argsort(tmp, axis=1, kind="stable")[:, :prune_n], True, axis=1
        )
  else:
    sort_idx = np.argsort(W_metric, axis=-1, kind="stable")
    indices = sort_idx[:, : count(sparsity, W_metric.shape[1])]
    np.put_along_axis(W_mask, indices, True, axis=1)
  return ~W_mask.T


def layer(seed, n_in=N_IN, n_out=N_OUT, tokens=128, outliers=2, dead=0):
  """(X [tokens, in] correlated, with `outliers` channels x20 and `dead` all-zero ones, W)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, n_in)) @ (np.eye(n_in) + rng.normal(size=(n_in, n_in)) / 2)
  x[:, rng.permutation(n_in)[:outliers]] *= 20
  x[:, rng.permutation(n_in)[:dead]] = 0
  return x, rng.normal(size=(n_in, n_out))


def absmax_scale(w, bits, group_of=None, n_groups=1):
  """[n_groups, out]: each group's max |w| over its inputs / qmax."""
  group_of = np.zeros(len(w), int) if group_of is None else group_of
  amax = np.stack([np.abs(w[group_of == g]).max(0) for g in range(n_groups)])
  return amax / (2 ** (bits - 1) - 1)


PATTERNS = {
  "50%": dict(sparsity=0.5),
  "2:4": dict(prune_n=2, prune_m=4),
  "4:8": dict(prune_n=4, prune_m=8),
}


REFERENCE_CASES = [  # (pattern, bits, block): each pattern with and without bits, both blocks
  ("50%", None, 8),
  ("50%", 4, 16),  # 16 does not divide 24: a partial last block
  ("2:4", None, 16),
  ("2:4", 4, 8),
  ("4:8", None, 8),
  ("4:8", 4, 16),
]


@pytest.mark.parametrize("pattern, bits, block", REFERENCE_CASES)
def test_sparsegpt_matches_float64_reference(pattern, bits, block):
  kw = PATTERNS[pattern]
  x, w = layer(seed=block + (bits or 0), dead=2)
  h = x.T @ x
  qkw = {}
  if bits:  # per-channel for 2:4, groups of 8 inputs otherwise
    group_of = None if pattern == "2:4" else np.arange(N_IN) // 8
    n_groups = 1 if group_of is None else 3
    qkw = dict(bits=bits, scale=absmax_scale(w, bits, group_of, n_groups), group_of=group_of)
  want_w, want_keep = reference_sparsegpt(w, h, blocksize=block, **kw, **qkw)
  if bits:
    qkw["scale_GxO"] = qkw.pop("scale")
    qkw["group_of_I"] = qkw.pop("group_of")
  with jax.enable_x64(True):
    got_w, got_keep = sparsegpt(w, h, block=block, **kw, **qkw)
    assert got_w.dtype == jnp.float64
    got_w, got_keep = np.asarray(got_w), np.asarray(got_keep)
  np.testing.assert_array_equal(got_keep, want_keep)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-12)
  assert np.all(got_w[np.diag(h) == 0] == 0)  # dead inputs
  assert not np.allclose(got_w, np.where(got_keep, w, 0))  # the updates do change the kept ones


def test_sparsegpt_matches_reference_without_dead_inputs_and_block_over_in():
  x, w = layer(seed=5, outliers=0)
  want_w, want_keep = reference_sparsegpt(w, x.T @ x, sparsity=0.3)
  with jax.enable_x64(True):
    got_w, got_keep = sparsegpt(w, x.T @ x, sparsity=0.3, block=128)
    got_w, got_keep = np.asarray(got_w), np.asarray(got_keep)
  np.testing.assert_array_equal(got_keep, want_keep)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("pattern", ["30%", "50%", "2:4", "1:4"])
def test_wanda_matches_reference(pattern):
  kw = {"30%": dict(sparsity=0.3), "50%": dict(sparsity=0.5)}.get(pattern)
  if kw is None:
    n, m = map(int, pattern.split(":"))
    kw = dict(prune_n=n, prune_m=m)
  x, w = layer(seed=7, outliers=4)
  sq_norm = (x**2).sum(0)
  np.testing.assert_array_equal(wanda(w, sq_norm, **kw), reference_wanda(w, sq_norm, **kw))


def test_wanda_ties_go_to_the_earlier_input():
  w = np.ones((8, 2), np.float32)
  keep = np.asarray(wanda(w, np.ones(8), sparsity=0.25))
  np.testing.assert_array_equal(keep[:, 0], [False, False] + [True] * 6)
  keep = np.asarray(wanda(w, np.ones(8), prune_n=1, prune_m=4))
  np.testing.assert_array_equal(keep[:, 1], [False, True, True, True] * 2)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
@pytest.mark.parametrize("block", [7, 24])
def test_exact_counts(sparsity, block):
  x, w = layer(seed=3, dead=1)
  w, h = w.astype(np.float32), (x.T @ x).astype(np.float32)
  w_hat, keep = sparsegpt(w, h, sparsity=sparsity, block=block)
  w_hat, keep = np.asarray(w_hat), np.asarray(keep)
  assert (~keep).sum() == count(sparsity, N_IN * N_OUT)
  assert np.all(w_hat[~keep] == 0)
  keep = np.asarray(wanda(w, (x**2).sum(0), sparsity=sparsity))
  np.testing.assert_array_equal((~keep).sum(0), count(sparsity, N_IN))


@pytest.mark.parametrize("n, m, bits", [(2, 4, None), (4, 8, 3), (1, 4, 3)])
def test_nm_patterns_and_grid(n, m, bits):
  x, w = layer(seed=n + m, dead=1)
  w, h = w.astype(np.float32), (x.T @ x).astype(np.float32)
  group_of = np.arange(N_IN) % 2  # strided groups
  scale = (absmax_scale(w, 3, group_of, 2) * 0.8).astype(np.float32)  # some clip
  qkw = dict(bits=bits, scale_GxO=scale, group_of_I=group_of) if bits else {}
  w_hat, keep = sparsegpt(w, h, prune_n=n, prune_m=m, block=8, **qkw)
  w_hat, keep = np.asarray(w_hat, np.float64), np.asarray(keep)
  for k in (keep, np.asarray(wanda(w, (x**2).sum(0), prune_n=n, prune_m=m))):
    assert np.all((~k).reshape(N_IN // m, m, N_OUT).sum(1) == n)  # every group, every output
  assert np.all(w_hat[~keep] == 0)
  if bits:
    q = w_hat / scale[group_of]
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)
    assert np.abs(np.round(q)).max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, block=6), dict(prune_n=2, prune_m=4, block=4)])
def test_jit_equals_no_jit(kw):
  x, w = layer(seed=11, n_in=8, n_out=4, dead=1)
  w, h = w.astype(np.float32), (x.T @ x).astype(np.float32)
  scale = absmax_scale(w, 4).astype(np.float32)
  jitted = jax.jit(sparsegpt, static_argnames=STATIC)(w, h, bits=4, scale_GxO=scale, **kw)
  with jax.disable_jit():
    eager = sparsegpt(w, h, bits=4, scale_GxO=scale, **kw)
  np.testing.assert_array_equal(jitted[1], eager[1])
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5, atol=1e-6)
  sq_norm = (x**2).sum(0)
  wkw = {k: v for k, v in kw.items() if k != "block"}
  np.testing.assert_array_equal(
    jax.jit(wanda, static_argnames=STATIC[:3])(w, sq_norm, **wkw), wanda(w, sq_norm, **wkw)
  )


def magnitude(w, sparsity=0.0, prune_n=0, prune_m=0):
  """Keep the largest |w| per output, same pattern: Wanda with all input norms equal."""
  return np.asarray(wanda(w, np.ones(len(w)), sparsity=sparsity, prune_n=prune_n, prune_m=prune_m))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(prune_n=2, prune_m=4)], ids=["50%", "2:4"])
def test_output_error_order(kw):
  """The papers' claim on a layer with correlated inputs and 4 outlier channels (x20):
  ||X W - X W_hat|| of SparseGPT <= Wanda < magnitude."""
  x, w = layer(seed=0, n_in=64, n_out=32, tokens=512, outliers=4)
  x, w = x.astype(np.float32), w.astype(np.float32)

  def out_error(w_hat):
    return np.linalg.norm(x.astype(np.float64) @ (w - np.asarray(w_hat, np.float64)))

  e_sparsegpt = out_error(sparsegpt(w, x.T @ x, **kw)[0])
  e_wanda = out_error(w * np.asarray(wanda(w, (x**2).sum(0), **kw)))
  e_magnitude = out_error(w * magnitude(w, **kw))
  assert e_sparsegpt <= e_wanda < e_magnitude, (e_sparsegpt, e_wanda, e_magnitude)


def _good():
  x, w = layer(seed=3)
  return w, x.T @ x, absmax_scale(w, 4, np.arange(N_IN) % 2, 2), np.arange(N_IN) % 2


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(sparsity=1.0), r"sparsity=1.0 is outside \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity=-0.1 is outside \[0, 1\)"),
    (dict(sparsity=0.5, prune_n=2, prune_m=4), "both sparsity=0.5 and prune_n:prune_m=2:4"),
    (dict(), "nothing to prune"),
    (dict(prune_n=2, prune_m=5), "prune_m=5 does not divide the kernel's 24 inputs"),
    (dict(prune_n=4, prune_m=4), r"prune_n=4 with prune_m=4.*\[1, 3\]"),
    (dict(prune_n=-1, prune_m=4), r"prune_n=-1 with prune_m=4.*\[1, 3\]"),
    (dict(prune_n=0, prune_m=4), r"prune_n=0 with prune_m=4.*\[1, 3\]"),
    (dict(prune_n=2, prune_m=0), "prune_m=0 does not divide"),
    (dict(prune_n=2.0, prune_m=4), r"prune_n=2.0: give an integer"),
  ],
)
def test_bad_pattern(change, match, no_compile):
  w, h, _, _ = _good()
  with pytest.raises(ValueError, match=match):
    sparsegpt(w, h, **change)
  with pytest.raises(ValueError, match=match):
    wanda(w, np.diag(h), **change)


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(bits=1), "bits=1 is out of range"),
    (dict(bits=9), "bits=9 is out of range"),
    (dict(bits=None), "scale_GxO / group_of_I given without bits"),
    (dict(scale=None), "bits=4 needs the grid's scales"),
    (dict(scale=np.ones(N_OUT)), r"scale_GxO has shape \(6,\)"),
    (dict(scale=np.ones((2, N_OUT + 1))), r"scale_GxO has shape \(2, 7\)"),
    (dict(group_of=None), r"scale_GxO has shape \(2, 6\).*\(1, 6\)"),
    (dict(group_of=np.zeros(N_IN - 1, int)), r"group_of_I has shape \(23,\).*\(24,\)"),
    (dict(group_of=np.full(N_IN, 2)), r"ids in \[2, 2\].*\[0, 1\]"),
    (dict(group_of=np.zeros(N_IN)), "integer group ids"),
    (dict(scale=np.zeros((2, N_OUT))), r"scale_GxO\[0, 0\] = 0.0.*positive"),
  ],
)
def test_bad_quantization(change, match, no_compile):
  w, h, scale, group_of = _good()
  kw = dict(bits=4, scale=scale, group_of=group_of) | change
  with pytest.raises(ValueError, match=match):
    sparsegpt(w, h, sparsity=0.5, bits=kw["bits"], scale_GxO=kw["scale"], group_of_I=kw["group_of"])


def test_bad_shapes_or_block(no_compile):
  w, h, _, _ = _good()
  with pytest.raises(ValueError, match=r"Hessian has shape \(23, 23\).*\(24, 24\)"):
    sparsegpt(w, h[1:, 1:], sparsity=0.5)
  with pytest.raises(ValueError, match="block=0"):
    sparsegpt(w, h, sparsity=0.5, block=0)
  with pytest.raises(ValueError, match="block=6 is not a multiple of prune_m=4"):
    sparsegpt(w, h, prune_n=2, prune_m=4, block=6)
  with pytest.raises(ValueError, match=r"sq_norm_I has shape \(23,\).*\(24,\)"):
    wanda(w, np.diag(h)[1:], sparsity=0.5)
  with pytest.raises(ValueError, match=r"must be \[in, out\]"):
    wanda(w[0], np.diag(h), sparsity=0.5)


def test_traced_sparsity():
  w, h, _, _ = _good()
  with pytest.raises(ValueError, match="sparsity is traced"):
    jax.jit(lambda s: sparsegpt(w, h, sparsity=s))(0.5)
