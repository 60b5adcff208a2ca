"""LoRA (Hu et al. 2021): a frozen kernel W plus a trained low-rank update, y = x W + s x A B,
s = alpha / r, A [in, r] random, B [r, out] zero at init (the model starts as the base).

The adapters enter through the models' dot_general hook, wrapping whatever dot_general the
layer already has (a quantized one: QLoRA's frozen quantized base, or QAT's fake-quantized
one), so the base path and its variables do not move:

    factory = lora.lora_dot(r"attn/(query|key|value|out)|mlp", rank=8, alpha=16)
    model = models.build(cfg, dot_general_cls=factory)                       # float base
    model = models.build(cfg, dot_general_cls=lora.lora_dot(sel, 8, 16, inner=quant_factory))

A selected layer `<path>` gets params `<path>/lora/a` [*in, r] and `<path>/lora/b` [r, *out],
named with its kernel's logical axes (the rank axis is `lora_rank`), so they shard like the
kernel; with scanned layers every leaf stacks the layers on axis 0, as the kernel does.
`trains(path)` says which leaves an optimizer should see (the adapters); `merge` folds them
into the kernels (the plain model again), `unmerge` takes them back out. `quantize_base` is
QLoRA's frozen base: every selected kernel rounded to NF4 (or int4) in blocks along its input.
"""

import math
import re

import numpy as np

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from compress.quant import nf4
from compress.tree import load_arrays, nested_items, save_arrays, set_new

ADAPTER = "lora"  # the adapters' subtree under each selected layer
RANK_AXIS = "lora_rank"  # the rank axis' logical name (no rule maps it: replicated)
WEIGHT = "kernel"


def check(rank: int, alpha: float, dropout: float = 0.0, key: str = "lora") -> None:
  """Range checks of the adapters' settings, naming the config key and the fix."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"{key}.rank={rank!r}: the rank must be a positive integer (e.g. 8).")
  if not alpha > 0:
    raise ValueError(f"{key}.alpha={alpha!r}: alpha must be > 0 (the scale is alpha / rank).")
  if not 0 <= dropout < 1:
    raise ValueError(f"{key}.dropout={dropout!r}: a dropout rate lies in [0, 1).")


def _uniform_in(fan_in: int):
  """PEFT's A init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Lora(nn.Module):
  """The adapter path s * (dropout(x) A) B of one dense layer; built by `lora_dot` inside the
  layer's scope (so it is `<layer>/lora`). Dropout runs when a "dropout" rng is given."""

  select: str  # a regex over the layer's path (re.search): the others get no adapter
  rank: int
  alpha: float
  dropout: float = 0.0

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers):
    """s (x A) B, or None where the layer is not selected."""
    (lc, rc), (lb, rb) = dimension_numbers
    layer = "/".join(self.scope.path[:-1])
    if not re.search(self.select, layer):
      return None
    n_in = len(rc)
    if lb or rb or tuple(rc) != tuple(range(n_in)):
      raise ValueError(
        f"lora.select matched {layer}, whose dot is not a dense layer's (kernel contracted on "
        "its leading axes): leave it out of lora.select."
      )
    in_shape, out_shape = rhs.shape[:n_in], rhs.shape[n_in:]
    if self.rank > min(math.prod(in_shape), math.prod(out_shape)):
      raise ValueError(
        f"lora.rank={self.rank} exceeds {layer}'s kernel {tuple(rhs.shape)}: the rank must be "
        f"at most min(in, out) = {min(math.prod(in_shape), math.prod(out_shape))}."
      )
    names = self._names(rhs.ndim)
    a = self.param(
      "a",
      nn.with_logical_partitioning(_uniform_in(math.prod(in_shape)), names[:n_in] + (RANK_AXIS,)),
      in_shape + (self.rank,),
      jnp.float32,
    )
    b = self.param(
      "b",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), (RANK_AXIS,) + names[n_in:]),
      (self.rank,) + out_shape,
      jnp.float32,
    )
    x = lhs
    if self.dropout and self.has_rng("dropout"):
      x = nn.Dropout(self.dropout, deterministic=False)(x)
    xa = lax.dot_general(x, a.astype(x.dtype), ((lc, tuple(range(n_in))), ((), ())))
    y = lax.dot_general(xa, b.astype(x.dtype), (((xa.ndim - 1,), (0,)), ((), ())))
    return (self.alpha / self.rank) * y

  def _names(self, ndim):
    """The calling layer's kernel's logical names (None each where it has none)."""
    box = self.parent.scope.get_variable("params", WEIGHT) if self.parent else None
    names = getattr(box, "names", None)
    return tuple(names) if names is not None and len(names) == ndim else (None,) * ndim


def lora_dot(select: str, rank: int, alpha: float, dropout: float = 0.0, inner=None):
  """A dot_general factory: the layers whose path matches `select` (re.search on
  "layers_0/attn/query") get an adapter added to `inner`'s dot (default lax.dot_general)."""
  check(rank, alpha, dropout)
  re.compile(select)

  def make():  # runs in the calling layer's scope: the adapter is `<layer>/lora`
    base = lax.dot_general if inner is None else inner()
    adapter = Lora(select, rank, alpha, dropout, name=ADAPTER)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
      y = base(lhs, rhs, dimension_numbers, precision, preferred_element_type)
      delta = adapter(lhs, rhs, dimension_numbers)
      return y if delta is None else y + delta.astype(y.dtype)

    return dot_general

  return make


def trains(path: str) -> bool:
  """Whether a "/"-joined parameter path is an adapter's (what a LoRA run trains)."""
  return f"/{ADAPTER}/" in f"/{path}"


def adapters(params: dict) -> dict:
  """The adapters' subtree of `params` (same nesting, only the `lora` dicts)."""
  out = {}
  for keys, leaf in nested_items(params):
    if ADAPTER in keys:
      out = set_new(out, keys, leaf)
  return out


def _delta(a, b, kernel_ndim):
  """s-free A B in the kernel's layout; a stacked pair (one leading layer axis) per layer."""
  if a.ndim + b.ndim - 2 == kernel_ndim:
    return jnp.tensordot(a, b, 1)
  return jax.vmap(lambda x, y: jnp.tensordot(x, y, 1))(a, b)


def _layers(params, prefix=()):
  """(keys, layer dict) of every dict holding both a kernel and an adapter."""
  if isinstance(params, dict):
    if ADAPTER in params and WEIGHT in params:
      yield prefix, params
    for k, v in params.items():
      if k != ADAPTER:
        yield from _layers(v, prefix + (k,))


def adapted_kernels(params: dict):
  """("layers_0/attn/query/kernel", kernel) of every layer that has an adapter."""
  for keys, layer in _layers(params):
    yield "/".join(keys + (WEIGHT,)), layer[WEIGHT]


def merge(params: dict, alpha: float) -> dict:
  """W + alpha / r * A B for every adapted layer, the adapters removed: the plain model's
  params (r read from A's last axis)."""
  out = params
  for keys, layer in _layers(params):
    a, b, w = layer[ADAPTER]["a"], layer[ADAPTER]["b"], layer[WEIGHT]
    merged = w + (alpha / a.shape[-1]) * _delta(a, b, w.ndim).astype(w.dtype)
    new = {k: v for k, v in layer.items() if k != ADAPTER}
    out = set_new(out, keys, {**new, WEIGHT: merged})
  return out


def unmerge(params: dict, lora: dict, alpha: float) -> dict:
  """The inverse of `merge`: W - alpha / r * A B, and the adapters `lora` put back."""
  out = params
  for keys, layer in _layers(_graft(params, lora)):
    a, b, w = layer[ADAPTER]["a"], layer[ADAPTER]["b"], layer[WEIGHT]
    base = w - (alpha / a.shape[-1]) * _delta(a, b, w.ndim).astype(w.dtype)
    out = set_new(out, keys, {**layer, WEIGHT: base})
  return out


def _graft(params, lora):
  out = params
  for keys, leaf in nested_items(lora):
    out = set_new(out, keys, leaf)
  return out


def check_block(shape, n_in: int, block: int, path: str, key: str = "lora.block") -> None:
  """The block size must divide a kernel's input size (the blocks run along the input)."""
  fan_in = math.prod(shape[:n_in])
  if fan_in % block:
    raise ValueError(
      f"{key}={block} does not divide the input size {fan_in} of {path} {tuple(shape)}: "
      "choose a block size that divides every selected kernel's input (e.g. 64 or 32)."
    )


def round_blockwise(w, n_in: int, fmt: str, block: int, stacked: bool = False):
  """w rounded to `fmt` ("nf4": QLoRA's NF4 with double-quantized block scales; "int4":
  symmetric absmax int4 codes in [-7, 7]) in blocks of `block` along its input axes (a
  torch Linear's weight [out, in] flattened, as bitsandbytes blocks it), back to float."""
  if stacked:
    return jax.vmap(lambda x: round_blockwise(x, n_in, fmt, block))(w)
  fan_in = math.prod(w.shape[:n_in])
  w_OxI = w.reshape(fan_in, -1).T
  if fmt == "nf4":
    r_OxI = nf4.nf4_roundtrip(w_OxI, block)
  elif fmt == "int4":
    blocks = w_OxI.reshape(-1, block).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    step = jnp.where(absmax > 0, absmax / 7, 1.0)
    r_OxI = (jnp.clip(jnp.round(blocks / step), -7, 7) * step).reshape(w_OxI.shape)
  else:
    raise ValueError(f"lora.base={fmt!r}: choose 'float', 'nf4' or 'int4'.")
  return r_OxI.T.reshape(w.shape).astype(w.dtype)


def quantize_base(params: dict, fmt: str, block: int, n_in, stacked: str | None = None) -> dict:
  """QLoRA's frozen base: the kernel of every adapted layer rounded with `round_blockwise`.
  `n_in(path, ndim)` gives a kernel's number of input axes; `stacked` (a regex) the paths
  whose leaves stack scanned layers on axis 0. Bad block sizes raise before any rounding."""
  if fmt == "float":
    return params
  layers = list(_layers(params))
  plans = []
  for keys, layer in layers:
    path = "/".join(keys + (WEIGHT,))
    st = bool(stacked and re.search(stacked, path))
    w = layer[WEIGHT]
    k = n_in(path, w.ndim - st)
    check_block(w.shape[st:], k, block, path)
    plans.append((keys, layer, k, st))
  out = params
  for keys, layer, k, st in plans:
    rounded = round_blockwise(layer[WEIGHT], k, fmt, block, st)
    out = set_new(out, keys, {**layer, WEIGHT: rounded})
  return out


def _nf4_pack(w, n_in: int, block: int) -> dict:
  """One kernel as NF4 storage: 4-bit codes two a byte in blocks along its input (the layout
  of `round_blockwise`), int8 double-quantized block scales, their block scales and mean."""
  w_OxI = w.reshape(math.prod(w.shape[:n_in]), -1).T
  codes, absmax = nf4.quantize(w_OxI, block)
  scale_codes, scale, mean = nf4.quantize_scales(absmax)
  return dict(codes=nf4.pack(codes), scale_codes=scale_codes, scale=scale, mean=mean)


def _nf4_unpack(a: dict, shape, n_in: int):
  fan_in = math.prod(shape[:n_in])
  n = math.prod(shape)
  absmax = nf4.dequantize_scales(a["scale_codes"], a["scale"], a["mean"])
  w_OxI = nf4.dequantize(nf4.unpack(a["codes"], n), absmax, (n // fan_in, fan_in))
  return w_OxI.T.reshape(shape)


def save_nf4_base(directory: str, params: dict, block: int, n_in, stacked: str | None = None):
  """The adapted layers' kernels stored as NF4 (about 4.13 bits a weight with blocks of 64:
  `nf4.bits_per_parameter`), under `directory` (orbax arrays + nf4.json). Their values are
  those `quantize_base(params, "nf4", ...)` holds; the other leaves are not written (the
  adapters, embeddings and norms travel in the run's checkpoint or the PEFT files)."""
  arrays, meta = {}, {"block": block, "kernels": {}}
  for keys, layer in _layers(params):
    path = "/".join(keys + (WEIGHT,))
    st = bool(stacked and re.search(stacked, path))
    w = layer[WEIGHT]
    k = n_in(path, w.ndim - st)
    pack = (lambda f: jax.vmap(f) if st else f)(lambda x: _nf4_pack(x, k, block))
    packed = jax.jit(pack)(w)
    for name, a in packed.items():
      arrays[f"{path}/{name}"] = np.asarray(a)
    meta["kernels"][path] = {"shape": list(w.shape), "n_in": k, "stacked": st}
  save_arrays(directory, arrays, meta, "nf4.json")


def load_nf4_base(directory: str, params: dict) -> dict:
  """`params` with every kernel `save_nf4_base` stored read back (dequantized to float32)."""
  arrays, meta = load_arrays(directory, "nf4.json")
  out = params
  for path, m in meta["kernels"].items():
    parts = {
      n: jnp.asarray(arrays[f"{path}/{n}"]) for n in ("codes", "scale_codes", "scale", "mean")
    }
    shape = tuple(m["shape"])
    if m["stacked"]:
      w = jax.jit(jax.vmap(lambda a: _nf4_unpack(a, shape[1:], m["n_in"])))(parts)
    else:
      w = jax.jit(lambda a: _nf4_unpack(a, shape, m["n_in"]))(parts)
    out = set_new(out, tuple(path.split("/")), w)
  return out
