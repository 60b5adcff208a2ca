"""Small helpers over parameter pytrees shared by `quant` and `prune`."""

import os

import jax


def path_name(path) -> str:
  """The "a/b/c" of the dict keys of a key path (skipping e.g. the `.value` of flax boxes),
  so a leaf has the same name boxed (at init) and unboxed (in the train step)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def nested_items(tree, prefix=()):
  """(keys, leaf) for every leaf of a nested dict."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from nested_items(v, prefix + (k,))
  else:
    yield prefix, tree


def set_new(tree: dict, keys: tuple, value) -> dict:
  """A copy of nested dict `tree` with `keys` set (creating the dicts on the way)."""
  if len(keys) == 1:
    return {**tree, keys[0]: value}
  return {**tree, keys[0]: set_new(tree.get(keys[0], {}), keys[1:], value)}


def disk_bytes(directory: str) -> int:
  """Total size of the files under `directory`."""
  return sum(
    os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files
  )
