"""Sparse models on disk, sparsity reports, and pruning a trained model in one call.

    prune.save(directory, params)                  # bitmask + values (N:M: values + patterns)
    params = prune.load(directory)                 # dense again, bit for bit
    print(prune.format_report(prune.report(params)))

A sparse matrix is stored as one bit per weight plus its non-zero values (size
nnz * itemsize + size / 8 bytes: 13.1% of dense float32 at 90% sparsity), or, for N:M,
as the n kept values of every m plus which of the C(m, n) patterns they sit in, in
ceil(log2 C(m, n)) bits (3 bits per group for 2:4, against 4 for the bitmask). Each array
gets whichever of dense, bitmask and N:M is smallest; an all-zero array only its shape.
"""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compress.prune import schedules
from compress.prune.granularity import NM
from compress.prune.transform import SCORES, PruneState, _select, pruning
from compress.tree import disk_bytes, load_arrays, nested_items, path_name, save_arrays, set_new

__all__ = ["disk_bytes", "format_report", "load", "masks_of", "one_shot_prune", "report", "save"]


def masks_of(opt_state) -> list:
  """The mask trees of every pruning transform inside an optimizer state (however it is
  wrapped: chain, MultiSteps, inject_hyperparams, apply_if_finite)."""
  found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
  return [s.masks for s in found if isinstance(s, PruneState)]


def one_shot_prune(params, sparsity=None, grads=None, **kwargs):
  """`params` pruned once, now, at `sparsity` (same arguments as `pruning`; `grads` for
  scores that read them). No training: what "one-shot without fine-tuning" measures."""
  score = kwargs.get("score", "magnitude")
  if grads is None and getattr(SCORES.get(score, score), "needs_grads", False):
    raise ValueError(
      f"score={score!r} reads the gradients: pass grads (e.g. the mean gradient of the loss "
      "over a few calibration batches), or use score='magnitude'."
    )
  tx = pruning(sparsity, schedules.one_shot(0), inner=optax.set_to_zero(), **kwargs)
  grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def report(
  params,
  masks=None,
  select: str = r".",
  exclude: str | None = None,
  min_ndim: int = 2,
  stacked: str | None = None,
) -> dict:
  """{"layers": {name: {shape, size, nonzero, sparsity}}, "selected": {...}, "all": {...}}:
  zeros per pruned parameter, over the pruned ones, and over all parameters.

  The pruned parameters are those with a mask in `masks` (a mask tree from `masks_of`),
  else those the selector picks (`select`, `exclude`, `min_ndim`, `stacked` as in `pruning`;
  the default: every matrix).
  """
  if masks is not None:
    treedef = jax.tree.structure(params)
    chosen = {
      path_name(p)
      for (p, _), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], treedef.flatten_up_to(masks)
      )
      if not isinstance(m, optax.MaskedNode)
    }
  else:
    chosen = {n for _, n, _ in _select(params, select, exclude, min_ndim, "", None, stacked)}
  layers, sel, tot = {}, [0, 0], [0, 0]
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_name(path)
    nz, size = int(jax.device_get(jnp.count_nonzero(x))), int(x.size)
    tot[0], tot[1] = tot[0] + nz, tot[1] + size
    if name in chosen:
      sel[0], sel[1] = sel[0] + nz, sel[1] + size
      layers[name] = dict(shape=list(x.shape), size=size, nonzero=nz, sparsity=1 - nz / size)
  row = lambda nz, size: dict(size=size, nonzero=nz, sparsity=1 - nz / max(size, 1))  # noqa: E731
  return {"layers": layers, "selected": row(*sel), "all": row(*tot)}


def format_report(rep: dict) -> str:
  """The report as an aligned text table."""
  width = max([len(n) for n in rep["layers"]] + [8])
  lines = [f"{'parameter':<{width}}  {'shape':>16}  {'nonzero':>10}  sparsity"]
  for name, r in rep["layers"].items():
    shape = "x".join(map(str, r["shape"]))
    lines.append(f"{name:<{width}}  {shape:>16}  {r['nonzero']:>10,}  {r['sparsity']:.4f}")
  for key in ("selected", "all"):
    r = rep[key]
    lines.append(f"{key:<{width}}  {r['size']:>16,}  {r['nonzero']:>10,}  {r['sparsity']:.4f}")
  return "\n".join(lines)


def _nm_groups(x: np.ndarray, m: int, axis: int) -> np.ndarray:
  x = np.moveaxis(x, axis, -1)
  return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def _nm_fits(x: np.ndarray, nm: NM, axis: int) -> bool:
  if not -x.ndim <= axis < x.ndim or x.shape[axis] % nm.m:
    return False
  return bool(((_nm_groups(x, nm.m, axis) != 0).sum(-1) <= nm.n).all())


def _patterns(n: int, m: int):
  """(positions of each n-of-m pattern, lexicographic; pattern bits -> pattern number)."""
  combos = np.array(list(itertools.combinations(range(m), n)), np.int64)
  lookup = np.zeros(2**m, np.int64)
  lookup[(1 << combos).sum(-1)] = np.arange(len(combos))
  return combos, lookup, max(1, (len(combos) - 1).bit_length())


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
  """Small non-negative integers -> `bits` bits each, packed."""
  planes = (values.reshape(-1, 1).astype(np.int64) >> np.arange(bits)) & 1
  return np.packbits(planes.reshape(-1))


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  planes = np.unpackbits(packed)[: count * bits].reshape(count, bits).astype(np.int64)
  return (planes << np.arange(bits)).sum(-1)


def save(directory: str, tree: dict, nm: NM | None = None):
  """Writes a nested dict of arrays, each in its smallest form (see the module doc).

  `nm`: also try N:M storage (n kept values of every m along `nm.axis(name, ndim)`, for
  the arrays it names an axis for).
  Single-process: every array is brought to this host.
  """
  directory = os.path.abspath(directory)
  arrays, meta = {}, {}
  for keys, x in nested_items(tree):
    name = "/".join(keys)
    x = np.asarray(jax.device_get(x))
    dense = x.nbytes
    nnz = int(np.count_nonzero(x))
    options = {"bitmask": nnz * x.itemsize + math.ceil(x.size / 8)}
    axis = nm.axis(name, x.ndim) if nm is not None and x.ndim >= 2 and nm.m <= 16 else None
    if axis is not None and _nm_fits(x, nm, axis):
      groups = x.size // nm.m
      options["nm"] = groups * nm.n * x.itemsize + math.ceil(groups * _patterns(nm.n, nm.m)[2] / 8)
    fmt = min(options, key=options.get)
    if x.ndim == 0 or options[fmt] >= dense:
      arrays[name] = x
      continue
    info = {"format": fmt, "shape": list(x.shape), "dtype": str(x.dtype)}
    if nnz == 0:  # nothing to store (orbax cannot write empty arrays)
      info["format"] = "zeros"
    elif fmt == "bitmask":
      nonzero = x.reshape(-1) != 0
      arrays[name + "#bits"] = np.packbits(nonzero)
      arrays[name + "#values"] = x.reshape(-1)[nonzero]
    else:
      groups = _nm_groups(x, nm.m, axis)
      pos = np.argsort(groups == 0, axis=-1, kind="stable")[..., : nm.n]  # non-zeros first
      pos = np.sort(pos, axis=-1)
      _, lookup, bits = _patterns(nm.n, nm.m)
      arrays[name + "#values"] = np.take_along_axis(groups, pos, -1).reshape(-1)
      arrays[name + "#pattern"] = _pack_bits(lookup[(1 << pos).sum(-1)], bits)
      info.update(n=nm.n, m=nm.m, axis=axis)
    meta[name] = info
  save_arrays(directory, arrays, meta, "sparse.json")


def load(directory: str) -> dict:
  """The dense nested dict `save` wrote (exactly the saved values)."""
  arrays, meta = load_arrays(directory, "sparse.json")
  out = {}
  for name, info in meta.items():
    if info["format"] == "zeros":
      out = set_new(out, tuple(name.split("/")), jnp.zeros(info["shape"], info["dtype"]))
  for name, x in arrays.items():
    base, _, part = name.partition("#")
    if part and part != "values":
      continue
    if base not in meta:
      out = set_new(out, tuple(base.split("/")), jnp.asarray(x))
      continue
    info = meta[base]
    shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
    values = np.asarray(x, dtype)
    if info["format"] == "bitmask":
      nonzero = np.unpackbits(np.asarray(arrays[base + "#bits"]))[: math.prod(shape)].astype(bool)
      dense = np.zeros(math.prod(shape), dtype)
      dense[nonzero] = values
      dense = dense.reshape(shape)
    else:
      n, m, axis = info["n"], info["m"], info["axis"]
      moved = np.moveaxis(np.zeros(shape, dtype), axis, -1).shape
      groups = np.zeros((*moved[:-1], moved[-1] // m, m), dtype)
      combos, _, bits = _patterns(n, m)
      count = values.size // n
      pos = combos[_unpack_bits(np.asarray(arrays[base + "#pattern"]), bits, count)]
      pos = pos.reshape(*groups.shape[:-1], n)
      np.put_along_axis(groups, pos, values.reshape(pos.shape), -1)
      dense = np.moveaxis(groups.reshape(moved), -1, axis)
    out = set_new(out, tuple(base.split("/")), jnp.asarray(dense))
  return out
