"""A student initialized from its teacher by a layer map (DistilBERT: every other layer)."""

import re

import jax
import jax.numpy as jnp


def _is_layer(key: str, layers: str) -> bool:
  return key == layers or re.fullmatch(re.escape(layers) + r"_\d+", key) is not None


def _depth(params: dict, layers: str) -> int:
  if layers in params:  # scanned: every leaf stacks the layers on axis 0
    return jax.tree.leaves(params[layers])[0].shape[0]
  return sum(1 for k in params if _is_layer(k, layers))


def _layer(params: dict, i: int, layers: str):
  if layers in params:
    return jax.tree.map(lambda x: x[i], params[layers])
  return params[f"{layers}_{i}"]


def _check_shapes(path: str, new, old):
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(old)):
    if a.shape != b.shape:
      raise ValueError(
        f"{path}{jax.tree_util.keystr(p)}: the teacher's {a.shape} does not fit the student's "
        f"{b.shape}; a student initialized from its teacher needs the teacher's widths."
      )


def init_from_teacher(student: dict, teacher: dict, layer_map: dict, layers: str) -> dict:
  """The student's params with layer i copied from teacher layer layer_map[i], and every
  non-layer parameter (embeddings, norms, heads) copied from the teacher. Student layers
  the map leaves out keep their values. `layers` is the top-level key of the layers (the
  model's `Structure.layers`): scanned, one subtree `{layers}` stacking them on axis 0;
  unscanned, `{layers}_{i}`. The two layouts mix freely. Pure: returns a new tree."""
  n_s, n_t = _depth(student, layers), _depth(teacher, layers)
  if not n_s or not n_t:
    raise ValueError(
      f"No layers under {layers!r} (nor {layers}_0, ...) in the "
      f"{'student' if not n_s else 'teacher'}: pass the key its layers sit under. "
      f"Top-level keys: {sorted(student if not n_s else teacher)}"
    )
  for s, t in layer_map.items():
    if not 0 <= s < n_s or not 0 <= t < n_t:
      raise ValueError(
        f"layer_map {s} -> {t} points past the depth of the student ({n_s} layers) or "
        f"the teacher ({n_t} layers)."
      )
  out = {}
  for key, value in student.items():
    if _is_layer(key, layers):
      continue
    if key not in teacher:
      raise ValueError(f"The student's {key!r} has no counterpart in the teacher.")
    _check_shapes(key, teacher[key], value)
    out[key] = teacher[key]
  mapped = [layer_map.get(i) for i in range(n_s)]
  new = [
    _layer(student, i, layers) if t is None else _layer(teacher, t, layers)
    for i, t in enumerate(mapped)
  ]
  for i, layer in enumerate(new):
    _check_shapes(f"{layers}_{i}", layer, _layer(student, i, layers))
  if layers in student:
    out[layers] = jax.tree.map(lambda *xs: jnp.stack(xs), *new)
  else:
    out.update({f"{layers}_{i}": layer for i, layer in enumerate(new)})
  return out
