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

Each family is one `Family` in FAMILIES: its architectures, the ModelConfig fields all its
models share, its config.json keys, and its tensors as modules (our path, HF name, kind).
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
from collections.abc import Callable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.config import SPAN_OUTPUTS, ModelConfig
from models.hf_files import Checkpoint, _write_safetensors, resolve  # noqa: F401 (re-exported)
from models.transformer import build

log = logging.getLogger(__name__)

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}
ACTIVATIONS = {hf: ours for ours, hf in HF_ACTIVATIONS.items()}  # HF hidden_act -> ours
ACTIVATIONS.update(gelu_pytorch_tanh="gelu_tanh", swish="silu")
# Checkpoint tensors that are buffers or tied copies, never weights of ours.
IGNORED = (
  r"(.*\.)?embeddings\.position_ids",
  r"cls\.seq_relationship\..*",  # BERT's next-sentence head
  r"cls\.predictions\.decoder\.(weight|bias)",  # tied to the embeddings and cls.predictions.bias
  r"(.*\.)?h\.\d+\.attn\.(masked_)?bias",  # GPT-2's causal-mask buffers
  r"(.*\.)?rotary_emb\.inv_freq",
)


def _unsupported(field, value, why):
  raise ValueError(f"config.json has {field}={value!r}, which trimformer does not support: {why}")


# ---- the families ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model family: how its config.json and tensors map onto ours."""

  name: str  # config.json's model_type
  architectures: dict  # HF architecture -> our head; a head exports as its first architecture
  prefix: str  # the body's tensor prefix under a head ("bert.", "model."); a bare body has none
  layout: dict  # ModelConfig fields every model of the family has
  keys: dict  # our field -> config.json key, or (key, default: a value or a function of it)
  body: tuple  # modules before the layers: (our path, HF name, kind)
  layer: str  # a layer's HF prefix, "{}" its index
  block: tuple  # the modules of one layer
  final: tuple = ()  # modules after the layers
  heads: dict = dataclasses.field(default_factory=dict)  # our head -> modules; "{b}": prefix
  only: dict = dataclasses.field(default_factory=dict)  # config.json key -> the value we support
  dropout: tuple = ()  # config.json keys written with our dropout_rate
  read: Callable[[dict], dict] = lambda hf: {}  # more fields from config.json, or a refusal
  write: Callable[[ModelConfig], dict] = lambda cfg: {}  # more config.json keys


# A "llama3" rope_parameters' keys; our fields are "rope_" + key.
LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_read(hf: dict) -> dict:
  """RoPE fields from rope_scaling (older files; first, as in transformers) or rope_parameters."""
  rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "llama3"):
    _unsupported("rope_type", kind, "RoPE is 'default' or 'llama3'")
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    _unsupported("partial_rotary_factor", partial, "rotary positions cover the whole head")
  fields = dict(rope_type=kind, rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if kind == "llama3":
    rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    missing = [k for k in LLAMA3 if k not in rope]
    if missing:
      _unsupported("rope_parameters", rope, f"llama3 RoPE needs {missing}")
    fields.update({f"rope_{k}": rope[k] for k in LLAMA3})
  return fields


def _rope_write(cfg: ModelConfig) -> dict:
  """rope_parameters (transformers 5) and, for llama3, rope_scaling (transformers 4)."""
  rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "default":
    return dict(rope_parameters=rope, rope_theta=cfg.rope_theta)
  rope.update({k: getattr(cfg, f"rope_{k}") for k in LLAMA3})
  return dict(rope_parameters=rope, rope_scaling=rope, rope_theta=cfg.rope_theta)


def _llama_read(hf: dict) -> dict:
  bias = hf.get("attention_bias", False)
  if bias != hf.get("mlp_bias", False):
    _unsupported("attention_bias / mlp_bias", (bias, hf.get("mlp_bias")), "they must be equal")
  return dict(**_rope_read(hf), use_bias=bias)


def _qwen2_read(hf: dict) -> dict:
  """Qwen2 slides its window (with use_sliding_window) over the layers from max_window_layers
  on, or over those layer_types names; we slide it over all layers or none."""
  window = (hf.get("sliding_window") if hf.get("use_sliding_window") else None) or 0
  start = hf.get("max_window_layers", 28)
  kinds = hf.get("layer_types") or [
    "sliding_attention" if window and i >= start else "full_attention"
    for i in range(hf["num_hidden_layers"])
  ]
  windows = {window if kind == "sliding_attention" else 0 for kind in kinds} or {0}
  if len(windows) > 1:
    why = "a sliding window on some layers only: slide it over all layers or none"
    _unsupported("use_sliding_window / max_window_layers / layer_types", (window, start), why)
  return dict(**_rope_read(hf), sliding_window=windows.pop())


def _qwen2_write(cfg: ModelConfig) -> dict:
  slide = dict(use_sliding_window=cfg.sliding_window > 0, max_window_layers=0)
  return dict(**_rope_write(cfg), **slide, sliding_window=cfg.sliding_window or None)


COMMON_KEYS = dict(
  vocab_size="vocab_size",
  d_model="hidden_size",
  n_layers="num_hidden_layers",
  n_heads="num_attention_heads",
  d_ff="intermediate_size",
  max_len="max_position_embeddings",
)
LLAMA_KEYS = dict(
  **COMMON_KEYS,
  n_kv_heads=("num_key_value_heads", lambda hf: hf["num_attention_heads"]),
  head_dim=("head_dim", lambda hf: hf["hidden_size"] // hf["num_attention_heads"]),
  norm_eps=("rms_norm_eps", 1e-6),
  activation=("hidden_act", "silu"),
  tie_embeddings=("tie_word_embeddings", False),
)
LEARNED = dict(norm="layernorm", positions="learned", gated_mlp=False, use_bias=True)
LEARNED.update(qkv_bias=False, sliding_window=0)
ROTARY = dict(kind="decoder", norm="rmsnorm", positions="rotary", gated_mlp=True)
LM_HEAD = {"lm": (("lm_head", "lm_head", "unembed"),)}
# A token classifier on the final norm's output (transformers' GenericForTokenClassification).
SCORE = {"tokens": (("classifier", "score", "classifier"),)}
# Our classifier always has a bias: a `score` without one (not transformers' default) is refused.
SCORE_ONLY = {"token_classification_bias": True}

LLAMA = Family(
  name="llama",
  architectures={
    "LlamaForCausalLM": "lm",
    "LlamaModel": "lm",
    "LlamaForTokenClassification": "tokens",
  },
  prefix="model.",
  layout=dict(**ROTARY, qkv_bias=False, sliding_window=0),  # use_bias: attention_bias
  keys={**LLAMA_KEYS, "max_len": ("max_position_embeddings", 2048)},
  body=(("embed", "embed_tokens", "embed"),),
  layer="layers.{}.",
  block=(
    ("attn_norm", "input_layernorm", "norm"),
    *((f"attn/{n}", f"self_attn.{n[0]}_proj", "dense") for n in ("query", "key", "value")),
    ("attn/out", "self_attn.o_proj", "dense"),
    ("mlp_norm", "post_attention_layernorm", "norm"),
    ("mlp/wg", "mlp.gate_proj", "dense"),
    ("mlp/wi", "mlp.up_proj", "dense"),
    ("mlp/wo", "mlp.down_proj", "dense"),
  ),
  final=(("final_norm", "norm", "norm"),),
  heads={**LM_HEAD, **SCORE},
  only=SCORE_ONLY,
  dropout=("classifier_dropout",),
  read=_llama_read,
  write=lambda cfg: dict(**_rope_write(cfg), attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias),
)
FAMILIES = {
  "bert": Family(
    name="bert",
    architectures={
      "BertModel": "none",
      "BertForMaskedLM": "mlm",
      "BertForPreTraining": "mlm",
      "BertForSequenceClassification": "classify",
      "BertForQuestionAnswering": "span",
      "BertForTokenClassification": "tokens",
    },
    prefix="bert.",
    layout=dict(kind="encoder", **LEARNED),
    keys=dict(
      **COMMON_KEYS,
      norm_eps=("layer_norm_eps", 1e-12),
      activation=("hidden_act", "gelu"),
      type_vocab_size=("type_vocab_size", 2),
      tie_embeddings=("tie_word_embeddings", True),
    ),
    body=(
      ("embed", "embeddings.word_embeddings", "embed"),
      ("pos_embed", "embeddings.position_embeddings", "embed"),
      ("type_embed", "embeddings.token_type_embeddings", "embed"),
      ("embed_norm", "embeddings.LayerNorm", "norm"),
    ),
    layer="encoder.layer.{}.",
    block=(
      *((f"attn/{n}", f"attention.self.{n}", "dense") for n in ("query", "key", "value")),
      ("attn/out", "attention.output.dense", "dense"),
      ("attn_norm", "attention.output.LayerNorm", "norm"),
      ("mlp/wi", "intermediate.dense", "dense"),
      ("mlp/wo", "output.dense", "dense"),
      ("mlp_norm", "output.LayerNorm", "norm"),
    ),
    heads={
      "mlm": (
        ("mlm_head/transform", "cls.predictions.transform.dense", "dense"),
        ("mlm_head/norm", "cls.predictions.transform.LayerNorm", "norm"),
        ("mlm_head/bias", "cls.predictions.bias", "param"),
        ("mlm_head/decoder", "cls.predictions.decoder", "unembed"),
      ),
      "classify": (("pooler", "{b}pooler.dense", "dense"), ("classifier", "classifier", "dense")),
      "span": (("qa_outputs", "qa_outputs", "dense"),),
      "tokens": (("classifier", "classifier", "dense"),),
    },
    only={"position_embedding_type": "absolute"},
    dropout=("hidden_dropout_prob", "attention_probs_dropout_prob"),
    write=lambda cfg: dict(pad_token_id=0),
  ),
  "gpt2": Family(
    name="gpt2",
    architectures={
      "GPT2LMHeadModel": "lm",
      "GPT2Model": "lm",
      "GPT2ForTokenClassification": "tokens",
    },
    prefix="transformer.",
    layout=dict(kind="decoder", **LEARNED),
    keys=dict(
      vocab_size="vocab_size",
      d_model="n_embd",
      n_layers="n_layer",
      n_heads="n_head",
      d_ff=("n_inner", lambda hf: 4 * hf["n_embd"]),
      max_len="n_positions",
      norm_eps=("layer_norm_epsilon", 1e-5),
      activation=("activation_function", "gelu_new"),
      tie_embeddings=("tie_word_embeddings", True),
    ),
    body=(("embed", "wte", "embed"), ("pos_embed", "wpe", "embed")),
    layer="h.{}.",
    block=(
      ("attn_norm", "ln_1", "norm"),
      ("attn", "attn.c_attn", "qkv"),
      ("attn/out", "attn.c_proj", "conv1d"),
      ("mlp_norm", "ln_2", "norm"),
      ("mlp/wi", "mlp.c_fc", "conv1d"),
      ("mlp/wo", "mlp.c_proj", "conv1d"),
    ),
    final=(("final_norm", "ln_f", "norm"),),
    heads={**LM_HEAD, "tokens": (("classifier", "classifier", "classifier"),)},
    only=dict(
      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False
    ),
    dropout=("resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout"),
  ),
  "llama": LLAMA,
  # Llama with a sliding window over all layers and no biases.
  "mistral": dataclasses.replace(
    LLAMA,
    name="mistral",
    architectures={
      "MistralForCausalLM": "lm",
      "MistralModel": "lm",
      "MistralForTokenClassification": "tokens",
    },
    layout=dict(**ROTARY, use_bias=False, qkv_bias=False),
    keys={**LLAMA_KEYS, "max_len": ("max_position_embeddings", 4096 * 32)},
    read=lambda hf: dict(**_rope_read(hf), sliding_window=hf.get("sliding_window") or 0),
    write=lambda cfg: dict(**_rope_write(cfg), sliding_window=cfg.sliding_window or None),
  ),
  # Llama with biases on q_proj, k_proj and v_proj only.
  "qwen2": dataclasses.replace(
    LLAMA,
    name="qwen2",
    architectures={
      "Qwen2ForCausalLM": "lm",
      "Qwen2Model": "lm",
      "Qwen2ForTokenClassification": "tokens",
    },
    layout=dict(**ROTARY, use_bias=False, qkv_bias=True),
    keys={**LLAMA_KEYS, "max_len": ("max_position_embeddings", 32768)},
    read=_qwen2_read,
    write=_qwen2_write,
  ),
}
ARCHITECTURES = {  # HF architecture -> (family, our head)
  arch: (f.name, head) for f in FAMILIES.values() for arch, head in f.architectures.items()
}


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


def _key(entry) -> tuple:
  """(config.json key, default) of a Family.keys entry; a bare key has no default."""
  return entry if isinstance(entry, tuple) else (entry, None)


def config_from_hf(hf: dict, head: str | None = None, **overrides) -> ModelConfig:
  """Our ModelConfig for an HF config.json (a dict); `head` and `overrides` replace fields."""
  _, name, ckpt_head = architecture(hf)
  family, fields = FAMILIES[name], {}
  for field, entry in family.keys.items():
    key, default = _key(entry)
    value = hf.get(key)
    if value is None:
      value = default(hf) if callable(default) else default
    if value is None:
      raise ValueError(f"config.json of a {name} model lacks {key!r}")
    fields[field] = value
  if fields["activation"] not in ACTIVATIONS:
    _unsupported("activation", fields["activation"], f"choose one of {sorted(ACTIVATIONS)}")
  fields["activation"] = ACTIVATIONS[fields["activation"]]
  for key, ok in family.only.items():
    if hf.get(key, ok) != ok:
      _unsupported(key, hf[key], f"only {ok!r}")
  head = head or ckpt_head
  # A "span" head has 2 outputs whatever the checkpoint's classifier had.
  labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)
  fields.update(num_labels=SPAN_OUTPUTS if head == "span" else labels)
  fields.update(family.layout, **family.read(hf), head=head)
  return ModelConfig(**{**fields, **overrides})


def family_of(cfg: ModelConfig) -> str:
  """The HF family a config exports to (the first whose layout it has), or an error naming
  the fields that prevent it."""
  misfits = []
  for family in FAMILIES.values():
    differ = {k: v for k, v in family.layout.items() if getattr(cfg, k) != v}
    if differ:
      misfits.append(f"{family.name} needs " + ", ".join(f"{k}={v!r}" for k, v in differ.items()))
      continue
    heads = (cfg.resolved_kv_heads, cfg.resolved_head_dim * cfg.n_heads)
    if "n_kv_heads" not in family.keys and heads != (cfg.n_heads, cfg.d_model):
      raise ValueError(f"{family.name} needs n_kv_heads == n_heads, head_dim == d_model / n_heads")
    return family.name
  raise ValueError("No HF architecture matches this config: " + "; ".join(misfits))


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json transformers reads for our config (inverse of config_from_hf)."""
  family = FAMILIES[family_of(cfg)]
  archs = [a for a, head in family.architectures.items() if head == cfg.head]
  if not archs:
    heads = sorted(set(family.architectures.values()))
    raise ValueError(
      f"head={cfg.head!r} has no {family.name} architecture in transformers: set head to one "
      f"of {heads} to export"
    )
  out = dict(architectures=archs[:1], model_type=family.name)
  out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
  resolved = dict(n_kv_heads=cfg.resolved_kv_heads, head_dim=cfg.resolved_head_dim)
  for field, entry in family.keys.items():
    out[_key(entry)[0]] = resolved.get(field, getattr(cfg, field))
  out[_key(family.keys["activation"])[0]] = HF_ACTIVATIONS[cfg.activation]
  return {**out, **{k: cfg.dropout_rate for k in family.dropout}, **family.write(cfg)}


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
