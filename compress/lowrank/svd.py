"""Low-rank factorization of kernels by truncated SVD, as pure functions over parameter pytrees.

A kernel w whose leading `n_in` axes contract with the input is the matrix [rows, cols] =
[prod(in_shape), prod(out_shape)]. Its rank-r truncated SVD with the singular values split as
square roots into both factors, u = U_r sqrt(S_r) [*in, r] and v = sqrt(S_r) V_r^T [r, *out], is
the best rank-r approximation (Eckart-Young): tensordot(u, v, 1) leaves the Frobenius error
sqrt(sum(s[r:]**2)). x @ w becomes (x @ u) @ v: r (rows + cols) parameters and 2 r (rows + cols)
FLOPs a token instead of rows cols and 2 rows cols. A stack of layers (scanned models: a leading
layer axis L on every leaf) is factorized layer by layer.

    choices = lowrank.plan(params, r"mlp/w./kernel$", energy=0.9, n_in=((r"attn/out/", 2),))
    params_f = lowrank.factorize_tree(params, choices)  # .../kernel -> kernel_u, kernel_v
    params = lowrank.merge_tree(params_f)               # kernel = tensordot(kernel_u, kernel_v)
    before, after = lowrank.count_params(choices)       # and lowrank.flops_per_token(choices)
"""

import math
import re
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from compress.tree import nested_items


class Choice(NamedTuple):
  """How one kernel is factorized. Shapes are per layer; counts are totals over a stack."""

  rank: int  # of the factors: max(ranks) (a stack's smaller ranks are zero-padded to it)
  rows: int  # prod(in_shape)
  cols: int  # prod(out_shape)
  energy_kept: float  # sum of the kept s**2 / sum of all s**2 (over all layers of a stack)
  params_before: int  # rows * cols (times L)
  params_after: int  # rank * (rows + cols) (times L): what u and v store, padding included
  n_in: int  # leading axes (after a stack's layer axis) contracted with the input
  ranks: tuple  # the rank of each layer: one entry, or L for a stack
  stacked: bool  # whether axis 0 stacks layers


# ------------------------------------------------------------------------ one kernel


def _matrices(w, n_in: int, stacked: bool, name: str = "the kernel"):
  """(w as float32[L, rows, cols] (L = 1 unstacked), in_shape, out_shape)."""
  lead = int(stacked)
  shape = tuple(w.shape)
  nd = len(shape) - lead
  if isinstance(n_in, bool) or not isinstance(n_in, (int, np.integer)) or not 0 < n_in < nd:
    raise ValueError(
      f"lowrank.n_in={n_in!r} for {name} of shape {shape}{' (stacked)' if stacked else ''}: "
      f"the input axes must be 1 to {nd - 1} of its {nd} (per layer), leaving at least one "
      "output axis. Pass the number of leading input axes (attention out [H, D, E]: 2)."
    )
  in_shape, out_shape = shape[lead : lead + n_in], shape[lead + n_in :]
  w_LxMxN = jnp.reshape(w, (shape[0] if stacked else 1, math.prod(in_shape), math.prod(out_shape)))
  return w_LxMxN.astype(jnp.float32), in_shape, out_shape


def _check_rank(rank, k: int | None = None, where: str = ""):
  """A rank must be an integer in [1, k] (k = min(rows, cols); None: only positive)."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise ValueError(f"lowrank.rank={rank!r}{where}: a rank must be a positive integer.")
  if k is not None and rank > k:
    raise ValueError(
      f"lowrank.rank={rank!r}{where}: above min(rows, cols) = {k}. Choose a rank in [1, {k}] "
      "(or set lowrank.energy / lowrank.budget for ranks per layer)."
    )


def spectrum(w, n_in: int, stacked: bool = False) -> np.ndarray:
  """The singular values of w as a matrix [rows, cols], descending: float64[min(rows, cols)],
  or [L, min(rows, cols)] for a stack (computed in float32)."""
  w_LxMxN, _, _ = _matrices(w, n_in, stacked)
  s_LxK = np.asarray(jnp.linalg.svd(w_LxMxN, compute_uv=False), np.float64)
  return s_LxK if stacked else s_LxK[0]


def factorize(w, rank, n_in: int, stacked: bool = False) -> tuple[jax.Array, jax.Array]:
  """(u [*in, r], v [r, *out]) of w's rank-r truncated SVD, in float32 cast to w.dtype.

  Stacked (axis 0 stacks L layers): u [L, *in, r], v [L, r, *out], each layer factorized on
  its own; `rank` is one int or one per layer, and r = max(rank): a layer of smaller rank gets
  zero columns of u and zero rows of v, which leave its product exact."""
  w_LxMxN, in_shape, out_shape = _matrices(w, n_in, stacked)
  n_layers, rows, cols = w_LxMxN.shape
  ranks = list(rank) if isinstance(rank, (list, tuple, np.ndarray)) else [rank] * n_layers
  if len(ranks) != n_layers:
    raise ValueError(
      f"lowrank.rank={rank!r}: {len(ranks)} ranks for {n_layers} layers of a kernel of shape "
      f"{tuple(w.shape)}. Pass one rank, or one per layer of a stack (stacked=True)."
    )
  for r in ranks:
    _check_rank(r, min(rows, cols), f" for a kernel of shape {tuple(w.shape)}")
  r = max(ranks)
  u_LxMxK, s_LxK, vt_LxKxN = jnp.linalg.svd(w_LxMxN, full_matrices=False)
  keep_LxR = jnp.arange(r)[None, :] < jnp.asarray(ranks)[:, None]
  root_LxR = jnp.where(keep_LxR, jnp.sqrt(s_LxK[:, :r]), 0.0)
  u_LxMxR = u_LxMxK[:, :, :r] * root_LxR[:, None, :]
  v_LxRxN = root_LxR[:, :, None] * vt_LxKxN[:, :r, :]
  lead = (n_layers,) if stacked else ()
  u = u_LxMxR.reshape(lead + in_shape + (r,)).astype(w.dtype)
  v = v_LxRxN.reshape(lead + (r,) + out_shape).astype(w.dtype)
  return u, v


def reconstruct(u, v, stacked: bool = False) -> jax.Array:
  """tensordot(u, v, 1): the kernel [*in, *out] (per layer of a stack) that u, v approximate."""

  def one(u, v):
    return jnp.tensordot(u, v, 1, precision=lax.Precision.HIGHEST)

  return jax.vmap(one)(u, v) if stacked else one(u, v)


# ------------------------------------------------------------------------ ranks


def _check_energy(energy):
  if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
    raise ValueError(
      f"lowrank.energy={energy!r}: the fraction of sum(s**2) to keep must lie in (0, 1]. "
      "Pass e.g. 0.9."
    )


def rank_for_energy(s, energy: float) -> int:
  """The smallest r with sum(s[:r]**2) / sum(s**2) >= energy, for s descending (as SVD gives
  it) and energy in (0, 1]. An all-zero s gets rank 1 (the least a factorization has)."""
  _check_energy(energy)
  e = np.cumsum(np.square(np.asarray(s, np.float64)))
  if e[-1] <= 0:
    return 1
  return int(np.searchsorted(e / e[-1], energy, side="left")) + 1  # e[-1] / e[-1] is exactly 1


def max_useful_rank(rows: int, cols: int) -> int:
  """The largest r with r (rows + cols) < rows cols: above it, factorizing saves nothing
  (0: no rank does)."""
  return (rows * cols - 1) // (rows + cols)


def ranks_for_budget(
  spectra: dict[Hashable, tuple], budget_params: int, min_rank: int = 1
) -> dict[Hashable, int]:
  """Ranks under a global parameter budget: {key: (s descending, rows, cols)} -> {key: rank}
  with sum r (rows + cols) <= budget_params. A stack is one key per layer.

  The greedy solution of the knapsack whose items are the rank-1 components (value s_i**2,
  weight rows + cols): every layer starts at `min_rank` (a rank-0 layer would output zeros),
  then components are added in order of energy per parameter, s_i**2 / (rows + cols), each one
  that still fits. Within a layer that order is s's, so each layer keeps a prefix of its
  spectrum. With equal weights (layers of one size) this is optimal; otherwise its energy falls
  short of the optimum by less than the value of one component (the fractional-knapsack bound).
  """
  keys = list(spectra)
  costs = [int(spectra[k][1]) + int(spectra[k][2]) for k in keys]
  ranks = {k: min(min_rank, len(np.ravel(spectra[k][0]))) for k in keys}
  left = int(budget_params) - sum(ranks[k] * c for k, c in zip(keys, costs))
  if left < 0:
    raise ValueError(
      f"lowrank.budget: {int(budget_params)} parameters cannot hold rank {min_rank} in each of "
      f"{len(keys)} layers ({int(budget_params) - left} parameters). Raise the budget."
    )
  # Every component beyond min_rank: (-(value per parameter), key index, position in s).
  cands = [
    (-(float(s_i) ** 2) / c, j, i)
    for j, (k, c) in enumerate(zip(keys, costs))
    for i, s_i in enumerate(np.ravel(np.asarray(spectra[k][0], np.float64)))
    if i >= ranks[k]
  ]
  for _, j, _ in sorted(cands):  # ties: earlier key, then earlier component
    if costs[j] <= left:  # one that does not fit closes its layer: the rest cost as much
      ranks[keys[j]] += 1
      left -= costs[j]
  return ranks


# ------------------------------------------------------------------------ parameter trees


def _n_in_for(name: str, n_in) -> int:
  """n_in of a kernel from (regex, n_in) pairs: the first whose regex searches `name`, else 1."""
  for rule in n_in:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(
        f"lowrank.n_in={n_in!r}: expected (regex, n_in) pairs, e.g. ((r'attn/out/kernel$', 2),)."
      )
    if re.search(rule[0], name):
      return rule[1]
  return 1


def plan(
  params,
  select: str,
  *,
  rank: int = 0,
  energy: float = 0.0,
  budget: float = 0.0,
  n_in: Sequence[tuple[str, int]] = (),
  stacked: str | None = None,
) -> dict[str, Choice]:
  """{path: Choice} for the kernels whose "/"-joined path `select` (a regex) searches, the rank
  of each layer set by exactly one of:

    rank    the same rank everywhere (at most min(rows, cols) of every selected kernel);
    energy  per layer, the least rank keeping that fraction of sum(s**2) (`rank_for_energy`);
    budget  a fraction in (0, 1) of the selected kernels' parameters, shared out over the
            layers by `ranks_for_budget` (every layer keeps at least rank 1).

  A kernel is a leaf with at least 2 axes (per layer). n_in: (regex, n_in) pairs, first match
  wins, the number of leading input axes of a kernel (default 1; e.g. a model's attention out
  [H, D, E]: 2). stacked: regex of the paths whose leaves stack layers on axis 0 (scanned
  models); each layer of a stack gets its own rank, but u and v take the largest and the others
  are zero-padded (exact, but the padding is stored, so a stack's params_after can exceed what
  the budget counted: sum over layers of r_l (rows + cols)).
  """
  chosen = [n for n, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v != 0]
  if len(chosen) != 1:
    raise ValueError(
      f"lowrank.rank={rank!r}, lowrank.energy={energy!r}, lowrank.budget={budget!r}: "
      f"{'none' if not chosen else ' and '.join(chosen)} set. Set exactly one of them."
    )
  if rank:
    _check_rank(rank)
  if energy:
    _check_energy(energy)
  if budget and (isinstance(budget, bool) or not isinstance(budget, float) or not 0 < budget < 1):
    raise ValueError(
      f"lowrank.budget={budget!r}: the fraction of the selected kernels' parameters to keep "
      "must lie in (0, 1) (at 1 nothing needs factorizing). Pass e.g. 0.5."
    )

  kernels, spectra = [], {}  # spectra: {(path, layer): (s, rows, cols)}
  for keys, w in nested_items(params):
    name = "/".join(map(str, keys))
    is_stack = stacked is not None and re.search(stacked, name) is not None
    if getattr(w, "ndim", 0) - is_stack >= 2:
      kernels.append((name, w, is_stack))
  selected = [k for k in kernels if re.search(select, k[0])]
  if not selected:
    names = [k[0] for k in kernels]
    raise ValueError(
      f"lowrank.select={select!r} matched no kernel: the kernels are: {', '.join(names[:8])}"
      f"{', ...' if len(names) > 8 else ''}. Pass a regex that searches some of these paths."
    )
  info = {}  # {path: (n_in, stacked, L, rows, cols, s_LxK)}
  for name, w, is_stack in selected:
    k = _n_in_for(name, n_in)
    w_LxMxN, _, _ = _matrices(w, k, is_stack, name)
    s_LxK = np.asarray(jnp.linalg.svd(w_LxMxN, compute_uv=False), np.float64)
    n_layers, rows, cols = w_LxMxN.shape
    info[name] = (k, is_stack, n_layers, rows, cols, s_LxK)
    for layer in range(n_layers):
      spectra[(name, layer)] = (s_LxK[layer], rows, cols)

  if rank:
    for name, (_, _, _, rows, cols, _) in info.items():
      _check_rank(rank, min(rows, cols), f" for {name} [{rows}, {cols}]")
    layer_rank = {key: rank for key in spectra}
  elif energy:
    layer_rank = {key: rank_for_energy(s, energy) for key, (s, _, _) in spectra.items()}
  else:
    total = sum(rows * cols for _, rows, cols in spectra.values())
    layer_rank = ranks_for_budget(spectra, math.floor(budget * total))

  choices = {}
  for name, (k, is_stack, n_layers, rows, cols, s_LxK) in info.items():
    ranks = tuple(int(layer_rank[(name, layer)]) for layer in range(n_layers))
    e_LxK = np.square(s_LxK)
    kept = sum(e_LxK[layer, :r].sum() for layer, r in enumerate(ranks))
    total = e_LxK.sum()
    choices[name] = Choice(
      rank=max(ranks),
      rows=rows,
      cols=cols,
      energy_kept=float(kept / total) if total > 0 else 1.0,
      params_before=n_layers * rows * cols,
      params_after=n_layers * max(ranks) * (rows + cols),
      n_in=int(k),
      ranks=ranks,
      stacked=is_stack,
    )
  return choices


def _replace(tree: dict, keys: tuple, fn) -> dict:
  """A copy of nested dict `tree` with the leaf at `keys` replaced, in place in the key order,
  by the items of the dict fn(leaf)."""
  if not isinstance(tree, dict) or keys[0] not in tree:
    raise ValueError(f"lowrank: no parameter at {'/'.join(keys)!r}; plan on this same tree.")
  k = keys[0]
  if len(keys) > 1:
    return {**tree, k: _replace(tree[k], keys[1:], fn)}
  new = fn(tree[k])
  if clash := [n for n in new if n in tree]:
    raise ValueError(f"lowrank: {clash} already exist beside {k!r}: is the tree factorized?")
  return {n: x for key, v in tree.items() for n, x in (new.items() if key == k else [(key, v)])}


def factorize_tree(params, choices: dict[str, Choice]) -> dict:
  """A copy of `params` where each chosen leaf ".../kernel" is replaced by its factors, the
  siblings ".../kernel_u" [(L,) *in, r] and ".../kernel_v" [(L,) r, *out]."""
  out = params
  for name, c in choices.items():
    keys = tuple(name.split("/"))

    def split(w, c=c, name=name):
      lead = int(c.stacked)
      rows, cols = math.prod(w.shape[lead : lead + c.n_in]), math.prod(w.shape[lead + c.n_in :])
      if (rows, cols, w.shape[0] if c.stacked else 1) != (c.rows, c.cols, len(c.ranks)):
        raise ValueError(f"lowrank: {name} {tuple(w.shape)} is not the kernel planned ({c}).")
      u, v = factorize(w, list(c.ranks) if c.stacked else c.rank, c.n_in, c.stacked)
      last = name.rsplit("/", 1)[-1]
      return {f"{last}_u": u, f"{last}_v": v}

    out = _replace(out, keys, split)
  return out


def merge_tree(params, stacked: str | None = None) -> dict:
  """The inverse of `factorize_tree`: every pair of sibling leaves "X_u", "X_v" becomes
  "X" = tensordot(X_u, X_v, 1) (per layer where `stacked`, plan's regex, searches ".../X")."""

  def merge(tree, prefix):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      base = k[:-2] if isinstance(k, str) and k.endswith(("_u", "_v")) else None
      if base is not None and f"{base}_u" in tree and f"{base}_v" in tree:
        if k.endswith("_u"):
          name = "/".join(prefix + (base,))
          is_stack = stacked is not None and re.search(stacked, name) is not None
          out[base] = reconstruct(v, tree[f"{base}_v"], is_stack)
      else:
        out[k] = merge(v, prefix + (str(k),))
    return out

  return merge(params, ())


# ------------------------------------------------------------------------ counts


def count_params(choices: dict[str, Choice]) -> tuple[int, int]:
  """(parameters before, after) of the chosen kernels: rows cols vs rank (rows + cols) a layer,
  the padded rank for a stack (what u and v store)."""
  return (
    sum(c.params_before for c in choices.values()),
    sum(c.params_after for c in choices.values()),
  )


def flops_per_token(choices: dict[str, Choice]) -> tuple[int, int]:
  """(FLOPs a token before, after) through the chosen kernels: a dense [rows, cols] matmul
  costs 2 rows cols, the factorized one 2 rank (rows + cols) (a stack: per layer, padded rank).
  """
  before = sum(len(c.ranks) * 2 * c.rows * c.cols for c in choices.values())
  after = sum(len(c.ranks) * 2 * c.rank * (c.rows + c.cols) for c in choices.values())
  return before, after
