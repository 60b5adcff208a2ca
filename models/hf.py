"""Hugging Face checkpoints in and out: BERT, GPT-2, Llama, Mistral and Qwen2.

    model, params = models.hf.from_pretrained("path/to/bert", head="classify", num_labels=2)
    logits = model.apply({"params": params}, input_ids, attention_mask=mask)
    models.hf.save_pretrained(model.config, params, "/tmp/export")  # transformers loads it

A checkpoint is a directory with config.json and model.safetensors or pytorch_model.bin
(or their sharded `*.index.json` form), or a Hub name when the machine is online. Tensors
are read one at a time (safetensors are memory-mapped), converted to our layout and placed
with `jax.make_array_from_callback`, so with `mesh=` each device receives only its shard
and the host holds one checkpoint tensor at a time, never the whole model. Nothing here
needs torch except reading a pytorch_model.bin. The file formats (safetensors, .bin, sharded)
are models/hf_files.py.

Each family is one `Family` in FAMILIES (models/hf_families.py): its architectures, the
ModelConfig fields all its models share, its config.json keys, and its tensors as modules
(our path, HF name, kind).
Our parameter tree maps 1:1 onto HF names (models/transformer.py). Module kinds: "embed" (a
table), "norm" (scale, and bias for LayerNorm), "dense" (torch [out, in], transposed) and
"conv1d" (GPT-2's [in, out]) with a bias where the config has one, "classifier" (a head's
nn.Linear: "dense" with a bias always, as Llama's `score` on a body without biases), "qkv"
(GPT-2's fused c_attn, cut into query/key/value), "param" (a tensor as is) and "unembed" (an
untied output kernel). Everything below the table is generic over the family.

Heads: "lm" (*ForCausalLM, GPT2LMHeadModel, and the bare bodies of decoders), "mlm", "classify"
(BertForSequenceClassification), "span" (BertForQuestionAnswering), "tokens"
(*ForTokenClassification) and "none" (BertModel).
"""

import dataclasses
import json
import logging
import math
import os
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.hf_files import Checkpoint, _write_safetensors, resolve  # noqa: F401 (re-exported)
from models.hf_families import (  # noqa: F401 (re-exported: the family table and config.json)
  ACTIVATIONS,
  ARCHITECTURES,
  FAMILIES,
  HF_ACTIVATIONS,
  IGNORED,
  Family,
  architecture,
  config_from_hf,
  family_of,
  hf_config,
)
from models.transformer import build

log = logging.getLogger(__name__)

# ---- the tensor mapping ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One of our parameters and the HF tensor it comes from."""

  path: tuple[str, ...]  # ours, e.g. ("layers_0", "attn", "query", "kernel")
  key: str  # HF name, e.g. "bert.encoder.layer.0.attention.self.query.weight"
  kind: str = "copy"  # "copy" | "vector" | "linear" | "conv1d"
  n_in: int = 1  # our kernel's leading input axes ([H, D, E] out projections: 2)
  part: tuple[int, int] | None = None  # (i, n): i-th of n equal slices of the output axis

  def hf_shape(self, shape: tuple) -> tuple:
    """The checkpoint's shape for our `shape`."""
    n = self.part[1] if self.part else 1
    if self.kind == "copy":
      return tuple(shape)
    if self.kind == "vector":
      return (n * math.prod(shape),)
    fan_in, fan_out = math.prod(shape[: self.n_in]), n * math.prod(shape[self.n_in :])
    return (fan_out, fan_in) if self.kind == "linear" else (fan_in, fan_out)

  def to_ours(self, x: np.ndarray, shape: tuple) -> np.ndarray:
    if self.part:
      i, n = self.part
      axis = 1 if self.kind == "conv1d" else 0
      x = np.split(x, n, axis=axis)[i]
    return (x.T if self.kind == "linear" else x).reshape(shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "vector":
      return x.reshape(-1)
    if self.kind in ("linear", "conv1d"):
      x = x.reshape(math.prod(x.shape[: self.n_in]), -1)
      return x.T if self.kind == "linear" else x
    return x


def _dense(cfg, path, key, kind, part=None, bias=False):
  """A kernel and, where the config has one (or `bias`), its bias (Qwen2: query, key and value
  only)."""
  n_in = 2 if path[-1] == "out" else 1  # attn/out's kernel is [H, D, E]
  bias = bias or cfg.use_bias or (cfg.qkv_bias and path[-1] in ("query", "key", "value"))
  out = [Tensor((*path, "kernel"), key + ".weight", kind, n_in, part)]
  return out + [Tensor((*path, "bias"), key + ".bias", "vector", part=part)] if bias else out


def _module(cfg: ModelConfig, path: str, key: str, kind: str) -> list[Tensor]:
  """The tensors of one module: our path ("layers_0/attn/query"), its HF name and kind."""
  path = tuple(path.split("/"))
  if kind == "embed":
    return [Tensor((*path, "embedding"), key + ".weight")]
  if kind == "param":
    return [Tensor(path, key)]
  if kind == "norm":
    out = [Tensor((*path, "scale"), key + ".weight")]
    return out + [Tensor((*path, "bias"), key + ".bias")] if cfg.norm == "layernorm" else out
  if kind == "unembed":
    return [] if cfg.tie_embeddings else [Tensor((*path, "kernel"), key + ".weight", "linear")]
  if kind == "qkv":  # GPT-2's c_attn: query, key and value side by side
    names = ("query", "key", "value")
    return [t for j, n in enumerate(names) for t in _dense(cfg, (*path, n), key, "conv1d", (j, 3))]
  if kind == "classifier":  # a head's nn.Linear: a bias whatever the body has
    return _dense(cfg, path, key, "linear", bias=True)
  return _dense(cfg, path, key, "linear" if kind == "dense" else kind)


def tensors(cfg: ModelConfig, family: str, base: str) -> list[Tensor]:
  """Every parameter of an unscanned model of `cfg` and its HF tensor; `base` is the body's
  prefix ("bert.", "transformer.", "model." or "" for a bare body checkpoint)."""
  f = FAMILIES[family]
  layers = [
    (f"layers_{i}/{p}", f.layer.format(i) + k, kind)
    for i in range(cfg.n_layers)
    for p, k, kind in f.block
  ]
  body = [(p, base + k, kind) for p, k, kind in (*f.body, *layers, *f.final)]
  heads = [(p, k.format(b=base), kind) for p, k, kind in f.heads.get(cfg.head, ())]
  return [t for module in body + heads for t in _module(cfg, *module)]


def _head_keys(family: str, base: str) -> tuple[set, set]:
  """(our head parameters, their HF names) across the family's heads."""
  modules = [m for ms in FAMILIES[family].heads.values() for m in ms]
  return {p.split("/")[0] for p, _, _ in modules}, {k.format(b=base) for _, k, _ in modules}


# ---- loading --------------------------------------------------------------------------------


def _stored_key(ckpt: Checkpoint, key: str) -> str | None:
  """The name a tensor has in the checkpoint (old BERT files say LayerNorm gamma/beta)."""
  if key in ckpt.files:
    return key
  for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
    if key.endswith(new) and key[: -len(new)] + old in ckpt.files:
      return key[: -len(new)] + old
  return None


def _plan(ckpt: Checkpoint, cfg: ModelConfig, flat: dict) -> dict:
  """path -> [(Tensor, stored key), one per layer], for every leaf of `flat` (our params,
  flattened) the checkpoint provides; None for a head the checkpoint lacks. Every missing,
  unexpected or misshapen tensor is an error here, before any tensor is read."""
  _, family, ckpt_head = architecture(ckpt.config)
  differ = {k: v for k, v in FAMILIES[family].layout.items() if getattr(cfg, k) != v}
  if differ:
    raise ValueError(f"{ckpt.directory} holds a {family} checkpoint, which needs {differ}")
  prefix = FAMILIES[family].prefix
  base = prefix if any(k.startswith(prefix) for k in ckpt.files) else ""
  specs = {t.path: t for t in tensors(cfg, family, base)}
  head_params, head_keys = _head_keys(family, base)
  is_head = lambda k: any(k == h or k.startswith(h + ".") for h in head_keys)  # noqa: E731
  plan, missing, shapes = {}, [], []
  for path, leaf in flat.items():
    scanned = path[0] == "layers"
    per_layer = [(f"layers_{i}", *path[1:]) for i in range(cfg.n_layers)] if scanned else [path]
    if per_layer[0] not in specs:
      continue  # ours alone (quantizer step sizes, a distillation projection)
    layers = [(specs[p], _stored_key(ckpt, specs[p].key)) for p in per_layer]
    absent = [t.key for t, k in layers if k is None]
    if absent:
      if path[0] in head_params and cfg.head != ckpt_head:
        plan[path] = None  # a new head, e.g. a classifier on a pretrained encoder
      else:
        missing.append(f"{absent[0]} (for {'/'.join(path)})")
      continue
    shape = leaf.shape[1:] if scanned else leaf.shape
    for t, k in layers:
      if ckpt.shape(k) != t.hf_shape(shape):
        shapes.append(
          f"{k} has shape {ckpt.shape(k)}, but {'/'.join(path)} {tuple(shape)} needs "
          f"{t.hf_shape(shape)}"
        )
    plan[path] = layers
  used = {k for layers in plan.values() if layers for _, k in layers}
  unexpected = [
    k
    for k in ckpt.files
    if k not in used
    and not any(re.fullmatch(p, k) for p in IGNORED)
    and not is_head(k)  # another head's (e.g. BertModel's pooler): unused
  ]
  unused = [k for k in ckpt.files if k not in used and is_head(k)]
  if unused:
    log.info("%s: head weights not used by a %r head: %s", ckpt.directory, cfg.head, unused)
  problems = [
    ("missing weights", missing),
    ("unexpected weights", unexpected),
    ("shape mismatches", shapes),
  ]
  problems = [
    f"{what}: {', '.join(items[:8])}" + (" ..." if len(items) > 8 else "")
    for what, items in problems
    if items
  ]
  if problems:
    raise ValueError(
      f"{ckpt.directory} does not fit a {family} model of {cfg.n_layers} layers, d_model "
      f"{cfg.d_model}, head {cfg.head!r}: " + "; ".join(problems) + ". Check that config.json "
      "matches the weights and that overrides do not change the architecture."
    )
  return plan


def _place(ckpt: Checkpoint, layers: list, shape: tuple, scanned: bool, sharding) -> jax.Array:
  """One parameter, read from the checkpoint into `sharding` (default: the default device).
  Each device's callback reads what its shard needs; a scanned stack is read one layer's
  tensor at a time, so the host never holds more than one checkpoint tensor and one shard."""
  layer_shape = shape[1:] if scanned else shape

  def read(i, index):
    t, key = layers[i]
    return t.to_ours(ckpt.get(key), layer_shape)[index]

  if scanned:
    fetch = lambda index: np.stack([read(i, index[1:]) for i in range(shape[0])[index[0]]])  # noqa: E731
  else:
    whole = read(0, ())
    fetch = lambda index: whole[index]  # noqa: E731
  if sharding is None:
    return jnp.asarray(fetch((slice(None),) * len(shape)))
  return jax.make_array_from_callback(shape, sharding, fetch)


def load_params(ckpt: "Checkpoint | str", cfg: ModelConfig, target: dict, shardings=None):
  """Our params for `cfg`, read from an HF checkpoint (a Checkpoint, directory or Hub name).

  `target` is our param tree: arrays, or jax.ShapeDtypeStruct (e.g. from jax.eval_shape).
  Leaves the checkpoint provides are read into `shardings` (a matching tree of
  jax.sharding.Sharding; None: the default device); array leaves it does not provide (a new
  head, quantizer step sizes) are kept. Returns (params, names of the kept leaves).
  """
  ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(resolve(ckpt))
  flat = traverse_util.flatten_dict(target)
  place = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  plan = _plan(ckpt, cfg, flat)
  out, kept = {}, []
  for path, leaf in flat.items():
    if plan.get(path):
      out[path] = _place(ckpt, plan[path], leaf.shape, path[0] == "layers", place.get(path))
    elif isinstance(leaf, jax.ShapeDtypeStruct):
      raise ValueError(f"{'/'.join(path)} is not in {ckpt.directory} and has no initial value")
    else:
      out[path], _ = leaf, kept.append("/".join(path))
  return traverse_util.unflatten_dict(out), kept


def from_pretrained(path_or_name: str, *, head=None, mesh=None, rules=(), seed=0, **overrides):
  """(model, params) for an HF checkpoint: a local directory, or a Hub name when online.

  `head` ("mlm", "classify", "span", "tokens", "none"; decoders "lm", "tokens") defaults to the
  checkpoint's own (its architectures[0]: BertForQuestionAnswering is "span"); a head
  it lacks (a classifier on a pretrained encoder) is initialized from `seed`. `overrides`
  are ModelConfig fields (scan_layers, dtype, num_labels, attention_impl, ...). With `mesh`
  (and logical-axis `rules`, e.g. parallel.get_rules("fsdp_tp")) every parameter is placed
  straight into its sharding.
  """
  ckpt = Checkpoint(resolve(path_or_name))
  cfg = config_from_hf(ckpt.config, head, **overrides)
  model = build(cfg)
  ids = jnp.zeros((1, 1), jnp.int32)
  init = lambda rng: model.init(rng, ids)["params"]  # noqa: E731
  boxed = jax.eval_shape(init, jax.random.key(seed))
  target = traverse_util.flatten_dict(nn.unbox(boxed))
  shardings = None
  if mesh is not None:
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    for path, sharding in traverse_util.flatten_dict(shardings).items():
      try:
        sharding.shard_shape(target[path].shape)
      except ValueError as e:
        raise ValueError(
          f"{'/'.join(path)} {target[path].shape} does not split over the mesh as the rules "
          f"ask ({sharding.spec}): use rules that leave that axis unsharded, or mesh axes "
          f"that divide it ({e})"
        ) from None
  new = [p for p, layers in _plan(ckpt, cfg, target).items() if layers is None]
  if new:  # only the new head's initializers run (XLA drops the rest of the init)
    place = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    fresh = jax.jit(
      lambda rng: [traverse_util.flatten_dict(nn.unbox(init(rng)))[p] for p in new],
      out_shardings=[place.get(p) for p in new] if place else None,
    )(jax.random.key(seed))
    target.update(zip(new, fresh))
    log.warning(
      "%s has no %s head: initialized %s", path_or_name, cfg.head, ["/".join(p) for p in new]
    )
  params, _ = load_params(ckpt, cfg, traverse_util.unflatten_dict(target), shardings)
  return model, params


# ---- export ---------------------------------------------------------------------------------


def _host(x) -> np.ndarray:
  """A (possibly multi-host sharded) array on this host, one tensor at a time."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float32)


def save_pretrained(cfg: ModelConfig, params: dict, directory: str):
  """Writes config.json and model.safetensors that transformers' from_pretrained loads.

  Scanned or unscanned params; parameters HF has no place for (quantizer step sizes, a
  distillation projection) are left out and named in the log. The files appear complete
  or not at all (written aside, then renamed). Multi-host: every process calls it, the
  first writes.
  """
  family = family_of(cfg)
  base = "" if cfg.head == "none" else FAMILIES[family].prefix  # a bare body has no prefix
  flat = traverse_util.flatten_dict(params)
  flat_left = set(flat)
  parts: dict[str, list] = {}
  for t in tensors(cfg, family, base):
    scanned = t.path[0].startswith("layers_") and ("layers", *t.path[1:]) in flat
    if scanned:
      leaf, index = flat[("layers", *t.path[1:])], int(t.path[0][len("layers_") :])
      shape, get = leaf.shape[1:], lambda leaf=leaf, index=index: _host(leaf[index])
    else:
      leaf = flat[t.path]
      shape, get = leaf.shape, lambda leaf=leaf: _host(leaf)
    parts.setdefault(t.key, []).append((t, shape, get))
    flat_left.discard(("layers", *t.path[1:]) if scanned else t.path)

  def fetch(items):
    xs = [t.to_hf(get()) for t, _, get in items]
    axis = 1 if items[0][0].kind == "conv1d" else 0
    return xs[0] if len(xs) == 1 else np.concatenate(xs, axis=axis)

  out = {
    key: (items[0][0].hf_shape(items[0][1]), lambda items=items: fetch(items))
    for key, items in parts.items()
  }
  if flat_left:
    left = sorted("/".join(p) for p in flat_left)
    log.warning("save_pretrained leaves out parameters HF has no place for: %s", left)
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, n) for n in ("model.safetensors", "config.json")]
  _write_safetensors(out, paths[0] + ".tmp")
  if jax.process_index() == 0:
    with open(paths[1] + ".tmp", "w") as f:
      json.dump(hf_config(cfg), f, indent=2)
    for path in paths:
      os.replace(path + ".tmp", path)
