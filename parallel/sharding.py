"""Shardings from logical names, and initialization straight into them.

`init_sharded` never materializes an unsharded copy: it traces the init with
`jax.eval_shape`, reads the logical names the model attached to each leaf
(`nn.with_logical_partitioning`), maps them to mesh axes with the rules, and then
jits the init with those `out_shardings`, so each device only ever allocates its shard.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

PyTree = Any


def logical_to_shardings(boxed_tree: PyTree, mesh: jax.sharding.Mesh, rules) -> PyTree:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes.

  Unboxed leaves are replicated. A dimension that its mesh axes do not divide is an
  error naming the leaf, its shape and the fix (we do not silently replicate: a
  surprise replication is a surprise out-of-memory at scale).
  """
  # A box around an empty node (optax's MaskedNode, in the state of a masked transform
  # initialized from boxed params) has nothing to shard: drop the box.
  boxed_tree = jax.tree.map(
    lambda x: x.value if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x.value) else x,
    boxed_tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  specs = nn.get_partition_spec(boxed_tree)
  # Leaf by leaf: empty pytree nodes that are tuples (MaskedNode) stay nodes.
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, rules), specs, is_leaf=is_spec)
  values = nn.unbox(boxed_tree)

  bad = []  # (path, the error): every leaf is checked, the parameters reported first

  def check(path, leaf, spec):
    spec = spec if isinstance(spec, P) else P()
    shape = getattr(leaf, "shape", ())
    for dim, axes in zip(shape, tuple(spec)):
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = 1
      for a in axes:
        size *= mesh.shape[a] if a is not None else 1
      if dim % size:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        mesh_keys = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes if a)
        bad.append(
          f"{name} has shape {tuple(shape)}: its dimension {dim} is sharded over {mesh_keys} "
          f"(total {size}), which does not divide it. Change the mesh, or the model size, or "
          "map that logical axis to None in the rules."
        )
        return None
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(check, values, mesh_specs, is_leaf=lambda x: x is None)
  if bad:  # a parameter's name says more than its optimizer moment's ("opt/1/0/.mu/...")
    params = [b for b in bad if b.startswith("params")]
    raise ValueError((params or bad)[0])
  return out


def shard_shapes(init_fn: Callable[..., PyTree], mesh: jax.sharding.Mesh, rules, *args):
  """(ShapeDtypeStructs carrying their shardings, NamedShardings) of `init_fn(*args)`: no FLOPs."""
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_to_shardings(boxed, mesh, rules)
  return abstract_with_shardings(nn.unbox(boxed), shardings), shardings


def init_sharded(
  init_fn: Callable[..., PyTree], mesh: jax.sharding.Mesh, rules, *args
) -> tuple[PyTree, PyTree]:
  """Runs `init_fn(*args)` (which may return boxed leaves) directly into its shardings.

  Returns (unboxed tree, tree of NamedShardings).
  """
  _, shardings = shard_shapes(init_fn, mesh, rules, *args)
  with nn.logical_axis_rules(rules):
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying shardings: the restore target for checkpoints."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, ...] input: the leading axis over the rules' "batch" axes."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, spec)


def process_batch_slice(sharding: NamedSharding) -> tuple[int, int]:
  """(index, count): this process feeds slice `index` of `count` equal slices of the batch.

  What a process must feed to `jax.make_array_from_process_local_data` is the rows its
  devices hold, which is not always slice `jax.process_index()` of `jax.process_count()`:
  with the batch replicated over an axis that spans processes (tensor parallelism across
  hosts) several processes hold, and must feed, the same rows; a TPU mesh in physical
  order need not hand process i the i-th block.
  """
  n = len(sharding.device_set)  # a nominal batch size that every batch sharding divides
  held = {
    (idx[0].start or 0, n if idx[0].stop is None else idx[0].stop)
    for idx in sharding.addressable_devices_indices_map((n,)).values()
  }
  lo, hi = min(a for a, _ in held), max(b for _, b in held)
  rows = hi - lo
  if sum(b - a for a, b in held) != rows or n % rows or lo % rows:
    raise ValueError(
      f"Process {jax.process_index()} holds batch rows {sorted(held)} of a nominal {n}: not "
      "one contiguous aligned block, so it cannot feed one slice of the global batch. Order "
      "the mesh's devices so that each process's devices hold neighbouring batch shards."
    )
  return lo // rows, n // rows
