"""How masks are shaped and shared out: granularity (unstructured, N:M, blocks, heads,
neurons), the units scored together, and the distribution of the sparsity over them
(uniform, ERK, global). Pure functions of the selected parameters' scores and shapes."""

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from compress.prune import masks as mk


# ------------------------------------------------------------------------ granularity


@dataclasses.dataclass(frozen=True)
class NM:
  """Keep n of every m consecutive weights along the input dimension.

  `axes`: (regex on the parameter path, axis) pairs, first match wins: the input axis of
  each parameter (a model's `contracting` rules). A matrix no rule matches runs its groups
  along axis -2 (the input of an [in, out] matrix); any other parameter needs a rule.
  Negative axes also fit scanned layers.
  """

  n: int
  m: int
  axes: tuple | None = None

  def axis(self, name: str, ndim: int) -> int | None:
    """The axis of parameter `name` (of rank `ndim`, per layer when stacked), or None."""
    found = next((a for pattern, a in self.axes or () if re.search(pattern, name)), None)
    return -2 if found is None and ndim == 2 else found


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Prune whole (rows, cols) blocks of the last two axes, scored by their mean."""

  rows: int
  cols: int


@dataclasses.dataclass(frozen=True)
class Structured:
  """Prune whole groups: `rules` are (regex, axes summed over) pairs, first match wins;
  what is left of a parameter's shape indexes its groups. Parameters whose paths agree but
  for their last two parts ("layers_0/attn/" of ".../query/kernel") and whose groups have
  the same shape (query, key, value and out of one attention layer) share them."""

  name: str
  rules: tuple

  def reduce_axes(self, name: str):
    return next((axes for pattern, axes in self.rules if re.search(pattern, name)), None)


DISTRIBUTIONS = ("uniform", "erk", "global")


def parse_granularity(spec, *, heads=None, neurons=None, nm_axes=None):
  """ "unstructured" | "N:M" (e.g. "2:4") | "RxC" blocks (e.g. "4x4") | "heads" | "neurons",
  or an NM / Blocks / Structured instance (returned as is).

  The model's layout comes as plain data: `heads` / `neurons` are (regex, axes summed over)
  rules (needed for "heads" / "neurons"); `nm_axes` are N:M's (regex, input axis) rules.
  """
  if not isinstance(spec, str):
    return spec
  if spec == "unstructured":
    return spec
  if spec in ("heads", "neurons"):
    rules = heads if spec == "heads" else neurons
    if not rules:
      raise ValueError(
        f"granularity {spec!r} needs the model's {spec} rules: prune.parse_granularity("
        f"{spec!r}, {spec}=...) with (regex on the parameter path, axes summed over) pairs "
        f"(e.g. a model's structure().{spec}), and pass the result as the granularity."
      )
    return Structured(spec, tuple((pattern, tuple(axes)) for pattern, axes in rules))
  m = re.fullmatch(r"(\d+):(\d+)", spec) or re.fullmatch(r"(\d+)x(\d+)", spec)
  if m is None:
    raise ValueError(
      f"granularity {spec!r}: use 'unstructured', 'N:M' (e.g. '2:4'), 'RxC' blocks "
      "(e.g. '4x4'), 'heads' or 'neurons'."
    )
  a, b = int(m.group(1)), int(m.group(2))
  if ":" not in spec:
    return Blocks(a, b)
  return NM(a, b, tuple((pattern, axis) for pattern, axis in nm_axes) if nm_axes else None)


# ------------------------------------------------------------------------------ plan


class Unit(NamedTuple):
  """Selected parameters that are scored and pruned together (one, or a coupled set)."""

  members: tuple  # positions in the selected list
  kind: str  # "elements" | "blocks" | "groups" | "nm"
  n_groups: int  # prunable units (elements, blocks, groups)
  group_size: int  # weights per unit
  info: Any = None  # blocks: (rows, cols); groups: per-member reduce axes; nm: axis
  layers: int = 0  # > 0: axis 0 stacks that many layers (scanned), each pruned on its own


def plan(names, shapes, granularity, where: str, stacked: str | None = None) -> list[Unit]:
  """The units of the selected parameters (`names`, `shapes`), checked against the shapes.

  Parameters whose name matches `stacked` hold a stack of layers on axis 0 (scanned
  layers); uniform and ERK sparsity then apply to each layer of the stack.
  """
  is_stack = [is_stacked(name, stacked) for name in names]
  units = _units(names, shapes, granularity, where, is_stack)
  if isinstance(granularity, NM):
    return units
  stack = lambda u: shapes[u.members[0]][0] if is_stack[u.members[0]] else 0  # noqa: E731
  return [u._replace(layers=stack(u)) for u in units]


def is_stacked(name: str, stacked: str | None) -> bool:
  """Whether parameter `name` stacks layers on axis 0 (it matches the regex `stacked`)."""
  return stacked is not None and re.search(stacked, name) is not None


def _units(names, shapes, granularity, where: str, is_stack) -> list[Unit]:
  g = granularity
  if isinstance(g, NM):
    units = []
    for i, (name, shape) in enumerate(zip(names, shapes)):
      axis = g.axis(name, len(shape) - is_stack[i])
      if axis is None:
        raise ValueError(
          f"N:M {g.n}:{g.m} on {name} {tuple(shape)}: which axis is its input? Only a matrix "
          "has a default (-2); pass NM(n, m, axes=((regex, axis), ...)) (e.g. a model's "
          f"structure().contracting, as prune.parse_granularity(..., nm_axes=...)). {where}"
        )
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
