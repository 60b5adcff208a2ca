"""A Decoder's prefill and decode step serialized with `jax.export`: served without model code.

    export_decoder(model, variables, batch=4, prompt_len=16, max_new_tokens=32, directory=d)
    served = load_decoder(d)        # reads files only: no flax module is built
    tokens_BxN, logprobs_BxN = served.generate(ids_BxL, mask_BxL, max_new_tokens=32)

The directory holds `prefill.bin` and `decode.bin` (StableHLO programs, models.decode.prefill
and decode_step for one batch and cache size), `variables.npz` (the variables, flattened with
'/'-joined paths; they and the cache are explicit arguments of both programs, not constants
baked in) and `meta.json` (batch, prompt_len, cache_len, vocab, kv_cache and each array's
dtype). The programs take and return flat {'/'-path: array} dicts, so serving needs no tree
structure from the model. Prompts come left-aligned (models.decode.left_align), `prompt_len`
wide; the loaded `generate` is greedy, as models.generate at temperature 0 without eos_id.
"""

import dataclasses
import json
import os
from typing import Callable

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from models import decode


def _flat(tree) -> dict:
  """{"a/b/c": leaf} of a nested dict of arrays."""
  return traverse_util.flatten_dict(tree, sep="/")


def _nest(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def _spec(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def export_decoder(
  model,
  variables: dict,
  batch: int,
  prompt_len: int,
  max_new_tokens: int,
  directory: str,
  kv_cache: str | None = None,
  platforms=None,
) -> dict:
  """Writes prefill.bin, decode.bin, variables.npz and meta.json to `directory`; returns meta.

  `platforms` (e.g. ("cpu", "cuda")): where the programs may run; default this machine's."""
  cache_len = prompt_len + max_new_tokens
  if cache_len > model.config.max_len:
    raise ValueError(
      f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} exceeds the model's "
      f"max_len={model.config.max_len}"
    )
  dec = decode.decoding_model(model, kv_cache)
  variables = nn.unbox({k: v for k, v in variables.items() if k not in ("cache", "intermediates")})
  flat_vars = {k: np.asarray(v) for k, v in _flat(variables).items()}
  cache = _flat(nn.unbox(decode.init_cache(dec, variables, batch, cache_len)))

  def prefill(variables, cache, ids_BxL, mask_BxS, positions_BxL):
    logits, cache = decode.prefill(
      dec, _nest(variables), _nest(cache), ids_BxL, mask_BxS, positions_BxL
    )
    return logits, _flat(cache)

  def decode_step(variables, cache, tokens_B, index, mask_BxS, positions_B):
    logits, cache = decode.decode_step(
      dec, _nest(variables), _nest(cache), tokens_B, index, mask_BxS, positions_B
    )
    return logits, _flat(cache)

  i32 = jnp.int32
  var_specs = {k: _spec(v) for k, v in flat_vars.items()}
  cache_specs = {k: _spec(v) for k, v in cache.items()}
  mask = jax.ShapeDtypeStruct((batch, cache_len), i32)
  kw = {} if platforms is None else dict(platforms=tuple(platforms))
  exported = {
    "prefill": jax.export.export(jax.jit(prefill), **kw)(
      var_specs,
      cache_specs,
      jax.ShapeDtypeStruct((batch, prompt_len), i32),
      mask,
      jax.ShapeDtypeStruct((batch, prompt_len), i32),
    ),
    "decode": jax.export.export(jax.jit(decode_step), **kw)(
      var_specs,
      cache_specs,
      jax.ShapeDtypeStruct((batch,), i32),
      jax.ShapeDtypeStruct((), i32),
      mask,
      jax.ShapeDtypeStruct((batch,), i32),
    ),
  }
  os.makedirs(directory, exist_ok=True)
  for name, program in exported.items():
    with open(os.path.join(directory, f"{name}.bin"), "wb") as f:
      f.write(program.serialize())
  # npz keeps numpy's own dtypes; bfloat16 / int4 (ml_dtypes) are read back by their names.
  np.savez(os.path.join(directory, "variables.npz"), **flat_vars)
  meta = dict(
    batch=batch,
    prompt_len=prompt_len,
    cache_len=cache_len,
    vocab=model.config.vocab_size,
    kv_cache=dec.config.kv_cache,
    dtypes={k: str(v.dtype) for k, v in flat_vars.items()},
    cache={k: [list(v.shape), str(v.dtype)] for k, v in cache.items()},
  )
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


@dataclasses.dataclass
class Served:
  """What load_decoder returns: the two programs with the variables bound, an empty cache and
  a greedy generate loop."""

  prefill: Callable  # (cache, ids_BxL, mask_BxS, positions_BxL) -> (logits_BxV, cache)
  decode: Callable  # (cache, tokens_B, index, mask_BxS, positions_B) -> (logits_BxV, cache)
  cache: dict  # empty: {"/"-path: zeros}
  meta: dict

  def generate(self, ids_BxL, mask_BxL, max_new_tokens: int):
    """Greedy new tokens BxN and their log-probs BxN for left-aligned prompts (prompt_len
    wide; models.decode.left_align), as models.generate at temperature 0."""
    m = self.meta
    ids_BxL, mask_BxL = np.asarray(ids_BxL, np.int32), np.asarray(mask_BxL, np.int32)
    if ids_BxL.shape != (m["batch"], m["prompt_len"]) or mask_BxL.shape != ids_BxL.shape:
      raise ValueError(
        f"prompts {ids_BxL.shape} / mask {mask_BxL.shape}: this export takes "
        f"[{m['batch']}, {m['prompt_len']}] (left-aligned)"
      )
    if not 1 <= max_new_tokens <= m["cache_len"] - m["prompt_len"]:
      raise ValueError(
        f"max_new_tokens={max_new_tokens} must lie in 1..{m['cache_len'] - m['prompt_len']}"
      )
    b, width = ids_BxL.shape
    positions_BxL = np.maximum(np.cumsum(mask_BxL, axis=-1) - 1, 0).astype(np.int32)
    lengths_B = mask_BxL.sum(-1).astype(np.int32)
    mask_BxS = np.concatenate([mask_BxL, np.ones((b, m["cache_len"] - width), np.int32)], -1)
    logits, cache = self.prefill(self.cache, ids_BxL, mask_BxS, positions_BxL)
    tokens, logps = [], []
    for t in range(max_new_tokens):
      token_B, logp_B = _greedy(logits)
      tokens.append(token_B)
      logps.append(logp_B)
      if t + 1 < max_new_tokens:  # the last token needs no decode step after it
        logits, cache = self.decode(
          cache, token_B, np.int32(width + t), mask_BxS, (lengths_B + t).astype(np.int32)
        )
    return jnp.stack(tokens, 1), jnp.stack(logps, 1)


@jax.jit
def _greedy(logits_BxV):
  token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), token_B[:, None], -1)[:, 0]
  return token_B, logp_B


def load_decoder(directory: str) -> Served:
  """The exported programs with the saved variables bound (files only: no model code runs)."""
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  programs = {}
  for name in ("prefill", "decode"):
    with open(os.path.join(directory, f"{name}.bin"), "rb") as f:
      programs[name] = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, "variables.npz")) as npz:
    variables = {}
    for name, dtype in meta["dtypes"].items():
      x = npz[name]
      if str(x.dtype) != dtype:  # ml_dtypes' types come back as raw bytes
        x = x.view(jnp.dtype(dtype))
      variables[name] = jax.device_put(x)
  cache = {k: jnp.zeros(shape, jnp.dtype(dtype)) for k, (shape, dtype) in meta["cache"].items()}
  prefill_call = jax.jit(programs["prefill"].call)
  decode_call = jax.jit(programs["decode"].call)

  def prefill(cache, ids_BxL, mask_BxS, positions_BxL):
    return prefill_call(variables, cache, ids_BxL, mask_BxS, positions_BxL)

  def decode_step(cache, tokens_B, index, mask_BxS, positions_B):
    return decode_call(variables, cache, tokens_B, index, mask_BxS, positions_B)

  return Served(prefill=prefill, decode=decode_step, cache=cache, meta=meta)
