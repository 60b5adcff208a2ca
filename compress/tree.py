"""Small helpers over parameter pytrees shared by `quant` and `prune`."""

import json
import os

import jax
import orbax.checkpoint as ocp


def path_name(path) -> str:
  """The "a/b/c" of the dict keys of a key path (skipping e.g. the `.value` of flax boxes),
  so a leaf has the same name boxed (at init) and unboxed (in the train step)."""
  keys = tuple(k for k in path if isinstance(k, jax.tree_util.DictKey))
  return jax.tree_util.keystr(keys, simple=True, separator="/")


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


def save_arrays(directory: str, arrays: dict, meta: dict, meta_file: str):
  """A flat {name: numpy array} with orbax under <directory>/arrays, `meta` as JSON beside."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, "arrays"), arrays, force=True)
  with open(os.path.join(directory, meta_file), "w") as f:
    json.dump(meta, f, indent=1)


def load_arrays(directory: str, meta_file: str) -> tuple[dict, dict]:
  """(arrays, meta) as `save_arrays` wrote them."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, meta_file)) as f:
    meta = json.load(f)
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(os.path.join(directory, "arrays")), meta
