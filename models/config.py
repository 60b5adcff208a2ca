"""Model configuration, size presets and parameter counting."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

KINDS = ("decoder", "encoder")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
ACTIVATIONS = {
  "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf form (BERT)
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's "gelu_new"
  "silu": jax.nn.silu,
  "relu": jax.nn.relu,
}
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = (None, "xla", "cudnn")
ROPE_TYPES = ("default", "llama3")
KV_CACHES = ("float", "int8")
# Heads (models/transformer.py): "lm" logits BxLxV; "mlm" BxLxV; "classify" BxC (pooled first
# token); "span" Bx2xL (extractive QA: start and end logits over the positions); "tokens" BxLxC
# (token classification); "none" the hidden states BxLxE.
HEADS = {"decoder": ("lm", "tokens"), "encoder": ("mlm", "classify", "span", "tokens", "none")}
SPAN_OUTPUTS = 2  # "span": a start and an end logit per token

# Names the attention block tags with `checkpoint_name`, for "save_qkv_out".
SAVEABLE_NAMES = ("query", "key", "value", "attn_out")
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_qkv_out": jax.checkpoint_policies.save_only_these_names(*SAVEABLE_NAMES),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a Transformer encoder or decoder (defaults: a tiny GPT-2)."""

  kind: str = "decoder"  # "decoder" | "encoder"
  vocab_size: int = 264
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None  # None -> n_heads; fewer -> grouped-query attention
  head_dim: int | None = None  # None -> d_model // n_heads
  d_ff: int = 512
  max_len: int = 256  # learned-position table size / max sequence length
  norm: str = "layernorm"  # "layernorm" | "rmsnorm"
  norm_eps: float = 1e-5
  positions: str = "learned"  # "learned" | "rotary" (rotate-half, as HF Llama)
  rope_theta: float = 10000.0
  # rope_type "llama3" (Llama 3.1): wavelengths longer than original_max_position_embeddings /
  # low_freq_factor are divided by rope_factor, shorter than ... / high_freq_factor kept,
  # those between blended (transformers' _compute_llama3_parameters).
  rope_type: str = "default"  # "default" | "llama3"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192  # the context length of pretraining
  activation: str = "gelu_tanh"  # "gelu" (erf, BERT) | "gelu_tanh" (GPT-2) | "silu" | "relu"
  gated_mlp: bool = False  # SwiGLU-style: act(x W_gate) * (x W_up)
  use_bias: bool = True
  qkv_bias: bool = False  # biases on query/key/value even when use_bias is False (Qwen2)
  tie_embeddings: bool = True
  type_vocab_size: int = 2  # encoder only (token-type embeddings)
  head: str = "lm"  # one of HEADS[kind]: decoder "lm" | "tokens"; encoder "mlm", ...
  num_labels: int = 2  # "classify" and "tokens" heads' classes ("span" has 2: start, end)
  dropout_rate: float = 0.0
  dtype: str = "float32"  # compute dtype; params are always float32
  scan_layers: bool = False
  remat_policy: str = "none"  # a key of REMAT_POLICIES
  sliding_window: int = 0  # decoder: a token sees itself and the previous sliding_window - 1
  # None: our explicit einsums (models.layers.explicit_attention); "xla" | "cudnn":
  # jax.nn.dot_product_attention(implementation=), "cudnn" for flash attention on GPU.
  attention_impl: str | None = None
  record_attention: bool = False  # sow attention probs (uses the explicit path)
  # Decoding's KV cache (models.generate): "float" in the compute dtype, or "int8" codes with
  # one float32 scale per token and KV head (absmax over head_dim), as vLLM's per-token int8.
  kv_cache: str = "float"
  # Pipeline parallelism (models.pipeline): the scanned layers in pipeline_stages stages over
  # the "stage" mesh axis, the batch in pipeline_microbatches (experiments set both from
  # mesh.stage and train.microbatches). They change the schedule, never the parameters.
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1

  def __post_init__(self):
    def check_choice(field, valid):
      value = getattr(self, field)
      if value not in valid:
        raise ValueError(f"{field}={value!r} is unknown: choose one of {list(valid)}")

    check_choice("kind", KINDS)
    check_choice("norm", NORMS)
    check_choice("positions", POSITIONS)
    check_choice("activation", ACTIVATIONS)
    check_choice("dtype", DTYPES)
    check_choice("remat_policy", REMAT_POLICIES)
    check_choice("attention_impl", ATTENTION_IMPLS)
    check_choice("rope_type", ROPE_TYPES)
    check_choice("kv_cache", KV_CACHES)
    if self.head not in HEADS[self.kind]:
      other = next((k for k in KINDS if k != self.kind and self.head in HEADS[k]), None)
      fix = f", or set kind={other!r} (it has head={self.head!r})" if other else ""
      raise ValueError(
        f"head={self.head!r} is not valid for kind={self.kind!r}: "
        f"choose one of {list(HEADS[self.kind])}{fix}"
      )
    for field in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "d_ff",
      "max_len",
      "type_vocab_size",
      "num_labels",
      "n_kv_heads",
      "head_dim",
      "rope_original_max_position_embeddings",
      "pipeline_stages",
      "pipeline_microbatches",
    ):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{field}={value!r} must be a positive integer")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(
        f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
        "choose n_heads dividing d_model or set head_dim explicitly"
      )
    if self.n_heads % self.resolved_kv_heads:
      raise ValueError(
        f"n_heads={self.n_heads} is not divisible by n_kv_heads="
        f"{self.n_kv_heads}: choose n_kv_heads dividing n_heads "
        "(None means n_kv_heads = n_heads)"
      )
    if self.positions == "rotary" and self.resolved_head_dim % 2:
      raise ValueError(
        f"rotary positions need an even head_dim, got {self.resolved_head_dim}: "
        "change head_dim (or d_model / n_heads) or use positions='learned'"
      )
    if not (self.norm_eps > 0 and self.rope_theta > 0):
      raise ValueError(
        f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must both be positive"
      )
    if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor or self.rope_factor <= 0:
      raise ValueError(
        f"rope_factor={self.rope_factor} must be positive and 0 < rope_low_freq_factor="
        f"{self.rope_low_freq_factor} < rope_high_freq_factor={self.rope_high_freq_factor}"
      )
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      raise ValueError(f"sliding_window={self.sliding_window!r} must be 0 (none) or positive")
    if self.sliding_window and self.kind != "decoder":
      raise ValueError("sliding_window is a causal window: it needs kind='decoder'")
    if self.head == "span" and self.num_labels != SPAN_OUTPUTS:
      raise ValueError(
        f"head='span' has {SPAN_OUTPUTS} outputs per token (start, end), but num_labels="
        f"{self.num_labels}: set num_labels={SPAN_OUTPUTS}, or head='tokens' for "
        f"{self.num_labels} classes per token"
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={self.dropout_rate} must lie in [0, 1)")
    if self.pipeline_stages > 1 and not self.scan_layers:
      raise ValueError(
        f"pipeline_stages={self.pipeline_stages} (mesh.stage) splits the stacked layers: set "
        "scan_layers=True (--config.model.scan_layers=True), or mesh.stage=1"
      )
    if self.n_layers % self.pipeline_stages:
      raise ValueError(
        f"n_layers={self.n_layers} does not split into pipeline_stages={self.pipeline_stages} "
        "(mesh.stage) stages of equal length: choose a stage count dividing n_layers"
      )

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


# Each preset cites the table it comes from; HF config.json files agree with them.
PRESETS: dict[str, ModelConfig] = {
  # CPU-sized variants: seconds to run, same code paths as the real models.
  "tiny": ModelConfig(),
  "tiny-encoder": ModelConfig(kind="encoder", head="mlm", activation="gelu", norm_eps=1e-12),
  # BERT (Devlin et al., 2019), Sec. 3: BASE L=12 H=768 A=12, LARGE L=24 H=1024 A=16;
  # feed-forward 4H, 512 positions, WordPiece vocab 30522 (google-research/bert).
  "bert-base": ModelConfig(
    kind="encoder",
    vocab_size=30522,
    d_model=768,
    n_layers=12,
    n_heads=12,
    d_ff=3072,
    max_len=512,
    norm_eps=1e-12,
    activation="gelu",
    head="mlm",
  ),
  # GPT-2 (Radford et al., 2019), Table 2: 117M = 12 x 768, 345M = 24 x 1024;
  # BPE vocab 50257, context 1024, head dim 64, tied input/output embeddings.
  "gpt2-small": ModelConfig(
    vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_len=1024
  ),
  "gpt2-medium": ModelConfig(
    vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_len=1024
  ),
  # TinyLlama-1.1B (Zhang et al., 2024), Table 1: Llama-2 architecture, 22 layers,
  # d 2048, 32 query / 4 KV heads, SwiGLU 5632, context 2048, vocab 32000.
  "llama-1b": ModelConfig(
    vocab_size=32000,
    d_model=2048,
    n_layers=22,
    n_heads=32,
    n_kv_heads=4,
    d_ff=5632,
    max_len=2048,
    norm="rmsnorm",
    norm_eps=1e-5,
    positions="rotary",
    activation="silu",
    gated_mlp=True,
    use_bias=False,
    tie_embeddings=False,
  ),
}
# BERT-large: BERT-base at 24 x 1024, 16 heads (same paper, same section).
PRESETS["bert-large"] = dataclasses.replace(
  PRESETS["bert-base"], d_model=1024, n_layers=24, n_heads=16, d_ff=4096
)


def get_preset(name: str, **overrides) -> ModelConfig:
  """A preset by name, with fields replaced by `overrides` (validated again)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(
      f"unknown ModelConfig field(s) {unknown} in overrides for preset "
      f"{name!r}: valid fields are {sorted(fields)}"
    )
  return dataclasses.replace(PRESETS[name], **overrides)
