"""Generation from a Decoder: prefill the prompts, then one token per step from a KV cache.

    tokens_BxN, logprobs_BxN = models.generate(model, variables, prompt_ids, prompt_mask,
                                               max_new_tokens=32, temperature=0.8, top_p=0.95,
                                               rng=jax.random.key(0), eos_id=tok.eos_token_id)

Prompts of different lengths come as one padded batch with a mask (1 = token, 0 = pad), padded
on either side: each row's tokens are moved to the right end (left padding), so every row
writes the same cache slot at each step, and each row's positions count its own tokens from 0
(as transformers' `generate` does with an attention mask). The cache holds S = prompt width +
max_new_tokens slots (models.layers.kv_cache: float, or int8 with per-token, per-head scales
when the model's config says kv_cache="int8"); `prefill` and `decode_step` are pure functions of
(variables, cache, ...), each compiled once per batch and cache size, and `generate` runs them
in one program (a while loop that ends when every row has emitted `eos_id`).

Sampling (`sample`): greedy when temperature is 0, else the logits divided by the temperature,
restricted to the top_k largest (0: all) and to the smallest set of most likely tokens whose
probability reaches top_p (1: all), then drawn with the explicit key. The log-probabilities
returned are the model's own (log_softmax of its logits, before temperature and filtering), so
they score a continuation the same way whichever sampler chose it. After a row's `eos_id` its
tokens are `eos_id` and its log-probabilities 0.

Sharded decoding: place `variables` with their shardings and call inside
`with mesh, nn.logical_axis_rules(rules)` (`mesh=`/`rules=` do this): the batch is split over
the rules' "batch" axes, heads over "tensor", and the cache is constrained like the keys and
values (models.layers.CACHE_AXES).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.transformer import Decoder


def sample(logits_BxV, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Next tokens B (int32) from float logits: greedy at temperature 0, else top-k / top-p."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  return jax.random.categorical(rng, filter_logits(logits_BxV, top_k, top_p)).astype(jnp.int32)


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """Logits outside the top_k largest, or outside the smallest set of most likely tokens whose
  probability reaches top_p, set to -inf (ties at the k-th value are kept)."""
  neg_inf = jnp.finfo(jnp.float32).min
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token is kept while the mass before it is below top_p: the first always is.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_Bx1 = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, neg_inf, logits_BxV)
  return logits_BxV


def left_align(ids_BxL, mask_BxL):
  """Each row's tokens (mask 1) moved to the right end, in order; pads (id 0) before them.
  Returns ids, mask and positions (0.. over each row's tokens; 0 on pads)."""
  order_BxL = jnp.argsort(mask_BxL.astype(jnp.int32), axis=-1, stable=True)
  mask_BxL = jnp.take_along_axis(mask_BxL.astype(jnp.int32), order_BxL, axis=-1)
  ids_BxL = jnp.take_along_axis(ids_BxL, order_BxL, axis=-1) * mask_BxL
  positions_BxL = jnp.maximum(jnp.cumsum(mask_BxL, axis=-1) - 1, 0)
  return ids_BxL, mask_BxL, positions_BxL


def decoding_model(model: Decoder, kv_cache: str | None = None) -> Decoder:
  """The same model (its parameters read as they are) set for decoding: no rematerialization,
  no dropout, no recorded attention, and the KV cache format `kv_cache` (default: the config's)."""
  cfg = model.config
  cfg = dataclasses.replace(
    cfg,
    remat_policy="none",
    dropout_rate=0.0,
    record_attention=False,
    kv_cache=kv_cache or cfg.kv_cache,
  )
  return model.clone(config=cfg)


def init_cache(model: Decoder, variables: dict, batch: int, cache_len: int) -> dict:
  """An empty KV cache (zeros) for `batch` rows of `cache_len` slots: the "cache" collection."""

  def make(variables):
    ids = jnp.zeros((batch, cache_len), jnp.int32)
    _, made = model.apply(variables, ids, positions=ids, cache_index=0, mutable=["cache"])
    return made["cache"]

  shapes = jax.eval_shape(make, {k: v for k, v in variables.items() if k != "cache"})
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(model: Decoder, variables, cache, ids_BxL, mask_BxS, positions_BxL):
  """The prompts (left-aligned) written to cache slots 0..L-1; returns the last position's
  logits BxV and the cache. `mask_BxS` covers all S slots (the prompts' mask, then ones)."""
  logits_BxLxV, made = model.apply(
    {**variables, "cache": cache},
    ids_BxL,
    attention_mask=mask_BxS,
    positions=positions_BxL,
    cache_index=0,
    mutable=["cache"],
  )
  return logits_BxLxV[:, -1], made["cache"]


def decode_step(model: Decoder, variables, cache, tokens_B, index, mask_BxS, positions_B):
  """One token per row written to cache slot `index`; returns its logits BxV and the cache."""
  logits_Bx1xV, made = model.apply(
    {**variables, "cache": cache},
    tokens_B[:, None],
    attention_mask=mask_BxS,
    positions=positions_B[:, None],
    cache_index=index,
    mutable=["cache"],
  )
  return logits_Bx1xV[:, 0], made["cache"]


@functools.partial(
  jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
  model, variables, ids_BxL, mask_BxL, rng, *, max_new_tokens, temperature, top_k, top_p, eos_id
):
  b, width = ids_BxL.shape
  ids_BxL, mask_BxL, positions_BxL = left_align(ids_BxL, mask_BxL)
  lengths_B = mask_BxL.sum(-1)
  mask_BxS = jnp.concatenate([mask_BxL, jnp.ones((b, max_new_tokens), jnp.int32)], axis=-1)
  cache = init_cache(model, variables, b, width + max_new_tokens)
  logits_BxV, cache = prefill(model, variables, cache, ids_BxL, mask_BxS, positions_BxL)
  pad = 0 if eos_id is None else eos_id

  def emit(t, logits_BxV, tokens_BxN, logps_BxN, done_B):
    token_B = sample(logits_BxV, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], -1)[:, 0]
    token_B = jnp.where(done_B, pad, token_B)
    logp_B = jnp.where(done_B, 0.0, logp_B)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    return token_B, tokens_BxN.at[:, t].set(token_B), logps_BxN.at[:, t].set(logp_B), done_B

  def body(carry):
    t, cache, logits_BxV, tokens_BxN, logps_BxN, done_B = carry
    token_B, tokens_BxN, logps_BxN, done_B = emit(t, logits_BxV, tokens_BxN, logps_BxN, done_B)
    logits_BxV, cache = decode_step(
      model, variables, cache, token_B, width + t, mask_BxS, lengths_B + t
    )
    return t + 1, cache, logits_BxV, tokens_BxN, logps_BxN, done_B

  tokens_BxN = jnp.full((b, max_new_tokens), pad, jnp.int32)
  logps_BxN = jnp.zeros((b, max_new_tokens), jnp.float32)
  done_B = jnp.zeros((b,), bool)
  # The last token is emitted without a decode step after it (the cache has no slot for it).
  carry = (0, cache, logits_BxV, tokens_BxN, logps_BxN, done_B)
  last = max_new_tokens - 1
  t, cache, logits_BxV, tokens_BxN, logps_BxN, done_B = jax.lax.while_loop(
    lambda c: (c[0] < last) & ~jnp.all(c[-1]), body, carry
  )
  _, tokens_BxN, logps_BxN, _ = jax.lax.cond(
    t == last,
    lambda: emit(last, logits_BxV, tokens_BxN, logps_BxN, done_B),
    lambda: (jnp.zeros((b,), jnp.int32), tokens_BxN, logps_BxN, done_B),
  )
  return tokens_BxN, logps_BxN


def check_request(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p):
  """Bad input, said before anything compiles: returns the prompts trimmed to their longest."""
  cfg = getattr(model, "config", None)
  if not isinstance(model, Decoder) or cfg is None or cfg.kind != "decoder":
    raise ValueError(
      f"generate needs a Decoder (kind='decoder'); got {type(model).__name__}"
      + (f" of kind={cfg.kind!r}" if cfg is not None else "")
      + ": an encoder scores or classifies text, it does not continue it"
    )
  ids = np.asarray(prompt_ids)
  mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask)
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(
      f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must both be [batch, length]"
    )
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 keeps every token)")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 keeps every token)")
  if top_k > cfg.vocab_size:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary ({cfg.vocab_size}): lower it")
  lengths = mask.astype(bool).sum(-1)
  if lengths.size and lengths.min() == 0:
    raise ValueError(
      f"prompt {int(np.argmin(lengths))} is empty (its mask is all 0): give every row a token"
    )
  tokens = ids[mask.astype(bool)]
  if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
    raise ValueError(
      f"prompt token id {int(tokens.max() if tokens.max() >= cfg.vocab_size else tokens.min())}"
      f" lies outside the vocabulary [0, {cfg.vocab_size}): tokenize with the model's tokenizer"
    )
  width = int(lengths.max()) if lengths.size else 0
  if width + max_new_tokens > cfg.max_len:
    raise ValueError(
      f"a prompt of {width} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
      f"max_len={cfg.max_len}: shorten the prompt to at most {cfg.max_len - max_new_tokens} "
      "tokens or ask for fewer new tokens"
    )
  ids, mask, _ = (np.asarray(x) for x in left_align(jnp.asarray(ids), jnp.asarray(mask)))
  return ids[:, ids.shape[1] - width :], mask[:, mask.shape[1] - width :]


def generate(
  model: Decoder,
  variables: dict,
  prompt_ids,
  prompt_mask=None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng=None,
  eos_id: int | None = None,
  kv_cache: str | None = None,
  mesh=None,
  rules=None,
):
  """New tokens BxN (int32) and their log-probabilities BxN (float32) for a batch of prompts.

  `prompt_ids` BxL with `prompt_mask` BxL (1 = token, 0 = pad; None: all tokens), padded on
  either side. Greedy when temperature is 0; otherwise `rng` (a jax key) is required.
  `kv_cache` "float" | "int8" overrides the config's. With `mesh` and `rules` (logical axis
  rules, e.g. parallel.get_rules("fsdp_tp")), decoding runs sharded under them.
  """
  ids, mask = check_request(
    model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p
  )
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
  model = decoding_model(model, kv_cache)
  variables = {k: v for k, v in variables.items() if k not in ("cache", "intermediates")}
  run = functools.partial(
    _generate,
    model,
    variables,
    ids.astype(np.int32),
    mask.astype(np.int32),
    jax.random.key(0) if rng is None else rng,
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    eos_id=eos_id,
  )
  if mesh is None:
    return run()
  if rules is None:
    raise ValueError("mesh= needs rules= too: e.g. parallel.get_rules('fsdp_tp')")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return run()


def greedy_agreement(model_a, variables_a, model_b, variables_b, prompt_ids, max_new_tokens):
  """The fraction of greedy new tokens on which model b's continuation of `prompt_ids` (BxL,
  no padding) equals model a's, position by position: e.g. a compressed model (b) against the
  float one (a). Once the two part ways the rest usually differs too: it measures how long
  they agree as much as how often."""
  a, _ = generate(model_a, variables_a, prompt_ids, max_new_tokens=max_new_tokens)
  b, _ = generate(model_b, variables_b, prompt_ids, max_new_tokens=max_new_tokens)
  return float(np.mean(np.asarray(a) == np.asarray(b)))
