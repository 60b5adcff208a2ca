"""GPT-style decoder and BERT-style encoder, built from models.layers.

Parameter tree (plain nested dicts after `nn.unbox`), named to map 1:1 onto HF checkpoints:
  embed/embedding [V,E]   pos_embed/embedding [P,E]   type_embed/embedding [T,E] (encoder)
  embed_norm (encoder)    layers_{i}/ (or layers/ with a leading layer axis when scanned):
    attn/{query,key,value}/kernel [E,H|K,D]   attn/out/kernel [H,D,E]   attn_norm
    mlp/{wi,wg,wo}/kernel [E,F] [E,F] [F,E]   mlp_norm
  decoder: final_norm, then head "lm": lm_head/kernel [E,V] (untied only);
    "tokens": classifier/{kernel [E,C], bias [C]}
  encoder: head "mlm": mlm_head/{transform, norm, bias}; "classify": pooler, classifier;
    "span": qa_outputs/{kernel [E,2], bias [2]}; "tokens": classifier/{kernel [E,C], bias [C]}

Outputs (float32): "lm", "mlm" BxLxV; "classify" BxC; "tokens" BxLxC; "none" BxLxE; "span"
Bx2xL, start logits [:, 0] and end logits [:, 1], each over the L positions: the last axis is
the one a softmax runs over, as for every other head (HF's qa_outputs gives BxLx2, transposed).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import pipeline
from models.config import ACTIVATIONS, REMAT_POLICIES, SPAN_OUTPUTS, ModelConfig
from models.layers import Attention, Dense, DotGeneralFactory, Mlp, Norm, Unembed, embed

RESIDUAL = ("batch", "length", "act_embed")
LOGITS = ("batch", "length", "act_vocab")
TOKEN_LOGITS = ("batch", "length", None)  # BxLxC: a few classes, replicated
SPAN_LOGITS = ("batch", None, "length")  # Bx2xL


class Block(nn.Module):
  """One layer: pre-LN for the decoder (GPT-2), post-LN for the encoder (BERT)."""

  config: ModelConfig
  dot_general_cls: DotGeneralFactory | None = None
  attn_dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x_BxLxE, attention_mask_BxL, positions_BxL, deterministic: bool, cache_index):
    cfg = self.config
    attn = Attention(
      cfg,
      causal=cfg.kind == "decoder",
      dot_general_cls=self.dot_general_cls,
      attn_dot_general_cls=self.attn_dot_general_cls,
      name="attn",
    )
    mlp = Mlp(cfg, dot_general_cls=self.dot_general_cls, name="mlp")
    attn_norm = Norm(cfg.norm, cfg.norm_eps, name="attn_norm")
    mlp_norm = Norm(cfg.norm, cfg.norm_eps, name="mlp_norm")

    def drop(y):
      return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)

    if cfg.kind == "decoder":
      y_BxLxE = attn(attn_norm(x_BxLxE), attention_mask_BxL, positions_BxL, cache_index)
      x_BxLxE = x_BxLxE + drop(y_BxLxE)
      x_BxLxE = x_BxLxE + drop(mlp(mlp_norm(x_BxLxE)))
    else:
      x_BxLxE = attn_norm(x_BxLxE + drop(attn(x_BxLxE, attention_mask_BxL, positions_BxL)))
      x_BxLxE = mlp_norm(x_BxLxE + drop(mlp(x_BxLxE)))
    x_BxLxE = nn.with_logical_constraint(x_BxLxE, RESIDUAL)
    self.sow("intermediates", "hidden_states", x_BxLxE)  # For distillation.
    return x_BxLxE, None  # (carry, per-layer output) as nn.scan expects.


def _stack(block, cfg: ModelConfig, length: int):
  """`block` scanned over `length` layers: one compiled layer, weights stacked on a leading
  "layers" axis. Every collection is per layer (params, sown intermediates, a quantizer's own
  state)."""
  return nn.scan(
    block,
    variable_axes={True: 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(nn.broadcast,) * 4,  # mask, positions, deterministic, cache_index
    length=length,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )


def apply_layers(
  cfg: ModelConfig,
  x_BxLxE,
  attention_mask_BxL,
  positions_BxL,
  deterministic,
  dot_general_cls,
  attn_dot_general_cls,
  cache_index=None,
  parent: nn.Module | None = None,
):
  """Runs the n_layers blocks, scanned and/or rematerialized as the config asks, and with
  cfg.pipeline_stages > 1 (scanned only) in a GPipe schedule over the "stage" mesh axis
  (models.pipeline) when `parent` is the calling module.

  Called from a parent's compact method, so the blocks become the parent's children.
  """
  block = Block
  if cfg.remat_policy != "none":
    # `deterministic` (argument 4, counting self) is a Python bool; remat must not trace it.
    # prevent_cse is only needed outside scan (jax.checkpoint docs).
    block = nn.remat(
      block,
      policy=REMAT_POLICIES[cfg.remat_policy],
      static_argnums=(4,),
      prevent_cse=not cfg.scan_layers,
    )
  args = (attention_mask_BxL, positions_BxL, deterministic, cache_index)  # Same for each layer.
  if cfg.scan_layers:
    if parent is not None and _pipelines(cfg, parent, cache_index):
      return _pipeline_layers(
        cfg, parent, block, x_BxLxE, *args[:3], dot_general_cls, attn_dot_general_cls
      )
    stack = _stack(block, cfg, cfg.n_layers)
    x_BxLxE, _ = stack(cfg, dot_general_cls, attn_dot_general_cls, name="layers")(x_BxLxE, *args)
    return x_BxLxE
  for i in range(cfg.n_layers):
    layer = block(cfg, dot_general_cls, attn_dot_general_cls, name=f"layers_{i}")
    x_BxLxE, _ = layer(x_BxLxE, *args)
  return x_BxLxE


def _pipelines(cfg: ModelConfig, parent: nn.Module, cache_index) -> bool:
  """Whether this call runs the pipeline schedule: stages > 1, and a forward that only reads
  the layers' variables (sown intermediates aside). Init, decoding (the cache), calibration and
  statistics passes (a mutable collection) run the same stacked layers unpipelined: the same
  numbers, each layer's weights gathered to every stage."""
  if cfg.pipeline_stages == 1 or cache_index is not None or parent.is_initializing():
    return False
  return not any(
    parent.is_mutable_collection(c)
    for c in set(parent.variables) | {"params", "cache"}
    if c != "intermediates"
  )


def _pipeline_layers(
  cfg,
  parent,
  block,
  x_BxLxE,
  mask_BxL,
  positions_BxL,
  deterministic,
  dot_general_cls,
  attn_dot_general_cls,
):
  stages, microbatches = cfg.pipeline_stages, cfg.pipeline_microbatches
  variables = {c: v["layers"] for c, v in parent.variables.items() if "layers" in v}
  variables.pop("intermediates", None)
  stack = _stack(block, cfg, cfg.n_layers // stages)(
    cfg,
    dot_general_cls,
    attn_dot_general_cls,
    parent=None,  # unbound: applied per stage
  )
  capture = parent.is_mutable_collection("intermediates")
  rng = None if deterministic or cfg.dropout_rate == 0 else parent.make_rng("dropout")

  def stage_fn(stage_vars, slots, rng_s):
    x, positions, *mask = slots
    kw = dict(rngs={"dropout": rng_s} if rng_s is not None else {})
    if capture:
      kw["mutable"] = ["intermediates"]
    out = stack.apply(
      stage_vars, x, mask[0] if mask else None, positions, deterministic, None, **kw
    )
    (y, _), sown = out if capture else (out, {})
    return y, sown.get("intermediates", {})

  inputs = (x_BxLxE, positions_BxL) + ((mask_BxL,) if mask_BxL is not None else ())
  stage_vars = pipeline.stage_view(variables, stages)
  x_BxLxE, sown = pipeline.gpipe(stage_fn, stage_vars, inputs, stages, microbatches, rng)
  if capture and sown:  # the unpipelined layout: [n_layers, B, ...] per sown value
    parent.put_variable("intermediates", "layers", pipeline.layer_order(sown, stages, microbatches))
  return x_BxLxE


def _check_length(cfg: ModelConfig, length: int):
  if length > cfg.max_len:
    raise ValueError(
      f"sequence length {length} exceeds max_len={cfg.max_len}: truncate the input or raise max_len"
    )


def to_vocab(cfg: ModelConfig, x_BxLxE, embedding_VxE, dot_general_cls, name: str):
  """Logits over the vocabulary: tied to the embedding table, or a kernel of its own.

  Called from a parent's compact method, so the layer (named `name`) is the parent's child.
  """
  if cfg.tie_embeddings:
    return Unembed(cfg.compute_dtype, dot_general_cls, name=name)(x_BxLxE, embedding_VxE)
  dense = Dense(
    cfg.vocab_size,
    ("embed", "vocab"),
    use_bias=False,
    dtype=cfg.compute_dtype,
    dot_general_cls=dot_general_cls,
    name=name,
  )
  return dense(x_BxLxE)


def token_classifier(cfg: ModelConfig, x_BxLxE, deterministic, dot_general_cls):
  """The "tokens" head: dropout, then `classifier` (with a bias, as HF's nn.Linear whatever
  the body's use_bias) to num_labels logits per token, BxLxC float32.

  Called from a parent's compact method, so the layer is the parent's child.
  """
  x_BxLxE = nn.Dropout(cfg.dropout_rate)(x_BxLxE, deterministic=deterministic)
  dense = Dense(
    cfg.num_labels,
    ("embed", "labels"),
    dtype=cfg.compute_dtype,
    dot_general_cls=dot_general_cls,
    name="classifier",
  )
  return nn.with_logical_constraint(dense(x_BxLxE).astype(jnp.float32), TOKEN_LOGITS)


class Decoder(nn.Module):
  """GPT-style causal LM: embeddings, pre-LN blocks, final norm, then the (tied) LM head, or
  with head "tokens" a token classifier (GPT2ForTokenClassification, Llama's and others')."""

  config: ModelConfig
  dot_general_cls: DotGeneralFactory | None = None
  attn_dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(
    self,
    input_ids_BxL,
    *,
    attention_mask=None,
    positions=None,
    deterministic=True,
    cache_index=None,
    layers_input=False,
  ):
    """Logits BxLxV, or BxLxC with head "tokens" (float32). `attention_mask` (BxL, 1 = token,
    0 = pad) masks padded keys. `layers_input`: return the residual stream entering the first
    layer instead (one-shot methods run the layers one at a time from there: `Block`).

    With `cache_index` (decoding: models.generate) the tokens are written to the "cache"
    collection's slots cache_index.. and attend to the slots before them; `attention_mask`
    then covers the cache's S slots and `positions` must be given.
    """
    cfg = self.config
    _check_length(cfg, input_ids_BxL.shape[1])
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
    tok_embed = embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.compute_dtype, "embed")
    x_BxLxE = tok_embed(input_ids_BxL)
    if cfg.positions == "learned":
      x_BxLxE += embed(cfg.max_len, cfg.d_model, ("pos", "embed"), cfg.compute_dtype, "pos_embed")(
        positions
      )
    x_BxLxE = nn.Dropout(cfg.dropout_rate)(x_BxLxE, deterministic=deterministic)
    x_BxLxE = nn.with_logical_constraint(x_BxLxE, RESIDUAL)
    if layers_input:
      return x_BxLxE
    x_BxLxE = apply_layers(
      cfg,
      x_BxLxE,
      attention_mask,
      positions,
      deterministic,
      self.dot_general_cls,
      self.attn_dot_general_cls,
      cache_index,
      parent=self,
    )
    x_BxLxE = Norm(cfg.norm, cfg.norm_eps, name="final_norm")(x_BxLxE)
    if cfg.head == "tokens":
      return token_classifier(cfg, x_BxLxE, deterministic, self.dot_general_cls)
    logits_BxLxV = to_vocab(cfg, x_BxLxE, tok_embed.embedding, self.dot_general_cls, "lm_head")
    return nn.with_logical_constraint(logits_BxLxV.astype(jnp.float32), LOGITS)


class MlmHead(nn.Module):
  """BERT's masked-LM head: dense, activation, norm, then the (tied) decoder plus a bias."""

  config: ModelConfig
  dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(self, x_BxLxE, embedding_VxE):
    cfg = self.config
    # Output axis left unsharded: a second "embed" would map two dims to one mesh axis.
    h_BxLxE = Dense(
      cfg.d_model,
      ("embed", None),
      dtype=cfg.compute_dtype,
      dot_general_cls=self.dot_general_cls,
      name="transform",
    )(x_BxLxE)
    h_BxLxE = Norm(cfg.norm, cfg.norm_eps, name="norm")(ACTIVATIONS[cfg.activation](h_BxLxE))
    logits_BxLxV = to_vocab(cfg, h_BxLxE, embedding_VxE, self.dot_general_cls, "decoder")
    zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",))
    bias_V = self.param("bias", zeros, (cfg.vocab_size,), jnp.float32)
    return logits_BxLxV.astype(jnp.float32) + bias_V


class Encoder(nn.Module):
  """BERT-style bidirectional encoder (post-LN) with an "mlm", "classify", "span" (extractive
  QA), "tokens" (token classification) or "none" head."""

  config: ModelConfig
  dot_general_cls: DotGeneralFactory | None = None
  attn_dot_general_cls: DotGeneralFactory | None = None

  @nn.compact
  def __call__(
    self,
    input_ids_BxL,
    *,
    attention_mask=None,
    token_type_ids=None,
    deterministic=True,
    layers_input=False,
  ):
    """MLM logits BxLxV, class logits BxC, span logits Bx2xL ([:, 0] start, [:, 1] end), token
    class logits BxLxC, or hidden states BxLxE (all float32).
    `layers_input`: the residual stream entering the first layer instead (as the decoder's)."""
    cfg = self.config
    _check_length(cfg, input_ids_BxL.shape[1])
    positions_BxL = jnp.broadcast_to(jnp.arange(input_ids_BxL.shape[1]), input_ids_BxL.shape)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids_BxL)
    tok_embed = embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), cfg.compute_dtype, "embed")
    x_BxLxE = tok_embed(input_ids_BxL)
    if cfg.positions == "learned":
      x_BxLxE += embed(cfg.max_len, cfg.d_model, ("pos", "embed"), cfg.compute_dtype, "pos_embed")(
        positions_BxL
      )
    x_BxLxE += embed(
      cfg.type_vocab_size, cfg.d_model, ("type_vocab", "embed"), cfg.compute_dtype, "type_embed"
    )(token_type_ids)
    x_BxLxE = Norm(cfg.norm, cfg.norm_eps, name="embed_norm")(x_BxLxE)
    x_BxLxE = nn.Dropout(cfg.dropout_rate)(x_BxLxE, deterministic=deterministic)
    x_BxLxE = nn.with_logical_constraint(x_BxLxE, RESIDUAL)
    if layers_input:
      return x_BxLxE
    x_BxLxE = apply_layers(
      cfg,
      x_BxLxE,
      attention_mask,
      positions_BxL,
      deterministic,
      self.dot_general_cls,
      self.attn_dot_general_cls,
      parent=self,
    )

    if cfg.head == "none":
      return x_BxLxE.astype(jnp.float32)
    if cfg.head == "mlm":
      logits_BxLxV = MlmHead(cfg, self.dot_general_cls, name="mlm_head")(
        x_BxLxE, tok_embed.embedding
      )
      return nn.with_logical_constraint(logits_BxLxV, LOGITS)
    if cfg.head == "tokens":
      return token_classifier(cfg, x_BxLxE, deterministic, self.dot_general_cls)
    dense = functools.partial(Dense, dtype=cfg.compute_dtype, dot_general_cls=self.dot_general_cls)
    if cfg.head == "span":  # BertForQuestionAnswering's qa_outputs, no dropout (as HF)
      logits_BxLx2 = dense(SPAN_OUTPUTS, ("embed", "labels"), name="qa_outputs")(x_BxLxE)
      logits_Bx2xL = jnp.swapaxes(logits_BxLx2.astype(jnp.float32), 1, 2)
      return nn.with_logical_constraint(logits_Bx2xL, SPAN_LOGITS)
    # "classify": BERT's pooler (dense + tanh on the first token) and a linear classifier.
    pooled_BxE = jnp.tanh(dense(cfg.d_model, ("embed", None), name="pooler")(x_BxLxE[:, 0]))
    pooled_BxE = nn.Dropout(cfg.dropout_rate)(pooled_BxE, deterministic=deterministic)
    logits_BxC = dense(cfg.num_labels, ("embed", "labels"), name="classifier")(pooled_BxE)
    return logits_BxC.astype(jnp.float32)


def build(
  config: ModelConfig,
  dot_general_cls: DotGeneralFactory | None = None,
  attn_dot_general_cls: DotGeneralFactory | None = None,
) -> Decoder | Encoder:
  """The Decoder or Encoder the config describes."""
  cls = Decoder if config.kind == "decoder" else Encoder
  return cls(config, dot_general_cls=dot_general_cls, attn_dot_general_cls=attn_dot_general_cls)


def count_params(config: ModelConfig) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  ids_1x1 = jnp.zeros((1, 1), jnp.int32)
  scanned = build(dataclasses.replace(config, scan_layers=True))  # Traces one layer, not n.
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), ids_1x1)["params"]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def _is_layer(key: str) -> bool:
  return key.startswith("layers_") and key[len("layers_") :].isdigit()


def scan_params(params: dict, n_layers: int) -> dict:
  """Unrolled layout (layers_0 ... layers_{n-1}) -> scanned layout (layers, leading axis n)."""
  layers = [params[f"layers_{i}"] for i in range(n_layers)]
  out = {k: v for k, v in params.items() if not _is_layer(k)}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return out


def unscan_params(params: dict) -> dict:
  """Scanned layout (layers, leading axis n) -> unrolled layout (layers_0 ... layers_{n-1})."""
  out = {k: v for k, v in params.items() if k != "layers"}
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out
