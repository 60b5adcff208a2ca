"""Hugging Face checkpoints in and out: BERT, GPT-2 and Llama-family decoders.

    model, params = models.hf.from_pretrained("path/to/bert", head="classify", num_labels=2)
    logits = model.apply({"params": params}, input_ids, attention_mask=mask)
    models.hf.save_pretrained(model.config, params, "/tmp/export")  # transformers loads it

A checkpoint is a directory with config.json and model.safetensors or pytorch_model.bin
(or their sharded `*.index.json` form), or a Hub name when the machine is online. Tensors
are read one at a time (safetensors are memory-mapped), converted to our layout and placed
with `jax.make_array_from_callback`, so with `mesh=` each device receives only its shard
and the host holds one checkpoint tensor at a time, never the whole model. Nothing here
needs torch except reading a pytorch_model.bin.

Our parameter tree maps 1:1 onto HF names (models/transformer.py); `TENSORS` below is the
whole mapping. Kinds: "copy" (same shape), "vector" (a bias flattened over heads),
"linear" (torch [out, in], transposed) and "conv1d" (GPT-2's [in, out]); GPT-2's fused
c_attn is cut into query/key/value by `part`.
"""

import dataclasses
import glob
import json
import logging
import math
import os
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ModelConfig
from models.transformer import build

log = logging.getLogger(__name__)

# architectures[0] of config.json -> (family, our head)
ARCHITECTURES = {
  "BertModel": ("bert", "none"),
  "BertForMaskedLM": ("bert", "mlm"),
  "BertForPreTraining": ("bert", "mlm"),
  "BertForSequenceClassification": ("bert", "classify"),
  "GPT2Model": ("gpt2", "lm"),
  "GPT2LMHeadModel": ("gpt2", "lm"),
  "LlamaModel": ("llama", "lm"),
  "LlamaForCausalLM": ("llama", "lm"),
}
EXPORT_ARCH = {
  ("bert", "none"): "BertModel",
  ("bert", "mlm"): "BertForMaskedLM",
  ("bert", "classify"): "BertForSequenceClassification",
  ("gpt2", "lm"): "GPT2LMHeadModel",
  ("llama", "lm"): "LlamaForCausalLM",
}
BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", "llama": "model."}
HEAD_PARAMS = ("mlm_head", "pooler", "classifier", "lm_head")
ACTIVATIONS = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "silu": "silu",
  "swish": "silu",
  "relu": "relu",
}
# Checkpoint tensors that are buffers or tied copies, never weights of ours.
IGNORED = (
  r"(.*\.)?embeddings\.position_ids",
  r"cls\.seq_relationship\..*",  # BERT's next-sentence head
  r"cls\.predictions\.decoder\.(weight|bias)",  # tied to the embeddings and cls.predictions.bias
  r"(.*\.)?h\.\d+\.attn\.(masked_)?bias",  # GPT-2's causal-mask buffers
  r"(.*\.)?rotary_emb\.inv_freq",
)


# ---- reading and writing tensors ----------------------------------------------------------

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class _Safetensors:
  """One .safetensors file, memory-mapped: an 8-byte header size, a JSON header, raw data."""

  def __init__(self, path):
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    self.path, self.start, self.header = path, 8 + size, header

  def shape(self, key):
    return tuple(self.header[key]["shape"])

  def get(self, key):
    info = self.header[key]
    begin, _ = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    return np.memmap(self.path, dtype, "r", self.start + begin, tuple(info["shape"]))


class _TorchBin:
  """One pytorch_model.bin, memory-mapped by torch (needs torch: pip install -e '.[hf]')."""

  def __init__(self, path):
    import torch  # only here: safetensors need no torch

    self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    self.header = self.tensors

  def shape(self, key):
    return tuple(self.tensors[key].shape)

  def get(self, key):
    t = self.tensors[key]
    return t.float().numpy() if t.is_floating_point() else t.numpy()


class Checkpoint:
  """The config and tensors of an HF checkpoint directory; tensors are read on demand."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "config.json")) as f:
      self.config = json.load(f)
    self.directory, self.files = directory, {}
    for single, index, reader in (
      ("model.safetensors", "model.safetensors.index.json", _Safetensors),
      ("pytorch_model.bin", "pytorch_model.bin.index.json", _TorchBin),
    ):
      if os.path.exists(os.path.join(directory, index)):
        with open(os.path.join(directory, index)) as f:
          names = sorted(set(json.load(f)["weight_map"].values()))
      elif os.path.exists(os.path.join(directory, single)):
        names = [single]
      else:
        continue
      readers = [reader(os.path.join(directory, n)) for n in names]
      self.files = {k: r for r in readers for k in r.header}
      return
    raise FileNotFoundError(
      f"{directory} has config.json but no model.safetensors, pytorch_model.bin or their "
      "*.index.json: save the model with save_pretrained, or point at the directory that has them."
    )

  def keys(self):
    return self.files.keys()

  def shape(self, key):
    return self.files[key].shape(key)

  def get(self, key) -> np.ndarray:
    return np.asarray(self.files[key].get(key), np.float32)


def _write_safetensors(tensors: dict, path: str):
  """{name: (shape, fetch)} as float32 to a .safetensors file, fetching one tensor at a time.
  Every process fetches (a sharded array gathers collectively); the first one writes."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, (shape, _) in tensors.items():
    nbytes = math.prod(shape) * 4
    header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  writer = jax.process_index() == 0
  with open(path, "wb") if writer else open(os.devnull, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for shape, fetch in tensors.values():
      x = fetch()
      assert x.shape == tuple(shape), (x.shape, shape)
      f.write(np.ascontiguousarray(x, np.float32).tobytes())


def resolve(path_or_name: str) -> str:
  """A local checkpoint directory, or a Hub name downloaded (weights and configs only)."""
  if os.path.isdir(path_or_name):
    return path_or_name
  if os.path.sep in path_or_name.strip("/").split("/", 1)[-1] or path_or_name.startswith("."):
    raise FileNotFoundError(f"no checkpoint directory {path_or_name!r}")
  try:
    from huggingface_hub import snapshot_download

    for weights in ("*.safetensors*", "*.bin*"):
      directory = snapshot_download(path_or_name, allow_patterns=["*.json", weights])
      if glob.glob(os.path.join(directory, weights)):
        return directory
    return directory
  except Exception as e:  # offline, unknown repo, no huggingface_hub
    raise OSError(
      f"{path_or_name!r} is not a local directory and could not be fetched from the Hugging "
      f"Face Hub ({type(e).__name__}: {e}). Offline, pass a directory holding config.json and "
      "model.safetensors (e.g. written by save_pretrained)."
    ) from e


# ---- configs --------------------------------------------------------------------------------


def architecture(hf: dict) -> tuple[str, str, str]:
  """(architecture name, family, head) of an HF config.json, or a clear error."""
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise ValueError(
      f"Unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}): "
      f"supported are {sorted(ARCHITECTURES)}."
    )
  return (arch, *ARCHITECTURES[arch])


def _unsupported(field, value, why):
  raise ValueError(f"config.json has {field}={value!r}, which trimformer does not support: {why}")


def _activation(name):
  if name not in ACTIVATIONS:
    _unsupported("activation", name, f"choose one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def config_from_hf(hf: dict, head: str | None = None, **overrides) -> ModelConfig:
  """Our ModelConfig for an HF config.json (a dict); `head` and `overrides` replace fields."""
  _, family, ckpt_head = architecture(hf)
  if family == "bert":
    if hf.get("position_embedding_type", "absolute") != "absolute":
      _unsupported("position_embedding_type", hf["position_embedding_type"], "only absolute")
    fields = dict(
      kind="encoder",
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      d_ff=hf["intermediate_size"],
      max_len=hf["max_position_embeddings"],
      norm_eps=hf.get("layer_norm_eps", 1e-12),
      activation=_activation(hf.get("hidden_act", "gelu")),
      type_vocab_size=hf.get("type_vocab_size", 2),
      tie_embeddings=hf.get("tie_word_embeddings", True),
      num_labels=len(hf.get("id2label") or {}) or hf.get("num_labels", 2),
    )
  elif family == "gpt2":
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if hf.get(field):
        _unsupported(field, hf[field], "set it to false")
    if not hf.get("scale_attn_weights", True):
      _unsupported("scale_attn_weights", False, "attention is scaled by 1/sqrt(head_dim)")
    fields = dict(
      vocab_size=hf["vocab_size"],
      d_model=hf["n_embd"],
      n_layers=hf["n_layer"],
      n_heads=hf["n_head"],
      d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
      max_len=hf["n_positions"],
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      activation=_activation(hf.get("activation_function", "gelu_new")),
      tie_embeddings=hf.get("tie_word_embeddings", True),
    )
  else:  # llama
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      _unsupported("rope type", rope.get("rope_type", rope.get("type")), "only default RoPE")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
      _unsupported("attention_bias / mlp_bias", (hf["attention_bias"], hf["mlp_bias"]), "equal")
    fields = dict(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      d_ff=hf["intermediate_size"],
      max_len=hf.get("max_position_embeddings", 2048),
      norm="rmsnorm",
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      positions="rotary",
      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
      activation=_activation(hf.get("hidden_act", "silu")),
      gated_mlp=True,
      use_bias=hf.get("attention_bias", False),
      tie_embeddings=hf.get("tie_word_embeddings", False),
    )
  return ModelConfig(**{**fields, "head": head or ckpt_head, **overrides})


def family_of(cfg: ModelConfig) -> str:
  """The HF family a config exports to, or an error naming the field that prevents it."""
  want = {
    "bert": dict(kind="encoder", norm="layernorm", positions="learned", gated_mlp=False),
    "gpt2": dict(kind="decoder", norm="layernorm", positions="learned", gated_mlp=False),
    "llama": dict(kind="decoder", norm="rmsnorm", positions="rotary", gated_mlp=True),
  }
  for family, fields in want.items():
    if all(getattr(cfg, k) == v for k, v in fields.items()):
      break
  else:
    raise ValueError(
      f"No HF architecture matches kind={cfg.kind} norm={cfg.norm} positions={cfg.positions} "
      f"gated_mlp={cfg.gated_mlp}: BERT, GPT-2 and Llama layouts are {want}."
    )
  if family != "llama" and (not cfg.use_bias or cfg.resolved_kv_heads != cfg.n_heads):
    raise ValueError(f"{family} needs use_bias=True and n_kv_heads == n_heads")
  if family == "gpt2" and cfg.activation not in ("gelu", "gelu_tanh", "relu", "silu"):
    raise ValueError(f"GPT-2 has no activation {cfg.activation!r}")
  return family


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers reads for our config (inverse of config_from_hf)."""
  family = family_of(cfg)
  act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}[cfg.activation]
  common = dict(architectures=[EXPORT_ARCH[family, cfg.head]], model_type=family)
  common.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
  if family == "bert":
    labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}}
    return dict(
      **common,
      **(labels if cfg.head == "classify" else {}),
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      intermediate_size=cfg.d_ff,
      hidden_act=act,
      max_position_embeddings=cfg.max_len,
      type_vocab_size=cfg.type_vocab_size,
      layer_norm_eps=cfg.norm_eps,
      hidden_dropout_prob=cfg.dropout_rate,
      attention_probs_dropout_prob=cfg.dropout_rate,
      pad_token_id=0,
    )
  if family == "gpt2":
    return dict(
      **common,
      n_embd=cfg.d_model,
      n_layer=cfg.n_layers,
      n_head=cfg.n_heads,
      n_inner=cfg.d_ff,
      n_positions=cfg.max_len,
      layer_norm_epsilon=cfg.norm_eps,
      activation_function=act,
      resid_pdrop=cfg.dropout_rate,
      embd_pdrop=cfg.dropout_rate,
      attn_pdrop=cfg.dropout_rate,
    )
  return dict(
    **common,
    hidden_size=cfg.d_model,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.resolved_kv_heads,
    head_dim=cfg.resolved_head_dim,
    intermediate_size=cfg.d_ff,
    max_position_embeddings=cfg.max_len,
    rms_norm_eps=cfg.norm_eps,
    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    rope_theta=cfg.rope_theta,
    hidden_act=act,
    attention_bias=cfg.use_bias,
    mlp_bias=cfg.use_bias,
  )


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


def _norm(path, key, bias=True):
  out = [Tensor((*path, "scale"), key + ".weight")]
  return out + [Tensor((*path, "bias"), key + ".bias")] if bias else out


def _dense(path, key, kind="linear", n_in=1, bias=True, part=None):
  out = [Tensor((*path, "kernel"), key + ".weight", kind, n_in, part)]
  return out + [Tensor((*path, "bias"), key + ".bias", "vector", part=part)] if bias else out


def tensors(cfg: ModelConfig, family: str, base: str) -> list[Tensor]:
  """Every parameter of an unscanned model of `cfg` and its HF tensor; `base` is the body's
  prefix ("bert.", "transformer.", "model." or "" for a bare body checkpoint)."""
  b, out = base, []
  if family == "bert":
    e = f"{b}embeddings."
    out += [
      Tensor(("embed", "embedding"), e + "word_embeddings.weight"),
      Tensor(("pos_embed", "embedding"), e + "position_embeddings.weight"),
      Tensor(("type_embed", "embedding"), e + "token_type_embeddings.weight"),
      *_norm(("embed_norm",), e + "LayerNorm"),
    ]
    for i in range(cfg.n_layers):
      p, k = f"layers_{i}", f"{b}encoder.layer.{i}."
      for name in ("query", "key", "value"):
        out += _dense((p, "attn", name), k + f"attention.self.{name}")
      out += _dense((p, "attn", "out"), k + "attention.output.dense", n_in=2)
      out += _norm((p, "attn_norm"), k + "attention.output.LayerNorm")
      out += _dense((p, "mlp", "wi"), k + "intermediate.dense")
      out += _dense((p, "mlp", "wo"), k + "output.dense")
      out += _norm((p, "mlp_norm"), k + "output.LayerNorm")
    if cfg.head == "mlm":
      out += _dense(("mlm_head", "transform"), "cls.predictions.transform.dense")
      out += _norm(("mlm_head", "norm"), "cls.predictions.transform.LayerNorm")
      out.append(Tensor(("mlm_head", "bias"), "cls.predictions.bias"))
      if not cfg.tie_embeddings:
        out += _dense(("mlm_head", "decoder"), "cls.predictions.decoder", bias=False)
    if cfg.head == "classify":
      out += _dense(("pooler",), f"{b}pooler.dense") + _dense(("classifier",), "classifier")
    return out
  if family == "gpt2":
    out += [Tensor(("embed", "embedding"), f"{b}wte.weight")]
    out += [Tensor(("pos_embed", "embedding"), f"{b}wpe.weight")]
    for i in range(cfg.n_layers):
      p, k = f"layers_{i}", f"{b}h.{i}."
      out += _norm((p, "attn_norm"), k + "ln_1")
      for j, name in enumerate(("query", "key", "value")):
        out += _dense((p, "attn", name), k + "attn.c_attn", "conv1d", part=(j, 3))
      out += _dense((p, "attn", "out"), k + "attn.c_proj", "conv1d", n_in=2)
      out += _norm((p, "mlp_norm"), k + "ln_2")
      out += _dense((p, "mlp", "wi"), k + "mlp.c_fc", "conv1d")
      out += _dense((p, "mlp", "wo"), k + "mlp.c_proj", "conv1d")
    out += _norm(("final_norm",), f"{b}ln_f")
  else:  # llama
    bias = cfg.use_bias
    out += [Tensor(("embed", "embedding"), f"{b}embed_tokens.weight")]
    for i in range(cfg.n_layers):
      p, k = f"layers_{i}", f"{b}layers.{i}."
      out += _norm((p, "attn_norm"), k + "input_layernorm", bias=False)
      for name, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out += _dense((p, "attn", name), k + f"self_attn.{hf_name}", bias=bias)
      out += _dense((p, "attn", "out"), k + "self_attn.o_proj", n_in=2, bias=bias)
      out += _norm((p, "mlp_norm"), k + "post_attention_layernorm", bias=False)
      for name, hf_name in (("wg", "gate_proj"), ("wi", "up_proj"), ("wo", "down_proj")):
        out += _dense((p, "mlp", name), k + f"mlp.{hf_name}", bias=bias)
    out += _norm(("final_norm",), f"{b}norm", bias=False)
  if not cfg.tie_embeddings:
    out += _dense(("lm_head",), "lm_head", bias=False)
  return out


# ---- loading --------------------------------------------------------------------------------


def _stored_key(ckpt: Checkpoint, key: str) -> str | None:
  """The name a tensor has in the checkpoint (old BERT files say LayerNorm gamma/beta)."""
  if key in ckpt.files:
    return key
  for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
    if key.endswith(new) and key[: -len(new)] + old in ckpt.files:
      return key[: -len(new)] + old
  return None


def _is_head_key(key: str, base: str) -> bool:
  return key.startswith(("cls.", "classifier.", "lm_head.", f"{base}pooler."))


def _plan(ckpt: Checkpoint, cfg: ModelConfig, flat: dict) -> dict:
  """path -> [(Tensor, stored key), one per layer], for every leaf of `flat` (our params,
  flattened) the checkpoint provides; None for a head the checkpoint lacks. Every missing,
  unexpected or misshapen tensor is an error here, before any tensor is read."""
  _, family, ckpt_head = architecture(ckpt.config)
  if family != family_of(cfg):
    raise ValueError(
      f"{ckpt.directory} holds a {family} checkpoint; this config is {family_of(cfg)}"
    )
  prefix = BASE_PREFIX[family]
  base = prefix if any(k.startswith(prefix) for k in ckpt.files) else ""
  specs = {t.path: t for t in tensors(cfg, family, base)}
  plan, missing, shapes = {}, [], []
  for path, leaf in flat.items():
    scanned = path[0] == "layers"
    per_layer = [(f"layers_{i}", *path[1:]) for i in range(cfg.n_layers)] if scanned else [path]
    if per_layer[0] not in specs:
      continue  # ours alone (quantizer step sizes, a distillation projection)
    layers = [(specs[p], _stored_key(ckpt, specs[p].key)) for p in per_layer]
    absent = [t.key for t, k in layers if k is None]
    if absent:
      if path[0] in HEAD_PARAMS and cfg.head != ckpt_head:
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
    and not _is_head_key(k, base)  # another head's (e.g. BertModel's pooler): unused
  ]
  unused = [k for k in ckpt.files if k not in used and _is_head_key(k, base)]
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

  `head` ("mlm", "classify", "none"; decoders "lm") defaults to the checkpoint's own; a head
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
  arch = EXPORT_ARCH.get((family, cfg.head))
  base = "" if arch == "BertModel" else BASE_PREFIX[family]
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
