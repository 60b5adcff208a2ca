"""A student initialized from its teacher by a layer map (DistilBERT: every other layer)."""

import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layers_(\d+)$")


def _depth(params: dict) -> int:
  if "layers" in params:  # scanned: every leaf stacks the layers on axis 0
    return jax.tree.leaves(params["layers"])[0].shape[0]
  return sum(1 for k in params if _LAYER.fullmatch(k))


def _layer(params: dict, i: int):
  if "layers" in params:
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


def _check_shapes(path: str, new, old):
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(old)):
    if a.shape != b.shape:
      raise ValueError(
        f"{path}{jax.tree_util.keystr(p)}: the teacher's {a.shape} does not fit the student's "
        f"{b.shape}; a student initialized from its teacher needs the teacher's widths."
      )


def init_from_teacher(student: dict, teacher: dict, layer_map: dict) -> dict:
  """The student's params with layer i copied from teacher layer layer_map[i], and every
  non-layer parameter (embeddings, norms, heads) copied from the teacher. Student layers
  the map leaves out keep their values. Scanned (`layers`) and unscanned (`layers_i`)
  layouts mix freely. Pure: returns a new tree."""
  n_s, n_t = _depth(student), _depth(teacher)
  for s, t in layer_map.items():
    if not 0 <= s < n_s or not 0 <= t < n_t:
      raise ValueError(
        f"layer_map {s} -> {t} points past the depth of the student ({n_s} layers) or "
        f"the teacher ({n_t} layers)."
      )
  out = {}
  for key, value in student.items():
    if key == "layers" or _LAYER.fullmatch(key):
      continue
    if key not in teacher:
      raise ValueError(f"The student's {key!r} has no counterpart in the teacher.")
    _check_shapes(key, teacher[key], value)
    out[key] = teacher[key]
  layers = [layer_map.get(i) for i in range(n_s)]
  new = [_layer(student, i) if t is None else _layer(teacher, t) for i, t in enumerate(layers)]
  for i, layer in enumerate(new):
    _check_shapes(f"layers_{i}", layer, _layer(student, i))
  if "layers" in student:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *new)
  else:
    out.update({f"layers_{i}": layer for i, layer in enumerate(new)})
  return out
