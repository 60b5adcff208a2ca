"""The pruning transform: an optax GradientTransformation that holds the masks.

    tx = prune.pruning(0.9, prune.cubic(start=100, end=1100, every=100), inner=optax.adamw(1e-3))
    tx = optax.chain(optax.adamw(1e-3), prune.pruning(0.9, prune.one_shot(0)))   # chained last

Its state holds the masks (bool, one per selected parameter, boxed like it at init so it
shards like it), the step count and, for accumulated scores, their running sums. At the
steps the schedule names, the masks are recomputed inside jit (`lax.cond`). Its updates
are `where(mask, u, -w)`: pruned weights become exactly zero when the updates are applied
and stay zero; nothing needs to be called after `optax.apply_updates`. Wrapping an
optimizer (`inner=`) also masks the gradients it sees (so its moments of pruned weights
stay zero) and lets scores use the real gradients.

Granularity: "unstructured"; `NM(n, m, axes)` (keep n of every m along the input dimension,
reached gradually when the schedule is); `Blocks(rows, cols)`; `Structured` heads / neurons
(whole attention heads / MLP neurons, scored jointly over the layers that share them). What
is a head, a neuron or an input axis, and where the layers are, the caller says as plain data
(regexes on parameter paths, axis numbers): `parse_granularity("heads", heads=rules)`.
Distribution: "uniform" (every parameter, or coupled group, at the sparsity), "erk"
(Erdos-Renyi-Kernel per-layer sparsities with the same total) or "global" (one threshold
over everything selected, found by distributed bisection; no score is gathered).
"""

import numbers
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from compress.prune import schedules
from compress.prune.granularity import (
  DISTRIBUTIONS,
  NM,
  Blocks,
  Structured,
  is_stacked,
  keep_masks,
  parse_granularity,
  plan,
)
from compress.tree import path_name


# ----------------------------------------------------------------------------- scores


class Score(NamedTuple):
  """A pruning criterion: fn(w, g, key) -> per-element score (higher = keep).

  `accumulate`: the mask uses the sum of fn over all steps so far (movement pruning).
  `needs_grads`: fn reads g, so the transform must wrap the optimizer (see `pruning`).
  """

  fn: Callable
  accumulate: bool = False
  needs_grads: bool = False


SCORES = {
  "magnitude": Score(lambda w, g, key: jnp.abs(w)),
  "random": Score(lambda w, g, key: jax.random.uniform(key, w.shape)),
  "saliency": Score(lambda w, g, key: jnp.abs(w * g), needs_grads=True),  # |w * dL/dw|
  "movement": Score(lambda w, g, key: -g * w, accumulate=True, needs_grads=True),  # Sanh 2020
}


def _validate(sparsity, granularity, distribution, score):
  g = parse_granularity(granularity)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution={distribution!r}: choose one of {DISTRIBUTIONS}.")
  if isinstance(g, NM):
    if not 1 <= g.n <= g.m:
      raise ValueError(f"N:M = {g.n}:{g.m}: need 1 <= N <= M (N weights kept of every M).")
    if distribution != "uniform":
      raise ValueError("N:M sparsity is per group of M weights: use distribution='uniform'.")
    if _is_number(sparsity) and abs(sparsity - (1 - g.n / g.m)) > 1e-6:
      raise ValueError(
        f"sparsity={sparsity} contradicts N:M {g.n}:{g.m} (sparsity {1 - g.n / g.m}): "
        "leave sparsity unset for N:M."
      )
  elif sparsity is None:
    raise ValueError("pruning needs a target sparsity in [0, 1).")
  if isinstance(g, Blocks) and min(g.rows, g.cols) < 1:
    raise ValueError(f"blocks {g.rows}x{g.cols}: both sides must be >= 1.")
  if isinstance(g, Structured) and distribution == "erk":
    raise ValueError(
      "distribution='erk' sets per-matrix sparsities: use it with unstructured "
      "or block masks, and 'uniform' or 'global' for heads/neurons."
    )
  if _is_number(sparsity) and not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity={sparsity} must lie in [0, 1) (0.9 prunes 90% of the weights).")
  if isinstance(score, str) and score not in SCORES:
    raise ValueError(f"score={score!r}: choose one of {sorted(SCORES)} or pass a prune.Score.")
  return g


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) or (
    isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer) and x.ndim == 0
  )


# ------------------------------------------------------------------------- transform


class PruneState(NamedTuple):
  count: jax.Array  # optimizer steps taken
  masks: Any  # bool per selected parameter (optax.MaskedNode elsewhere)
  scores: Any  # accumulated scores (Score.accumulate: a tree like masks), else ()
  inner: Any  # the wrapped optimizer's state (EmptyState when chained)


def _select(
  params, select: str, exclude: str | None, min_ndim: int, where: str, accept=None, stacked=None
):
  """[(position in the flat leaves, name, shape)] of the parameters to prune (those
  `accept(name)` also takes, when given). A stack of layers (`stacked`) counts its rank
  per layer."""
  sel, ex = re.compile(select), re.compile(exclude) if exclude else None
  out, names = [], []
  for i, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    name = path_name(path)
    names.append(name)
    ndim = x.ndim - is_stacked(name, stacked)  # per layer
    ok = ndim >= min_ndim and sel.search(name) and not (ex and ex.search(name))
    if ok and (accept is None or accept(name)):
      out.append((i, name, tuple(x.shape)))
  if not out:
    raise ValueError(
      f"The pruning selector select={select!r} (exclude={exclude!r}, min_ndim={min_ndim}"
      f"{', granularity rules' if accept else ''}) matches no parameter. {where} "
      f"Parameters: {', '.join(names[:12])}" + (", ..." if len(names) > 12 else "")
    )
  return out


def pruning(
  sparsity=None,
  schedule: schedules.Schedule | None = None,
  inner: optax.GradientTransformation | None = None,
  *,
  granularity="unstructured",
  distribution: str = "uniform",
  select: str = r".",
  exclude: str | None = None,
  min_ndim: int = 2,
  score="magnitude",
  seed: int = 0,
  stacked: str | None = None,
) -> optax.GradientTransformation:
  """Magnitude (or any `score`) pruning as a GradientTransformation; see the module doc.

  sparsity: the final fraction of weights pruned, in [0, 1) (N:M: 1 - N/M, leave unset).
  schedule: `one_shot(0)` by default; `cubic(...)` for gradual, `periodic(...)`.
  inner: the optimizer to wrap (None: chain this transform after it).
  granularity: "unstructured", "N:M", "RxC", or what `parse_granularity` returns (heads
    and neurons need the model's rules: parse them there).
  select / exclude: regexes on the parameter path ("layers_0/mlp/wi/kernel"); leaves of
    rank < min_ndim (per layer, for a stack) are never pruned. The default selects every
    matrix, embedding tables included: pass the model's weight regex (its
    `Structure.weights`) to prune only its weight matrices.
  stacked: regex of parameters whose axis 0 stacks layers (scanned models, e.g.
    "^layers/"): "uniform" and "erk" then hold for each layer, as they would unscanned.
  """
  g = _validate(sparsity, granularity, distribution, score)
  schedule = schedule or schedules.one_shot(0)
  crit = SCORES[score] if isinstance(score, str) else score
  if not isinstance(crit, Score):
    crit = Score(crit)
  if crit.needs_grads and inner is None:
    raise ValueError(
      "This pruning score reads the gradients: wrap the optimizer, "
      "prune.pruning(..., inner=optax.adamw(...)), instead of chaining after it."
    )
  final = 1.0 - g.n / g.m if isinstance(g, NM) else sparsity
  wraps = inner is not None
  inner = inner or optax.identity()
  hint = "Change prune.select / prune.granularity."

  def selected(params):
    accept = (lambda n: g.reduce_axes(n) is not None) if isinstance(g, Structured) else None
    return _select(params, select, exclude, min_ndim, hint, accept, stacked)

  def init(params):
    chosen = selected(params)
    plan([n for _, n, _ in chosen], [s for _, _, s in chosen], g, hint, stacked)  # checks
    idx = {i for i, _, _ in chosen}
    leaves, treedef = jax.tree.flatten(params)

    def per_leaf(make):
      return treedef.unflatten(
        [make(x) if i in idx else optax.MaskedNode() for i, x in enumerate(leaves)]
      )

    keep = per_leaf(lambda x: jnp.ones(x.shape, bool))
    acc = per_leaf(lambda x: jnp.zeros(x.shape, jnp.float32)) if crit.accumulate else ()
    return PruneState(jnp.zeros((), jnp.int32), keep, acc, inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("pruning needs the params: call tx.update(grads, state, params).")
    chosen = selected(params)
    names, shapes = [n for _, n, _ in chosen], [s for _, _, s in chosen]
    units = plan(names, shapes, g, hint, stacked)
    treedef = jax.tree.structure(params)
    w = treedef.flatten_up_to(params)
    grads = treedef.flatten_up_to(updates)
    old = treedef.flatten_up_to(state.masks)
    pos = [i for i, _, _ in chosen]
    chosen_pos = set(pos)
    count = state.count
    key = jax.random.fold_in(jax.random.PRNGKey(seed), count)
    step_scores = lambda: [  # noqa: E731
      crit.fn(w[i], grads[i], jax.random.fold_in(key, j)).astype(jnp.float32)
      for j, i in enumerate(pos)
    ]
    acc = state.scores
    if crit.accumulate:
      acc_leaves = treedef.flatten_up_to(acc)
      for i, s in zip(pos, step_scores()):
        acc_leaves[i] = acc_leaves[i] + s
      acc = treedef.unflatten(acc_leaves)

    def recompute():
      scores = [treedef.flatten_up_to(acc)[i] for i in pos] if crit.accumulate else step_scores()
      at = lambda target: schedule.sparsity(count, target)  # noqa: E731
      return keep_masks(units, scores, shapes, at, final, distribution, g)

    kept = lax.cond(schedule.is_update(count), recompute, lambda: [old[i] for i in pos])
    masks = list(old)
    for i, m in zip(pos, kept):
      masks[i] = m
    if wraps:
      grads = [jnp.where(masks[i], x, 0) if i in chosen_pos else x for i, x in enumerate(grads)]
      u, inner_state = inner.update(treedef.unflatten(grads), state.inner, params)
    else:
      u, inner_state = updates, state.inner
    u = treedef.flatten_up_to(u)
    for i in pos:
      u[i] = jnp.where(masks[i], u[i], -w[i])  # w + (-w) == 0 exactly
    new = PruneState(count + 1, treedef.unflatten(masks), acc, inner_state)
    return treedef.unflatten(u), new

  return optax.GradientTransformation(init, update)
