"""Hugging Face model families: each is one `Family` in FAMILIES, with its architectures, the
ModelConfig fields all its models share, its config.json keys, and its tensors as modules (our
path, HF name, kind); config.json <-> ModelConfig (`config_from_hf`, `hf_config`). The tensor
mapping, loading and saving that read this table are models/hf.py.
"""

import dataclasses
import logging
from collections.abc import Callable

from models.config import SPAN_OUTPUTS, ModelConfig

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
