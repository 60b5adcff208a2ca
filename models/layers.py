"""Building blocks: Dense with an injectable dot_general, norms, rotary, attention, MLP.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and key
activations are constrained with `nn.with_logical_constraint`; both are no-ops until the
caller supplies axis rules and a mesh.

A `dot_general_cls` is a zero-argument factory returning something called as
`dg(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None)`. It is
called inside the module's compact scope, so it may return a flax Module that owns
variables (e.g. learned quantization step sizes), as with flax's DenseGeneral.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from models.config import ACTIVATIONS, ModelConfig

DotGeneralFactory = Callable[[], Callable[..., jax.Array]]

default_init = nn.initializers.normal(stddev=0.02)  # GPT-2 / BERT


def make_dot_general(factory: DotGeneralFactory | None) -> Callable[..., jax.Array]:
  """Calls the factory (in the caller's compact scope) or falls back to lax.dot_general."""
  return lax.dot_general if factory is None else factory()


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting the trailing axes of x with the leading kernel axes.

  `names` are the kernel's logical axes, inputs then outputs: ("embed", "heads", "head_dim")
  maps x_BxLxE to y_BxLxHxD, ("heads", "head_dim", "embed") maps x_BxLxHxD back to y_BxLxE.
  A factory with a `ranks` attribute ({layer path: rank}, e.g. compress.lowrank's plan) makes
  the listed layers factorized: `kernel_u` [*in, r] and `kernel_v` [r, *out] in place of the
  kernel.
  """

  features: int | tuple[int, ...]
  names: tuple[str | None, ...]
  use_bias: bool = True
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    n_in = len(self.names) - len(features)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    ranks = getattr(self.dot_general_cls, "ranks", None)  # a factorized model's {layer: rank}
    rank = ranks.get("/".join(self.scope.path), 0) if ranks else 0
    if rank:
      y = self._factorized(x, features, n_in, contract, rank)
    else:
      y = self._dense(x, features, n_in, contract)
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), self.names[n_in:]),
        features,
        jnp.float32,
      )
      y = y + bias.astype(self.dtype)
    return y

  def _factorized(self, x, features, n_in, contract, rank):
    """x . kernel_u [*in, r] . kernel_v [r, *out]: the kernel as two rank-r factors, each
    through its own dot_general from the factory (two quantized dots under QAT)."""
    box = lambda names: nn.with_logical_partitioning(default_init, names)  # noqa: E731
    in_shape = x.shape[x.ndim - n_in :]
    u = self.param("kernel_u", box(self.names[:n_in] + (None,)), in_shape + (rank,), jnp.float32)
    v = self.param("kernel_v", box((None,) + self.names[n_in:]), (rank,) + features, jnp.float32)
    h = make_dot_general(self.dot_general_cls)(
      x.astype(self.dtype), u.astype(self.dtype), (contract, ((), ()))
    )
    return make_dot_general(self.dot_general_cls)(
      h, v.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ()))
    )

  def _dense(self, x, features, n_in, contract):
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(default_init, self.names),
      x.shape[x.ndim - n_in :] + features,
      jnp.float32,
    )
    dot_general = make_dot_general(self.dot_general_cls)
    if jnp.issubdtype(kernel.dtype, jnp.floating):
      kernel = kernel.astype(self.dtype)
    # else: integer codes of a converted (quantized) checkpoint, for a dot_general that
    # knows their scales.
    return dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))


class Unembed(nn.Module):
  """Tied output layer: logits_...xV = x_...xE . table_VxE^T, through the injectable dot_general."""

  dtype: Any = jnp.float32
  dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x: jax.Array, table_VxE: jax.Array) -> jax.Array:
    dot_general = make_dot_general(self.dot_general_cls)
    contract = ((x.ndim - 1,), (1,))
    return dot_general(x.astype(self.dtype), table_VxE.astype(self.dtype), (contract, ((), ())))


def embed(num: int, features: int, names: tuple[str, str], dtype: Any, name: str) -> nn.Embed:
  """An embedding table [num, features] with logical names; lookups return `dtype`."""
  return nn.Embed(
    num,
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    embedding_init=nn.with_logical_partitioning(default_init, names),
  )


class Norm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

  kind: str = "layernorm"
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = x.astype(jnp.float32)
    if self.kind == "layernorm":
      y = y - y.mean(-1, keepdims=True)
    y = y * lax.rsqrt(jnp.mean(jnp.square(y), -1, keepdims=True) + self.eps)
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      x.shape[-1:],
      jnp.float32,
    )
    y = y * scale
    if self.kind == "layernorm":
      y = y + self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        x.shape[-1:],
        jnp.float32,
      )
    return y.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """RoPE's inverse frequencies D/2: theta^(-2i/D), and for rope_type "llama3" rescaled as
  transformers' `_compute_llama3_parameters` does: wavelengths longer than original_max_len /
  low_freq_factor are divided by `factor`, shorter than original_max_len / high_freq_factor
  kept, and blended in between."""
  d = cfg.resolved_head_dim
  inv_freq_D2 = 1.0 / cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  if cfg.rope_type == "default":
    return inv_freq_D2
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_position_embeddings
  wavelen_D2 = 2 * math.pi / inv_freq_D2
  scaled_D2 = jnp.where(wavelen_D2 > old_len / low, inv_freq_D2 / factor, inv_freq_D2)
  smooth_D2 = (old_len / wavelen_D2 - low) / (high - low)
  blended_D2 = (1 - smooth_D2) * scaled_D2 / factor + smooth_D2 * scaled_D2
  medium_D2 = (wavelen_D2 >= old_len / high) & (wavelen_D2 <= old_len / low)
  return jnp.where(medium_D2, blended_D2, scaled_D2)


def rotary(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, inv_freq_D2: jax.Array) -> jax.Array:
  """Rotary position embedding, rotate-half convention (HF Llama: no weight permutation)."""
  angles_BxLxD2 = positions_BxL[..., None].astype(jnp.float32) * inv_freq_D2
  angles_BxLx1xD = jnp.concatenate([angles_BxLxD2, angles_BxLxD2], -1)[:, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  y = x * jnp.cos(angles_BxLx1xD) + rotated * jnp.sin(angles_BxLx1xD)
  return y.astype(x_BxLxHxD.dtype)


def causal_mask(length: int, window: int = 0) -> jax.Array:
  """1x1xLxL bool: query i sees keys j <= i, and with a window only j > i - window (HF Mistral's
  sliding window: the last `window` tokens, itself included)."""
  query_Lx1, key_1xL = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
  mask_LxL = key_1xL <= query_Lx1
  if window:
    mask_LxL &= key_1xL > query_Lx1 - window
  return mask_LxL[None, None]


def explicit_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, qk_dot_general, pv_dot_general):
  """Softmax attention written out, so each einsum can be swapped (e.g. quantized).

  Query head h reads KV head h // (H // K), as in jax.nn.dot_product_attention and HF.
  `mask` (bool, broadcastable to BxHxLxS) marks the allowed keys. Returns the output
  BxLxHxD and the float32 attention probabilities BxHxLxS.
  """
  b, l, h, d = q_BxLxHxD.shape
  s, k = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  g = h // k
  q_BxKxGxLxD = q_BxLxHxD.reshape(b, l, k, g, d).transpose(0, 2, 3, 1, 4)
  k_BxKxSxD = k_BxSxKxD.transpose(0, 2, 1, 3)
  v_BxKxSxD = v_BxSxKxD.transpose(0, 2, 1, 3)
  # Batch over (B, K), contract D; logits accumulate in float32 like the fused path.
  logits_BxKxGxLxS = qk_dot_general(
    q_BxKxGxLxD, k_BxKxSxD, (((4,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
  )
  logits_BxHxLxS = logits_BxKxGxLxS.astype(jnp.float32).reshape(b, h, l, s) * d**-0.5
  if mask is not None:
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, jnp.finfo(jnp.float32).min)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  probs_BxKxGxLxS = probs_BxHxLxS.reshape(b, k, g, l, s).astype(v_BxSxKxD.dtype)
  out_BxKxGxLxD = pv_dot_general(probs_BxKxGxLxS, v_BxKxSxD, (((4,), (2,)), ((0, 1), (0, 1))))
  out_BxLxHxD = out_BxKxGxLxD.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)
  return out_BxLxHxD.astype(q_BxLxHxD.dtype), probs_BxHxLxS


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention with optional rotary positions."""

  config: ModelConfig
  causal: bool
  dot_general_cls: DotGeneralFactory | None = None
  attn_dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x_BxLxE, attention_mask_BxL=None, positions_BxL=None, cache_index=None):
    """Self-attention over x, or with `cache_index` (decoding, models.generate) over the KV
    cache: x's keys and values are written at slots cache_index.., and `attention_mask_BxL`
    covers all the cache's slots (BxS)."""
    cfg = self.config
    h, k, d = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    dense = functools.partial(
      Dense, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, dot_general_cls=self.dot_general_cls
    )
    qkv = functools.partial(dense, use_bias=cfg.use_bias or cfg.qkv_bias)
    q_BxLxHxD = qkv((h, d), ("embed", "heads", "head_dim"), name="query")(x_BxLxE)
    k_BxLxKxD = qkv((k, d), ("embed", "kv_heads", "head_dim"), name="key")(x_BxLxE)
    v_BxLxKxD = qkv((k, d), ("embed", "kv_heads", "head_dim"), name="value")(x_BxLxE)
    if cfg.positions == "rotary":
      inv_freq_D2 = rope_frequencies(cfg)
      q_BxLxHxD = rotary(q_BxLxHxD, positions_BxL, inv_freq_D2)
      k_BxLxKxD = rotary(k_BxLxKxD, positions_BxL, inv_freq_D2)
    q_BxLxHxD = nn.with_logical_constraint(q_BxLxHxD, ("batch", "length", "act_heads", "head_dim"))
    kv_axes = ("batch", "length", "act_kv_heads", "head_dim")
    k_BxLxKxD = nn.with_logical_constraint(k_BxLxKxD, kv_axes)
    v_BxLxKxD = nn.with_logical_constraint(v_BxLxKxD, kv_axes)
    # Names for the "save_qkv_out" remat policy.
    q_BxLxHxD = checkpoint_name(q_BxLxHxD, "query")
    k_BxLxKxD = checkpoint_name(k_BxLxKxD, "key")
    v_BxLxKxD = checkpoint_name(v_BxLxKxD, "value")

    if cache_index is not None:  # decoding: this call's keys and values join the cache
      k_BxSxKxD, v_BxSxKxD = kv_cache(self, k_BxLxKxD, v_BxLxKxD, cache_index)
      if k_BxSxKxD is not None:
        return self._cached(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, attention_mask_BxL, cache_index)

    # Padding masks keys only: a padded query still attends to real keys, so no row is empty
    # (unless a sliding window holds only padding: that row is uniform in every path).
    key_mask_Bx1x1xS = None
    if attention_mask_BxL is not None:
      key_mask_Bx1x1xS = attention_mask_BxL[:, None, None, :].astype(bool)

    # The explicit path unless jax.nn.dot_product_attention's is asked for by name: for "xla"
    # it computes the same einsums and softmax, but vmapped over the query groups, and that
    # layout made attention's forward and backward ~30% slower on CPU (B16 L128 H4 D32, 12.0
    # vs 8.6 ms; experiments/bench/nanodo.py).
    if cfg.attention_impl is None or cfg.record_attention or self.attn_dot_general_cls is not None:
      mask = key_mask_Bx1x1xS
      if self.causal:
        causal_1x1xLxS = causal_mask(x_BxLxE.shape[1], cfg.sliding_window)
        mask = causal_1x1xLxS if mask is None else mask & causal_1x1xLxS
      out_BxLxHxD, probs_BxHxLxS = explicit_attention(
        q_BxLxHxD,
        k_BxLxKxD,
        v_BxLxKxD,
        mask,
        make_dot_general(self.attn_dot_general_cls),
        make_dot_general(self.attn_dot_general_cls),
      )
      if cfg.record_attention:
        self.sow("intermediates", "attention_probs", probs_BxHxLxS)
    else:
      # GQA is native here (BTNH layout with K < N kv heads). A window of W keys is JAX's
      # (W - 1, 0): key j is seen from query i when i - (W - 1) <= j <= i (cuDNN included).
      window = (cfg.sliding_window - 1, 0) if self.causal and cfg.sliding_window else None
      out_BxLxHxD = jax.nn.dot_product_attention(
        q_BxLxHxD,
        k_BxLxKxD,
        v_BxLxKxD,
        mask=key_mask_Bx1x1xS,
        is_causal=self.causal,
        local_window_size=window,
        implementation=cfg.attention_impl,
      )
    return self._out(out_BxLxHxD)

  def _out(self, out_BxLxHxD):
    cfg = self.config
    out_BxLxHxD = checkpoint_name(out_BxLxHxD, "attn_out")
    out = Dense(
      cfg.d_model,
      ("heads", "head_dim", "embed"),
      use_bias=cfg.use_bias,
      dtype=cfg.compute_dtype,
      dot_general_cls=self.dot_general_cls,
      name="out",
    )
    return out(out_BxLxHxD)

  def _cached(self, q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, key_mask_BxS, cache_index):
    """Queries at cache slots cache_index.. attend to the slots up to their own (and within
    the sliding window) whose `key_mask_BxS` is set: a prompt's padding is masked there."""
    cfg = self.config
    query_Lx1 = cache_index + jnp.arange(q_BxLxHxD.shape[1])[:, None]
    key_1xS = jnp.arange(k_BxSxKxD.shape[1])[None, :]
    mask_LxS = key_1xS <= query_Lx1
    if cfg.sliding_window:
      mask_LxS &= key_1xS > query_Lx1 - cfg.sliding_window
    mask = mask_LxS[None, None]
    if key_mask_BxS is not None:
      mask = mask & key_mask_BxS[:, None, None, :].astype(bool)
    dot_general = make_dot_general(self.attn_dot_general_cls)
    out_BxLxHxD, _ = explicit_attention(
      q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, mask, dot_general, dot_general
    )
    return self._out(out_BxLxHxD)


CACHE_AXES = ("batch", "length", "act_kv_heads", "head_dim")


def quantize_kv(x_BxLxKxD):
  """int8 codes and a float32 scale per token and head (absmax over head_dim): x ~ codes * scale."""
  amax_BxLxKx1 = jnp.max(jnp.abs(x_BxLxKxD.astype(jnp.float32)), axis=-1, keepdims=True)
  scale_BxLxKx1 = jnp.where(amax_BxLxKx1 > 0, amax_BxLxKx1 / 127.0, 1.0)
  codes = jnp.clip(jnp.round(x_BxLxKxD.astype(jnp.float32) / scale_BxLxKx1), -127, 127)
  return codes.astype(jnp.int8), scale_BxLxKx1


def kv_cache(module: nn.Module, k_BxLxKxD, v_BxLxKxD, cache_index):
  """Writes k and v into the module's "cache" collection at slots cache_index.. and returns the
  whole cache BxSxKxD (dequantized when int8), or (None, None) on the call that creates it:
  the cache takes that call's shapes, so it is made by a call with L = the cache's length S."""
  out = []
  for name, x_BxLxKxD in (("cached_key", k_BxLxKxD), ("cached_value", v_BxLxKxD)):
    fresh = not module.has_variable("cache", name)
    if module.config.kv_cache == "int8":
      codes_BxLxKxD, scale_BxLxKx1 = quantize_kv(x_BxLxKxD)
      parts = {name: codes_BxLxKxD, name + "_scale": scale_BxLxKx1}
    else:
      parts = {name: x_BxLxKxD}
    full = {}
    for part, new in parts.items():
      var = module.variable("cache", part, jnp.zeros, new.shape, new.dtype)
      if not fresh:
        start = (0, cache_index) + (0,) * (new.ndim - 2)
        value = lax.dynamic_update_slice(var.value, new.astype(var.value.dtype), start)
        var.value = nn.with_logical_constraint(value, CACHE_AXES)
      full[part] = var.value
    if fresh:
      continue
    if module.config.kv_cache == "int8":
      x_BxSxKxD = (full[name] * full[name + "_scale"]).astype(x_BxLxKxD.dtype)
    else:
      x_BxSxKxD = full[name]
    out.append(x_BxSxKxD)
  return tuple(out) if out else (None, None)


class Mlp(nn.Module):
  """Position-wise feed-forward: act(x W_i) W_o, or gated act(x W_g) * (x W_i) W_o."""

  config: ModelConfig
  dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x_BxLxE):
    cfg = self.config
    dense = functools.partial(
      Dense, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, dot_general_cls=self.dot_general_cls
    )
    act = ACTIVATIONS[cfg.activation]
    h_BxLxF = dense(cfg.d_ff, ("embed", "mlp"), name="wi")(x_BxLxE)
    if cfg.gated_mlp:
      h_BxLxF = act(dense(cfg.d_ff, ("embed", "mlp"), name="wg")(x_BxLxE)) * h_BxLxF
    else:
      h_BxLxF = act(h_BxLxF)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "act_mlp"))
    return dense(cfg.d_model, ("mlp", "embed"), name="wo")(h_BxLxF)
