"""EleutherAI's lm-evaluation-harness on trimformer models: a training run's newest checkpoint
(or its integer export) or a Hugging Face checkpoint, scored and continued by trimformer's own
code, as the model "trimformer".

    pip install -e '.[eval]'
    python -m experiments.harness --model trimformer --model_args workdir=RUN \
        --tasks TASK1,TASK2 --include_path TASK_DIR --batch_size 4
    python -m experiments.harness --model trimformer \
        --model_args init_from=hf:DIR,max_length=16 --tasks TASK1 --include_path TASK_DIR

(Both run as written, offline, on local YAML tasks over jsonl files: tests/test_harness.py
writes such tasks. lm-eval's registered tasks, e.g. --tasks lambada_openai, download their
data sets from the Hub on first use.)

`lm_eval --model NAME` only finds the models lm-eval itself lists (it reads no plugin entry
points), so this module's command registers "trimformer" and then runs lm-eval's own command
line with the arguments it was given: every flag of `lm_eval run` (--tasks, --num_fewshot,
--limit, --include_path, --output_path, --log_samples, ...) works. From Python, importing the
module registers the model:

    import lm_eval
    from experiments import harness  # noqa: F401  (registers "trimformer")
    lm_eval.simple_evaluate(model="trimformer", model_args="workdir=RUN", tasks=["lambada_openai"])

model_args (comma-separated key=value):
  workdir=RUN         a run of experiments.train: its config.json and newest checkpoint, loaded
                      as experiments.generate loads them (export=RUN/export: its integer export)
  init_from=hf:DIR    an HF checkpoint (a local directory, or a Hub name online): models.hf
  tokenizer=SPEC      "byte" or an HF tokenizer (a directory or Hub name); default: the run's
                      data.tokenizer, or the one DIR holds
  max_length=N        the longest sequence scored or prompted (default and at most: the
                      model's max_len); longer contexts lose their oldest tokens
  dtype=bfloat16      the compute dtype (parameters stay as stored)
  max_gen_toks=256    generate_until's default number of new tokens
  prefix_token_id=N   what an empty context (and each rolling document) is conditioned on;
                      default: a run's end-of-document token (its training data separates
                      documents with EOS), an HF checkpoint's BOS, else its EOS
  seed=0              the sampling key, for generation requests that ask for do_sample
and from lm-eval's own flags, --batch_size N (rows per compiled call; "auto" means 8).

What each request type computes:
  loglikelihood: the summed log-probabilities of the continuation's tokens after the context
    (the pair tokenized together, then split, as lm-eval's TemplateLM does), and whether each
    of them is the argmax (the first, on ties: tasks.argmax_is). Requests are sorted by length,
    batched, right-padded to the next of a few fixed lengths (powers of two up to max_length)
    and the batch to batch_size rows, so the scoring program compiles once per length.
  loglikelihood_rolling: the document's log-likelihood in windows of max_length tokens, each
    token predicted once with as much context as fits (lm_eval.utils.get_rolling_token_windows
    with context_len=1, made disjoint), the first conditioned on prefix_token_id.
  generate_until: models.decode's greedy generation (a KV cache, one program per batch; prompts
    left-padded to the same fixed lengths), max_gen_toks new tokens or fewer when every row has
    emitted EOS, then cut at the first stop string. Contexts keep their last
    max_length - max_gen_toks tokens. do_sample=True samples with temperature, top_k, top_p.

lm-eval's bootstrap of a metric's standard error (perplexity, acc) forks worker processes,
which JAX warns about (it is multithreaded); it has run through here, and from Python
simple_evaluate(..., bootstrap_iters=0) skips it.

Decoders with the LM head only: an encoder (MLM, classifier) or a token classifier is refused.
Runs on one device (JAX's default: the first GPU or TPU chip when there is one).
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own models: it lists them in an empty registry only)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from experiments.train import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_BATCH = 8
MIN_BUCKET = 16


def length_buckets(max_length: int) -> list[int]:
  """The padded lengths: powers of two from MIN_BUCKET below max_length, then max_length."""
  out, n = [], MIN_BUCKET
  while n < max_length:
    out.append(n)
    n *= 2
  return out + [max_length]


def bucket_of(n: int, buckets: list[int]) -> int:
  """The smallest bucket that holds n tokens."""
  return next(b for b in buckets if b >= n)


def batch_size_of(value) -> int:
  """--batch_size (an int, a numeric string, or "auto"/"auto:N", which mean DEFAULT_BATCH)."""
  if value is None or str(value).startswith("auto"):
    return DEFAULT_BATCH
  try:
    n = int(value)
  except ValueError:
    raise ConfigError(f"batch_size={value!r}: expected a positive integer") from None
  if n < 1:
    raise ConfigError(f"batch_size={value!r}: expected a positive integer")
  return n


def cut_at_stops(text: str, until: list[str]) -> str:
  """`text` up to the first occurrence of any stop string (as lm-eval's HF model cuts)."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def load(workdir=None, init_from=None, export=None, tokenizer=None):
  """(model, variables, tokenizer or None) of a run's workdir or `hf:DIR`, as
  experiments.generate loads them; `tokenizer` ("byte" or an HF name/directory) replaces theirs."""
  from experiments import generate
  from experiments.data.tokenizer import get_tokenizer

  if bool(workdir) == bool(init_from):
    raise ConfigError("give exactly one of workdir=RUN and init_from=hf:DIR in --model_args")
  if export and not workdir:
    raise ConfigError("export=DIR needs workdir=RUN: the run whose export it is")
  if workdir:
    model, variables, tok = generate.load_run(str(workdir), export)
  else:
    if not str(init_from).startswith("hf:"):
      raise ConfigError(f"init_from={init_from}: expected hf:<directory or Hub name>")
    model, variables, tok = generate.load_hf(str(init_from))
  if tokenizer:
    try:
      tok = get_tokenizer(str(tokenizer))
    except (ValueError, ImportError) as e:
      raise ConfigError(f"tokenizer={tokenizer}: {e}") from e
  return model, variables, tok


@register_model("trimformer")
class TrimformerLM(TemplateLM):
  """lm-eval's LM interface over a trimformer Decoder and its variables (see the module doc)."""

  def __init__(
    self,
    workdir: str | None = None,
    init_from: str | None = None,
    export: str | None = None,
    tokenizer: str | None = None,
    batch_size=DEFAULT_BATCH,
    max_batch_size=None,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    dtype: str | None = None,
    prefix_token_id: int | None = None,
    seed: int = 0,
    device=None,
  ):
    super().__init__()
    from models import decode

    model, variables, tok = load(workdir, init_from, export, tokenizer)
    cfg = model.config
    if cfg.kind != "decoder" or cfg.head != "lm":
      raise ConfigError(
        f"{workdir or init_from} is a {cfg.kind} with the {cfg.head!r} head: lm-eval scores "
        "and continues text with a decoder's LM head (kind='decoder', head='lm')"
      )
    if tok is None:
      raise ConfigError(f"{init_from} holds no tokenizer: give tokenizer=<directory or name>")
    if dtype:
      if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
      cfg = dataclasses.replace(cfg, dtype=dtype)
    self.model = decode.decoding_model(model.clone(config=cfg))
    self.variables = {k: v for k, v in variables.items() if k not in ("cache", "intermediates")}
    self.variables = jax.device_put(self.variables, jax.devices()[0])
    self.tok = tok
    self._max_length = int(max_length or cfg.max_len)
    if not 2 <= self._max_length <= cfg.max_len:
      raise ConfigError(
        f"max_length={max_length}: must lie in [2, the model's max_len={cfg.max_len}]"
      )
    self.buckets = length_buckets(self._max_length)
    self._batch_size = batch_size_of(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    if prefix_token_id is None:
      first = tok.eos_id if workdir else getattr(tok, "bos_id", None)
      prefix_token_id = first if first is not None else tok.eos_id
    self._prefix = None if prefix_token_id is None else int(prefix_token_id)
    self.name = str(workdir or init_from)
    self._score = jax.jit(self._score_fn)

  # ---- what lm-eval reads ---------------------------------------------------------------------

  @property
  def eot_token_id(self):
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    if self._prefix is None:
      raise ConfigError(
        f"{self.tok!r} has no BOS or EOS token to condition an empty context (or a rolling "
        "document) on: give prefix_token_id=<id> in --model_args"
      )
    return self._prefix

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tok, "name", type(self.tok).__name__)

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    """The tokenizer's ids, without special tokens (lm-eval adds the prefix token itself)."""
    return list(self.tok.encode(string))

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(tokens)

  # ---- scoring --------------------------------------------------------------------------------

  def _score_fn(self, variables, ids_BxL, targets_BxL, weights_BxL):
    """(summed log-probability of the weighted targets B, all of them the argmax B)."""
    from experiments import tasks

    logits_BxLxV = self.model.apply(variables, ids_BxL).astype(jnp.float32)
    picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], -1)[..., 0]
    logp_BxL = picked_BxL - jax.nn.logsumexp(logits_BxLxV, -1)
    greedy_BxL = tasks.argmax_is(logits_BxLxV, targets_BxL)
    return (
      jnp.sum(logp_BxL * weights_BxL, -1),
      jnp.all(greedy_BxL | (weights_BxL == 0), -1),
    )

  def score_tokens(self, pairs, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids) pair: the
    continuation's tokens after the context, both cut to the last max_length + 1 tokens."""
    rows = []
    for ctx, cont in pairs:
      whole = (list(ctx) + list(cont))[-(self._max_length + 1) :]
      if len(whole) < 2:
        raise ConfigError("a loglikelihood request needs at least one context token")
      rows.append((whole, min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    b = self._batch_size
    for start in tqdm(range(0, len(order), b), disable=disable_tqdm, desc="trimformer"):
      chunk = order[start : start + b]
      width = bucket_of(max(len(rows[i][0]) - 1 for i in chunk), self.buckets)
      ids = np.zeros((b, width), np.int32)
      targets, weights = np.zeros_like(ids), np.zeros((b, width), np.float32)
      for r, i in enumerate(chunk):
        whole, n_cont = rows[i]
        n = len(whole) - 1
        ids[r, :n], targets[r, :n] = whole[:-1], whole[1:]
        weights[r, n - n_cont : n] = 1.0
      logp, greedy = self._score(self.variables, ids, targets, weights)
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """TemplateLM's hook: requests are ((context, continuation) or None, context ids,
    continuation ids)."""
    results = self.score_tokens([(c, x) for _, c, x in requests], disable_tqdm)
    for (key, _, _), res in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      for pair in lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text),
        prefix_token=self.prefix_token_id,
        max_seq_len=self._max_length,
        context_len=1,
      ):
        windows.append(lm_utils.make_disjoint_window(pair))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, self.score_tokens(windows, disable_tqdm)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # ---- generation -----------------------------------------------------------------------------

  def _gen_settings(self, gen_kwargs: dict) -> tuple:
    """(until, max_gen_toks, temperature, top_k, top_p) of a request's generation kwargs."""
    kw = dict(gen_kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    n = kw.pop("max_gen_toks", None) or kw.pop("max_new_tokens", None) or self.max_gen_toks
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not kw.pop("do_sample", temperature > 0):
      temperature = 0.0
    top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
    if int(n) >= self._max_length:
      raise ConfigError(
        f"max_gen_toks={n} leaves no room for the prompt in max_length={self._max_length}"
      )
    return tuple(until), int(n), temperature, top_k, top_p

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from models import decode

    groups = {}
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args
      groups.setdefault(self._gen_settings(gen_kwargs), []).append(i)
    out = [None] * len(requests)
    b, eos = self._batch_size, self.tok.eos_id
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="trimformer generate")
    for (until, n_new, temperature, top_k, top_p), members in groups.items():
      room = self._max_length - n_new
      prompts = {}
      for i in members:
        ids = self.tok_encode(requests[i].args[0])[-room:]
        prompts[i] = ids or [self.prefix_token_id]
      members = sorted(members, key=lambda i: -len(prompts[i]))
      for start in range(0, len(members), b):
        chunk = members[start : start + b]
        width = min(bucket_of(len(prompts[chunk[0]]), self.buckets), room)
        ids, mask = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
        for r in range(b):  # spare rows repeat the first prompt
          p = prompts[chunk[r] if r < len(chunk) else chunk[0]]
          ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
        # models.generate trims the padding to the longest prompt (a compile per width);
        # its program is called here on the bucketed width instead.
        tokens, _ = decode._generate(
          self.model,
          self.variables,
          ids,
          mask,
          jax.random.key(self.seed),
          max_new_tokens=n_new,
          temperature=temperature,
          top_k=top_k,
          top_p=top_p,
          eos_id=eos,
        )
        tokens = np.asarray(tokens)
        for r, i in enumerate(chunk):
          row = [int(t) for t in tokens[r]]
          if eos is not None and eos in row:
            row = row[: row.index(eos)]
          text = cut_at_stops(self.tok.decode(row), list(until))
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return out


def main(argv: list[str] | None = None):
  """lm-eval's command line (`lm_eval run ...` flags) with "trimformer" registered; bad
  model_args exit with one line, FATAL: ..., as experiments.generate does."""
  from lm_eval.__main__ import cli_evaluate

  sys.argv = ["python -m experiments.harness", *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  except ConfigError as e:
    sys.exit(f"FATAL: {e}")


if __name__ == "__main__":
  main()
