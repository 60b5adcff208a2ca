"""Text (or token ids) continued by a trained run's model, or a Hugging Face checkpoint's.

    python -m experiments.generate --workdir RUN --prompt "the" --prompt "a b" --max_new_tokens 32
    python -m experiments.generate --workdir RUN --prompt_ids "1 2 3" --temperature 0.8 \
        --top_k 40 --top_p 0.95 --seed 0 --kv_cache int8 --json
    python -m experiments.generate --workdir RUN --export RUN/export --prompt "ab"
    python -m experiments.generate --init_from hf:DIR --prompt "Hello" --stop_at_eos
    python -m experiments.generate --workdir RUN --prompt "ab" --mesh 2,4   # data 2 x tensor 4

`--workdir RUN`: a run of `python -m experiments.train`. Its config is read from
RUN/config.json, the model built as the run built it (`experiment.build`), and the params of
its newest checkpoint that reads back restored (parallel.Checkpointer, as a resumed run does):
the float model (with its methods' training-time hooks, e.g. fake quantization). With
`--export RUN/export`, a quantized run's integer export (experiments/methods/quant.py:
`quant.load`) on its serving model (`exp.model_in("serve")`, int8 x int8 -> int32) instead.
Generation runs on one device, or with `--mesh DATA,TENSOR` sharded over that many devices:
the prompts over "data", the heads, the KV cache and the parameters over "tensor" (the fsdp_tp
rules; a parameter without logical axes, e.g. an export's scale, is replicated).

`--init_from hf:DIR`: `models.hf.from_pretrained(DIR)`, with the tokenizer DIR holds (if any).

Prompts: `--prompt` text (repeatable), `--prompts_file` (one prompt a line) through the run's
tokenizer (a run on the synthetic language reads the characters of its alphabet), or
`--prompt_ids "1 2 3"` (repeatable; space-separated ids) for a model without a tokenizer.
Each prompt is printed with its continuation; `--json` prints one object per prompt:
{"prompt", "tokens", "text", "logprobs"}. Bad input is one line (FATAL: ...), no traceback.
"""

import argparse
import json
import os
import sys

import numpy as np

from experiments.train import ConfigError


class SymbolTokenizer:
  """The synthetic language's characters (experiments/data/markov.py ALPHABET) <-> the ids the
  run's model reads (the byte tokenizer's, or the symbols' indices)."""

  eos_id = None

  def __init__(self, source):
    from experiments.data.markov import ALPHABET

    self.alphabet = ALPHABET[: source.n_symbols]
    self.symbol_ids = [int(i) for i in source.symbol_ids]
    self.by_id = {i: c for i, c in zip(self.symbol_ids, self.alphabet)}

  def encode(self, text: str) -> list[int]:
    bad = sorted({c for c in text if c not in self.alphabet})
    if bad:
      raise ConfigError(
        f"--prompt {text!r}: {''.join(bad)!r} not in the synthetic language's alphabet "
        f"{self.alphabet!r}; use those characters or --prompt_ids"
      )
    return [self.symbol_ids[self.alphabet.index(c)] for c in text]

  def decode(self, ids) -> str:
    return "".join(self.by_id.get(int(i), "") for i in ids)


def load_run(workdir: str, export: str | None = None):
  """(model, variables, tokenizer) of the run in `workdir`: its newest readable checkpoint, or
  with `export`, the integer weights its quantization wrote there, on the serving model."""
  import jax
  import ml_collections

  import parallel
  from experiments import tasks
  from experiments.data.tokenizer import get_tokenizer
  from experiments.experiment import build

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"--workdir {workdir}: no config.json (not a run of experiments.train)")
  try:
    with open(path) as f:
      written = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e})") from None
  for key in ("versions", "history"):  # what write_config adds to the config
    written.pop(key, None)
  config = ml_collections.ConfigDict(written)
  # Served from one device, whatever mesh trained it (the parameters' layout is the same).
  config.mesh.update(stage=1, data=1, fsdp=1, tensor=1)
  config.mesh.dcn.update(stage=1, data=1, fsdp=1, tensor=1)
  try:
    exp = build(config, None, jax.devices()[:1])
    abstract, _ = exp.shard_shapes()
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise ConfigError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
  if config.data.get("source", "markov") == "markov" and config.task == "lm":
    tokenizer = SymbolTokenizer(tasks.markov_source(config))
  else:
    tokenizer = get_tokenizer(config.data.tokenizer)
  if export:
    return (*load_export(exp, export), tokenizer)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if parallel.checkpoint.latest_step(ckpt_dir) is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint in {ckpt_dir}")
  with parallel.Checkpointer(ckpt_dir) as ckpt:
    state, step = ckpt.restore_latest(abstract)
  variables = {"params": state["params"], **state.get("collections", {})}
  return exp.model, variables, tokenizer


def load_export(exp, directory: str):
  """(serving model, variables) of a quantized run's integer export (quant.save's format)."""
  from compress import quant

  if exp.method("quant") is None:
    raise ConfigError(f"--export {directory}: the run has no quantization (quant.method='none')")
  if not os.path.isfile(os.path.join(directory, "format.json")):
    raise ConfigError(f"--export {directory}: no integer export there (no format.json)")
  return exp.model_in("serve"), quant.load(directory)


def load_hf(spec: str):
  """(model, params, tokenizer or None) of `hf:DIR`."""
  import models
  from experiments.data.tokenizer import HFTokenizer

  path = spec[3:]
  if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".")):
    raise ConfigError(f"--init_from {spec}: no such directory")
  try:
    model, params = models.hf.from_pretrained(path)
  except (ValueError, KeyError, OSError) as e:
    raise ConfigError(f"--init_from {spec}: {e}") from e
  names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
  has_tok = not os.path.isdir(path) or any(os.path.exists(os.path.join(path, n)) for n in names)
  tokenizer = None
  if has_tok:
    try:
      tokenizer = HFTokenizer(path)
    except (ValueError, ImportError):
      tokenizer = None
  return model, {"params": params}, tokenizer


def prompts_of(args, tokenizer) -> list[tuple[str | list[int], list[int]]]:
  """[(the prompt as given, its ids)]."""
  texts = list(args.prompt or [])
  if args.prompts_file:
    try:
      with open(args.prompts_file) as f:
        texts += [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
      raise ConfigError(f"--prompts_file {args.prompts_file}: {e.strerror}") from None
  out = []
  if texts and tokenizer is None:
    raise ConfigError("this model has no text tokenizer: give the prompts as --prompt_ids '1 2 3'")
  for t in texts:
    ids = tokenizer.encode(t)
    if not ids:
      raise ConfigError(f"--prompt {t!r} is empty once tokenized: give at least one token")
    out.append((t, ids))
  for s in args.prompt_ids or []:
    try:
      ids = [int(x) for x in s.split()]
    except ValueError:
      raise ConfigError(f"--prompt_ids {s!r}: expected space-separated integers") from None
    if not ids:
      raise ConfigError("--prompt_ids '': give at least one id")
    out.append((ids, ids))
  if not out:
    raise ConfigError("no prompt: give --prompt, --prompts_file or --prompt_ids")
  return out


def mesh_of(spec: str | None, batch: int):
  """(mesh, rules) of `--mesh DATA,TENSOR`, (None, None) without it."""
  if not spec:
    return None, None
  import jax

  import parallel

  try:
    data, tensor = (int(x) for x in spec.split(","))
  except ValueError:
    raise ConfigError(f"--mesh {spec}: expected DATA,TENSOR, e.g. --mesh 2,4") from None
  n = len(jax.devices())
  if data < 1 or tensor < 1 or data * tensor > n:
    raise ConfigError(
      f"--mesh {spec}: needs {data * tensor} devices, {n} here (on CPU, set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={max(data * tensor, 1)})"
    )
  if batch % data:
    raise ConfigError(f"--mesh {spec}: {batch} prompts do not split over data={data}")
  mesh = parallel.make_mesh(data, 1, tensor, devices=jax.devices()[: data * tensor])
  return mesh, parallel.get_rules("fsdp_tp")


def place(model, variables, mesh, rules):
  """`variables` on `mesh`: each leaf with the sharding of its logical axes in the model's
  init (when it has them, at the same shape), else replicated."""
  import flax.linen as nn
  from flax import traverse_util
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  import parallel

  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    shardings = parallel.sharding.logical_to_shardings(boxed, mesh, rules)
  known = traverse_util.flatten_dict(nn.unbox(shardings), sep="/")
  shapes = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  flat = traverse_util.flatten_dict(variables, sep="/")
  placed = {}
  for k, v in flat.items():
    fits = k in known and tuple(shapes[k].shape) == tuple(v.shape)
    placed[k] = jax.device_put(v, known[k] if fits else NamedSharding(mesh, P()))
  return traverse_util.unflatten_dict(placed, sep="/")


def generate(args) -> list[dict]:
  """One {"prompt", "tokens", "text", "logprobs"} per prompt (text None without a tokenizer)."""
  import jax

  import models

  if bool(args.workdir) == bool(args.init_from):
    raise ConfigError("give exactly one of --workdir RUN and --init_from hf:DIR")
  if args.init_from and not args.init_from.startswith("hf:"):
    raise ConfigError(f"--init_from {args.init_from}: expected hf:<directory or Hub name>")
  if args.export and not args.workdir:
    raise ConfigError("--export DIR needs --workdir RUN: the run whose export it is")
  if args.kv_cache not in (None, "float", "int8"):
    raise ConfigError(f"--kv_cache {args.kv_cache}: choose float or int8")
  if args.workdir:
    model, variables, tokenizer = load_run(args.workdir, args.export)
  else:
    model, variables, tokenizer = load_hf(args.init_from)
  prompts = prompts_of(args, tokenizer)
  vocab = model.config.vocab_size
  for _, ids in prompts:
    if min(ids) < 0 or max(ids) >= vocab:
      raise ConfigError(f"prompt ids {ids} fall outside the model's vocabulary 0..{vocab - 1}")
  width = max(len(ids) for _, ids in prompts)
  ids_BxL = np.zeros((len(prompts), width), np.int32)
  mask_BxL = np.zeros_like(ids_BxL)
  for row, (_, ids) in enumerate(prompts):
    ids_BxL[row, : len(ids)], mask_BxL[row, : len(ids)] = ids, 1
  eos_id = getattr(tokenizer, "eos_id", None) if args.stop_at_eos else None
  if args.stop_at_eos and eos_id is None:
    raise ConfigError("--stop_at_eos: this model's tokenizer has no EOS token")
  mesh, rules = mesh_of(args.mesh, len(prompts))
  if mesh is not None:
    variables = place(model, variables, mesh, rules)
  try:
    tokens_BxN, logprobs_BxN = models.generate(
      model,
      variables,
      ids_BxL,
      mask_BxL,
      max_new_tokens=args.max_new_tokens,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      rng=jax.random.key(args.seed),
      eos_id=eos_id,
      kv_cache=args.kv_cache,
      mesh=mesh,
      rules=rules,
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  tokens_BxN, logprobs_BxN = np.asarray(tokens_BxN), np.asarray(logprobs_BxN)
  return [
    {
      "prompt": prompt,
      "tokens": [int(t) for t in tokens],
      "text": None if tokenizer is None else tokenizer.decode(tokens),
      "logprobs": [float(x) for x in logprobs],
    }
    for (prompt, _), tokens, logprobs in zip(prompts, tokens_BxN, logprobs_BxN)
  ]


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.generate", description=__doc__.split("\n")[0]
  )
  p.add_argument("--workdir", help="a run of experiments.train: its newest checkpoint")
  p.add_argument("--export", help="with --workdir: the run's integer export (RUN/export)")
  p.add_argument("--init_from", help="hf:<directory or Hub name>: a Hugging Face checkpoint")
  p.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
  p.add_argument("--prompts_file", help="a file of text prompts, one a line")
  p.add_argument("--prompt_ids", action="append", help="a prompt as space-separated token ids")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0, help="0: every token")
  p.add_argument("--top_p", type=float, default=1.0, help="1: every token")
  p.add_argument("--seed", type=int, default=0, help="the sampler's key")
  p.add_argument("--kv_cache", default=None, help="float | int8 (default: the model config's)")
  p.add_argument("--stop_at_eos", action="store_true", help="stop a row at the tokenizer's EOS")
  p.add_argument("--json", action="store_true", help="one JSON object per prompt")
  p.add_argument("--mesh", help="DATA,TENSOR: decode sharded over that many devices")
  return p


def main(argv: list[str] | None = None) -> list[dict]:
  """Parses `argv` (default: sys.argv[1:]), generates and prints; returns the rows printed.
  Bad input exits with one line, FATAL: ..., as experiments.train does."""
  args = parser().parse_args(argv)
  try:
    rows = generate(args)
  except ConfigError as e:
    sys.exit(f"FATAL: {e}")
  for row in rows:
    if args.json:
      print(json.dumps(row))
    else:
      prompt = (
        row["prompt"] if isinstance(row["prompt"], str) else " ".join(map(str, row["prompt"]))
      )
      shown = row["text"] if row["text"] is not None else " ".join(map(str, row["tokens"]))
      print(f"{prompt} => {shown}")
  return rows


if __name__ == "__main__":
  main()
