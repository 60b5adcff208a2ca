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

Granularity: "unstructured"; `NM(n, m)` (keep n of every m along the input dimension,
reached gradually when the schedule is); `Blocks(rows, cols)`; `HEADS` / `NEURONS`
(whole attention heads / MLP neurons, scored jointly over the layers that share them).
Distribution: "uniform" (every parameter, or coupled group, at the sparsity), "erk"
(Erdos-Renyi-Kernel per-layer sparsities with the same total) or "global" (one threshold
over everything selected, found by distributed bisection; no score is gathered).
"""

import dataclasses
import math
import numbers
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from compress.prune import masks as mk
from compress.prune import schedules
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


# ------------------------------------------------------------------------ granularity


@dataclasses.dataclass(frozen=True)
class NM:
  """Keep n of every m consecutive weights along the input dimension.

  `axes`: (regex on the parameter path, axis) pairs, first match wins; the default is
  the contracting axis next to the output axes of this codebase's kernels (embed for
  query/key/value (embed, heads, head_dim); head_dim for out (heads, head_dim, embed);
  the input axis of every (in, out) matrix). Negative axes also fit scanned layers.
  """

  n: int
  m: int
  axes: tuple = ((r"attn/(query|key|value)/kernel$", -3), (r".", -2))

  def axis(self, name: str) -> int:
    return next(a for pattern, a in self.axes if re.search(pattern, name))


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Prune whole (rows, cols) blocks of the last two axes, scored by their mean."""

  rows: int
  cols: int


@dataclasses.dataclass(frozen=True)
class Structured:
  """Prune whole groups: `rules` are (regex, axes summed over) pairs; what is left of a
  parameter's shape indexes its groups. Parameters under the same module whose groups
  have the same shape (query, key, value and out of one attention layer) share them."""

  name: str
  rules: tuple

  def reduce_axes(self, name: str):
    return next((axes for pattern, axes in self.rules if re.search(pattern, name)), None)


HEADS = Structured(
  "heads", ((r"attn/(query|key|value)/kernel$", (-3, -1)), (r"attn/out/kernel$", (-2, -1)))
)
NEURONS = Structured("neurons", ((r"mlp/(wi|wg)/kernel$", (-2,)), (r"mlp/wo/kernel$", (-1,))))
DISTRIBUTIONS = ("uniform", "erk", "global")


def parse_granularity(spec):
  """ "unstructured" | "N:M" (e.g. "2:4") | "RxC" blocks (e.g. "4x4") | "heads" | "neurons",
  or an NM / Blocks / Structured instance."""
  if not isinstance(spec, str):
    return spec
  if spec == "unstructured":
    return spec
  if spec in ("heads", "neurons"):
    return HEADS if spec == "heads" else NEURONS
  m = re.fullmatch(r"(\d+):(\d+)", spec) or re.fullmatch(r"(\d+)x(\d+)", spec)
  if m is None:
    raise ValueError(
      f"granularity {spec!r}: use 'unstructured', 'N:M' (e.g. '2:4'), 'RxC' blocks "
      "(e.g. '4x4'), 'heads' or 'neurons'."
    )
  a, b = int(m.group(1)), int(m.group(2))
  return NM(a, b) if ":" in spec else Blocks(a, b)


# ------------------------------------------------------------------------------ plan


class Unit(NamedTuple):
  """Selected parameters that are scored and pruned together (one, or a coupled set)."""

  members: tuple  # positions in the selected list
  kind: str  # "elements" | "blocks" | "groups" | "nm"
  n_groups: int  # prunable units (elements, blocks, groups)
  group_size: int  # weights per unit
  info: Any = None  # blocks: (rows, cols); groups: per-member reduce axes; nm: axis
  layers: int = 0  # > 0: axis 0 stacks that many layers (scanned), each pruned on its own


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


def _plan(names, shapes, granularity, where: str, stacked: str | None = None) -> list[Unit]:
  """The units of the selected parameters (`names`, `shapes`), checked against the shapes.

  Parameters whose name matches `stacked` hold a stack of layers on axis 0 (scanned
  layers); uniform and ERK sparsity then apply to each layer of the stack.
  """
  units = _units(names, shapes, granularity, where)
  if stacked is None or isinstance(granularity, NM):
    return units
  pattern = re.compile(stacked)
  out = []
  for u in units:
    shape = shapes[u.members[0]]
    if pattern.search(names[u.members[0]]) and len(shape) >= 3:
      u = u._replace(layers=shape[0])
    out.append(u)
  return out


def _units(names, shapes, granularity, where: str) -> list[Unit]:
  g = granularity
  if isinstance(g, NM):
    units = []
    for i, (name, shape) in enumerate(zip(names, shapes)):
      axis = g.axis(name)
      if not -len(shape) <= axis < len(shape) or shape[axis] % g.m:
        raise ValueError(
          f"N:M {g.n}:{g.m} on {name} {tuple(shape)}: M={g.m} does not divide its axis {axis} "
          f"({shape[axis] if -len(shape) <= axis < len(shape) else 'absent'}). {where}"
        )
      size = math.prod(shape)
      units.append(Unit((i,), "nm", size, 1, axis))
    return units
  if isinstance(g, Blocks):
    units = []
    for i, (name, shape) in enumerate(zip(names, shapes)):
      if shape[-2] % g.rows or shape[-1] % g.cols:
        raise ValueError(
          f"blocks {g.rows}x{g.cols} do not tile {name} {tuple(shape)} (last two axes). {where}"
        )
      n = math.prod(shape) // (g.rows * g.cols)
      units.append(Unit((i,), "blocks", n, g.rows * g.cols, (g.rows, g.cols)))
    return units
  if isinstance(g, Structured):
    coupled: dict = {}
    for i, (name, shape) in enumerate(zip(names, shapes)):
      axes = tuple(a % len(shape) for a in g.reduce_axes(name))
      kept = tuple(d for a, d in enumerate(shape) if a not in axes)
      coupled.setdefault((name.rsplit("/", 2)[0], kept), []).append((i, axes, shape))
    units = []
    for (_, kept), members in coupled.items():
      size = sum(math.prod(s[a] for a in axes) for _, axes, s in members)
      n = math.prod(kept)
      units.append(
        Unit(
          tuple(i for i, _, _ in members), "groups", n, size, tuple(axes for _, axes, _ in members)
        )
      )
    return units
  return [Unit((i,), "elements", math.prod(s), 1) for i, s in enumerate(shapes)]


def _group_scores(unit: Unit, scores: list) -> jax.Array:
  if unit.kind == "blocks":
    return mk.block_scores(scores[unit.members[0]], unit.info)
  if unit.kind == "groups":
    total = sum(scores[i].sum(axis=axes) for i, axes in zip(unit.members, unit.info))
    return total / unit.group_size
  return scores[unit.members[0]]


def _expand(unit: Unit, keep: jax.Array, shapes) -> list:
  if unit.kind == "blocks":
    return [mk.expand_blocks(keep, unit.info)]
  if unit.kind == "groups":
    out = []
    for i, axes in zip(unit.members, unit.info):
      out.append(jnp.broadcast_to(jnp.expand_dims(keep, axes), shapes[i]))
    return out
  return [keep]


def erk_sparsities(shapes, target, sizes=None) -> jax.Array:
  """Erdos-Renyi-Kernel (Evci et al. 2020) per-parameter sparsities whose weighted mean is
  `target`: density proportional to sum(shape) / prod(shape), capped at 1 (capped
  parameters stay dense and the rest make up for them). `target` may be traced.
  `sizes` (default prod(shape)) weighs each parameter, e.g. a stack of layers of `shape`."""
  n = jnp.asarray(sizes or [math.prod(s) for s in shapes], jnp.float32)
  raw = jnp.asarray([sum(s) / math.prod(s) for s in shapes], jnp.float32)
  dense = jnp.zeros(len(shapes), bool)
  eps = jnp.float32(0)
  for _ in range(len(shapes)):
    rhs = (1.0 - target) * n.sum() - jnp.sum(jnp.where(dense, n, 0.0))
    eps = rhs / jnp.maximum(jnp.sum(jnp.where(dense, 0.0, raw * n)), 1e-30)
    top = jnp.max(jnp.where(dense, -jnp.inf, raw))
    dense = dense | ((eps * top > 1.0) & (raw == top))
  return 1.0 - jnp.where(dense, 1.0, jnp.minimum(eps * raw, 1.0))


def keep_masks(units, scores, shapes, at: Callable, final, distribution: str, granularity):
  """Keep masks (one per selected parameter) for the per-element `scores`.

  `final` is the final target sparsity; `at(target)` the sparsity in effect now for a
  parameter whose final target is `target` (the schedule at the current step).
  """
  out = [None] * len(scores)
  if units and units[0].kind == "nm":
    g = granularity
    n_prune = jnp.floor(at(final) * g.m + 1e-3).astype(jnp.int32)
    n_prune = jnp.minimum(n_prune, g.m - g.n)
    for u in units:
      out[u.members[0]] = mk.nm_keep(scores[u.members[0]], n_prune, g.m, u.info)
    return out
  groups = [_group_scores(u, scores) for u in units]
  if distribution == "global":
    total = sum(u.n_groups * u.group_size for u in units)
    pruned = mk.smallest(groups, mk.target_count(at(final), total), [u.group_size for u in units])
  else:
    if distribution == "erk":
      layer_shapes = [shapes[u.members[0]][1 if u.layers else 0 :] for u in units]
      sizes = [math.prod(shapes[u.members[0]]) for u in units]
      targets = erk_sparsities(layer_shapes, final, sizes)
      targets = [targets[j] for j in range(len(units))]
    else:
      targets = [final] * len(units)
    pruned = []
    for u, gs, t in zip(units, groups, targets):
      k = mk.target_count(at(t), u.n_groups // max(u.layers, 1))
      if u.layers:  # each layer of a scanned stack at the sparsity
        pruned.append(jax.vmap(lambda x, k=k: mk.smallest([x], k)[0])(gs))
      else:
        pruned.append(mk.smallest([gs], k)[0])
  for u, p in zip(units, pruned):
    for i, m in zip(u.members, _expand(u, ~p, shapes)):
      out[i] = m
  return out


# ------------------------------------------------------------------------- transform


class PruneState(NamedTuple):
  count: jax.Array  # optimizer steps taken
  masks: Any  # bool per selected parameter (optax.MaskedNode elsewhere)
  scores: Any  # accumulated scores (Score.accumulate: a tree like masks), else ()
  inner: Any  # the wrapped optimizer's state (EmptyState when chained)


def _select(params, select: str, exclude: str | None, min_ndim: int, where: str, accept=None):
  """[(position in the flat leaves, name, shape)] of the parameters to prune (those
  `accept(name)` also takes, when given)."""
  sel, ex = re.compile(select), re.compile(exclude) if exclude else None
  out, names = [], []
  for i, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    name = path_name(path)
    names.append(name)
    ok = x.ndim >= min_ndim and sel.search(name) and not (ex and ex.search(name))
    if ok and (accept is None or accept(name)):
      out.append((i, name, tuple(x.shape)))
  if not out:
    raise ValueError(
      f"The pruning selector select={select!r} (exclude={exclude!r}, min_ndim={min_ndim}"
      f"{', granularity rules' if accept else ''}) matches no parameter. {where} Parameters: {', '.join(names[:12])}"
      + (", ..." if len(names) > 12 else "")
    )
  return out


def pruning(
  sparsity=None,
  schedule: schedules.Schedule | None = None,
  inner: optax.GradientTransformation | None = None,
  *,
  granularity="unstructured",
  distribution: str = "uniform",
  select: str = r"kernel$",
  exclude: str | None = None,
  min_ndim: int = 2,
  score="magnitude",
  seed: int = 0,
  stacked: str | None = r"^layers/",
) -> optax.GradientTransformation:
  """Magnitude (or any `score`) pruning as a GradientTransformation; see the module doc.

  sparsity: the final fraction of weights pruned, in [0, 1) (N:M: 1 - N/M, leave unset).
  schedule: `one_shot(0)` by default; `cubic(...)` for gradual, `periodic(...)`.
  inner: the optimizer to wrap (None: chain this transform after it).
  select / exclude: regexes on the parameter path ("layers_0/mlp/wi/kernel"); leaves of
    rank < min_ndim are never pruned. The default selects every kernel of rank >= 2,
    not embeddings, norms or biases.
  stacked: regex of parameters whose axis 0 stacks layers (scanned models): "uniform"
    and "erk" then hold for each layer, as they would unscanned.
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
    return _select(params, select, exclude, min_ndim, hint, accept)

  def init(params):
    chosen = selected(params)
    _plan([n for _, n, _ in chosen], [s for _, _, s in chosen], g, hint, stacked)  # checks
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
    units = _plan(names, shapes, g, hint, stacked)
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
