"""Conversion for serving: integer weight codes + scales, saved really smaller on disk.

    serving = convert(convert_model.apply, variables, example_ids)   # int8/int4 kernels
    save(directory, serving)                                        # int4 packed 2 per byte
    serving = load(directory)
    logits = serve_model.apply(serving, ids)                        # int8 x int8 -> int32 dots

`convert` runs the model once in QuantDot's "convert" mode: every quantized layer computes
its weight codes and scales; each layer's float `kernel` is replaced by its codes (int8,
or native int4 for <= 4 bits) and the scales go to the "quant" collection. A tied output
layer keeps its float table (the embedding lookup needs it) and quantizes it on the fly.

`storage_bits` additionally stores the remaining float matrices (`matrices`, a regex from the
model's side: embedding tables, float heads) per row at that width; `load` dequantizes them,
so they serve in float with that rounding (the one difference from the fake-quant model,
which keeps them exact).

`sparse=True` (a pruned model: Deep Compression's prune + quantize) stores each integer code
array that is mostly zeros as a bitmask of its non-zeros plus their codes (int4 packed two
per byte), whenever that is smaller.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from compress.quant import quantizers as qz
from compress.quant.dot_general import WEIGHT
from compress.tree import (  # noqa: F401 (disk_bytes re-exported)
  disk_bytes,
  load_arrays,
  nested_items,
  save_arrays,
  set_new,
)


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _set(tree, keys, value):
  """A copy of nested dict `tree` with `keys` set to value (only the path is copied)."""
  if not keys:
    return value
  return {**tree, keys[0]: _set(tree[keys[0]], keys[1:], value)}


def convert(apply_fn, variables: dict, *args, **kwargs) -> dict:
  """Serving variables from trained ones, by one forward in "convert" mode.

  `apply_fn` is the model built with QuantDot(mode="convert") (same policy as in
  training); `args`/`kwargs` are any valid input (e.g. one token), only traced shapes
  matter. Returns {"params": kernels as integer codes, "quant": scales, ...}.
  """
  variables = jax.tree.map(lambda x: x, variables)  # shallow copy of plain dicts
  _, out = apply_fn(variables, *args, mutable=["quant"], **kwargs)
  params, quant = variables["params"], {}
  for keys, value in nested_items(out["quant"]):
    if keys[-1] != "w_int":
      quant = set_new(quant, keys, value)
      continue
    kernel_keys = keys[:-2] + (WEIGHT,)  # .../layer/QuantDot_0/w_int -> .../layer/kernel
    try:
      kernel = _get(params, kernel_keys)
    except (KeyError, TypeError):
      continue  # a tied table: stays float, quantized on the fly with its stored scale
    if kernel.shape == value.shape:
      params = _set(params, kernel_keys, value)
  return {**variables, "params": params, "quant": quant}


def _pack_int4(x) -> np.ndarray:
  """int4 codes -> uint8, two per byte (low nibble first), flattened; padded if odd."""
  flat = np.asarray(x.astype(jnp.int8)).reshape(-1).astype(np.int16)
  flat = np.concatenate([flat, np.zeros(flat.size % 2, np.int16)]) & 0xF
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def _unpack_int4(packed, shape) -> jax.Array:
  packed = jnp.asarray(packed)
  nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1).astype(jnp.int8)
  nibbles = jnp.where(nibbles > 7, nibbles - 16, nibbles)  # sign-extend
  return nibbles[: int(np.prod(shape))].reshape(shape).astype(jnp.int4)


def _storable(keys, x, matrices: re.Pattern) -> bool:
  """Float weight matrices (`matrices`: embedding tables, float kernels) may be stored at
  storage_bits; scales, step sizes, biases and norms never are."""
  return (
    keys[0] == "params"
    and matrices.search("/".join(keys[1:])) is not None
    and jnp.issubdtype(x.dtype, jnp.floating)
    and x.ndim >= 2
  )


def _sparse_codes(arrays, meta, name, x) -> bool:
  """Stores integer codes `x` as bitmask + non-zero codes if that is smaller; whether it did."""
  codes = np.asarray(x.astype(jnp.int8))
  nonzero = codes.reshape(-1) != 0
  int4 = x.dtype == jnp.int4
  nnz = int(nonzero.sum())
  size = -(-codes.size // 8) + (-(-nnz // 2) if int4 else nnz)
  if size >= (-(-codes.size // 2) if int4 else codes.size) or nnz == 0:
    return False
  values = codes.reshape(-1)[nonzero]
  arrays[name + "#bits"] = np.packbits(nonzero)
  arrays[name + "#nz"] = _pack_int4(values) if int4 else values
  meta["sparse"][name] = {"shape": list(x.shape), "int4": bool(int4), "nnz": nnz}
  return True


def save(
  directory: str,
  serving: dict,
  storage_bits: int | None = None,
  sparse: bool = False,
  matrices: str | None = None,
):
  """Writes serving variables: int4 packed two per byte, other arrays as they are.

  `storage_bits` (2..8): the float weight matrices whose parameter path `matrices` matches
  (a regex, e.g. r"(kernel|embedding)$": embedding tables, kernels left float) are stored as
  per-row symmetric codes plus float32 row scales; `load` dequantizes them.
  `sparse`: integer codes that are mostly zeros as a bitmask + the non-zero codes.
  """
  if storage_bits is not None:
    qz.check_bits(storage_bits, "storage_bits")
    if not matrices:
      raise ValueError(
        "save(storage_bits=...) needs `matrices`: a regex of the parameter paths of the float "
        "weight matrices to store at that width (e.g. the model's kernels and embeddings)."
      )
  pattern = re.compile(matrices or "$^")
  directory = os.path.abspath(directory)
  arrays, meta = {}, {"int4": {}, "stored": {}, "sparse": {}}
  for keys, x in nested_items(serving):
    name = "/".join(keys)
    x = jax.device_get(x)
    if sparse and x.dtype in (jnp.int4, jnp.int8) and x.ndim >= 2:
      if _sparse_codes(arrays, meta, name, x):
        continue
    if x.dtype == jnp.int4:
      arrays[name] = _pack_int4(x)
      meta["int4"][name] = list(x.shape)
    elif storage_bits is not None and _storable(keys, x, pattern):
      lo, hi = qz.calibrate(x, (-1,), bits=storage_bits, symmetric=True)
      scale, _ = qz.scale_zero(lo, hi, storage_bits, True)
      codes = qz.quantize(x, scale, None, storage_bits, True).astype(jnp.int8)
      if storage_bits <= 4:
        arrays[name + "#codes"] = _pack_int4(codes)
      else:
        arrays[name + "#codes"] = np.asarray(codes)
      arrays[name + "#scale"] = np.asarray(scale, np.float32)
      meta["stored"][name] = {"shape": list(x.shape), "bits": storage_bits, "dtype": str(x.dtype)}
    else:
      arrays[name] = np.asarray(x)
  save_arrays(directory, arrays, meta, "format.json")


def load(directory: str) -> dict:
  """Serving variables as `save` wrote them (int4 unpacked, stored matrices dequantized)."""
  arrays, meta = load_arrays(directory, "format.json")
  out = {}
  for name, x in arrays.items():
    base, _, part = name.partition("#")
    if part in ("scale", "bits"):
      continue
    if part == "nz":
      info = meta["sparse"][base]
      nonzero = np.unpackbits(np.asarray(arrays[base + "#bits"]))[: int(np.prod(info["shape"]))]
      values = np.asarray(x)
      if info["int4"]:
        values = np.asarray(_unpack_int4(values, (info["nnz"],)).astype(jnp.int8))
      dense = np.zeros(nonzero.size, np.int8)
      dense[nonzero.astype(bool)] = values
      value = jnp.asarray(dense.reshape(info["shape"]))
      value = value.astype(jnp.int4) if info["int4"] else value
    elif part == "codes":
      info = meta["stored"][base]
      codes = x if info["bits"] > 4 else _unpack_int4(x, info["shape"])
      value = qz.dequantize(codes, jnp.asarray(arrays[base + "#scale"]))
      value = value.astype(info["dtype"])
    elif name in meta["int4"]:
      value = _unpack_int4(x, meta["int4"][name])
    else:
      value = jnp.asarray(x)
    out = set_new(out, tuple(base.split("/")), value)
  return out
