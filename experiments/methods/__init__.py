"""Compression methods as plug-ins: one module per method, one small interface.

A method owns a config section (`config.<name>`; `method="none"` switches it off) and says
what it does at each stage of a run. The train loop (experiments/train.py) asks every active
method, in their order, and names none of them:

    build     __init__(config)            checks that need no model (every bad value raises)
              bind(mc, workdir, build_model) -> mc    checks against the model; the student's
                                          model config (e.g. recording attention)
              model_hooks(mode)           kwargs of models.build (dot_general factories)
              wrap_hooks(hooks, mode)     around the others' hooks (LoRA's adapters on
                                          quantization's dot)
              update_rule(rule, schedule) the per-parameter update (LSQ: steps get their Adam)
              wrap_optimizer(tx)          around the whole optimizer (pruning's masks)
              init_extra(rng)             trainable params of its own (state["extra"][name])
              trains()                    a predicate on param paths: only those train (LoRA:
                                          the adapters); the others get no gradient, no
                                          optimizer state, and stay bitwise as loaded
    start     setup(run)                  before the state exists (train and load a teacher)
              prepare(run, state, fresh)  after init or load (fresh) or a restore: calibrate,
                                          prune now, copy teacher layers, cache logits
    train     loss(run, loss) -> loss     wraps the loss (distillation terms)
    eval      eval_fields(run, state)     fields of every eval row (sparsity)
    end       export(run, state)          files and their evaluated rows (integer, sparse)
    speed     flops(batch, seq_len)       FLOPs it adds to a train step (a teacher's forward)

Order (`Method.order`): distill (a teacher to initialize from and learn from), lowrank
(factorizes), oneshot (post-training compression with calibration), prune (changes
the weights), quant (calibrates and exports the weights the others left), lora (adapters
around the dots the others made; it freezes the rest). A new method is a
module in this package with a `@register`ed `Method` subclass; see the README's "Adding a
method".
"""

import importlib
import os
import pkgutil

from absl import logging
import jax
import ml_collections


class Method:
  """The interface, with do-nothing defaults: a method overrides the stages it touches."""

  name = ""  # the config section it owns
  order = 100  # when the loop asks it, among the methods (lower: earlier)

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of config.<name>; method="none" switches the method off."""
    return ml_collections.ConfigDict(dict(method="none"))

  @classmethod
  def active(cls, config) -> bool:
    s = config.get(cls.name)
    return s is not None and s.method != "none"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config, self.c = config, config[self.name]

  def bind(self, mc, workdir, build_model):
    return mc

  def model_hooks(self, mode: str = "train") -> dict:
    return {}

  def wrap_hooks(self, hooks: dict, mode: str = "train") -> dict:
    return hooks

  def update_rule(self, rule, schedule):
    return rule

  def wrap_optimizer(self, tx):
    return tx

  def init_extra(self, rng) -> dict | None:
    return None

  def trains(self):
    return None

  def setup(self, run) -> None:
    pass

  def prepare(self, run, state: dict, fresh: bool) -> dict:
    return state

  def loss(self, run, loss):
    return loss

  def eval_fields(self, run, state: dict) -> dict:
    return {}

  def export(self, run, state: dict) -> dict:
    return {}

  def flops(self, batch: int, seq_len: int) -> float:
    return 0.0


_REGISTERED: list = []


def register(cls):
  """Makes `cls` (a Method subclass) a method of every config: a class decorator. The
  modules of this package are registered on first use; a notebook registers its own."""
  if cls not in _REGISTERED:
    _REGISTERED.append(cls)
  return cls


def registry() -> tuple:
  """The method classes, in the order the loop asks them (`order`, then `name`)."""
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{info.name}")
  return tuple(sorted(_REGISTERED, key=lambda m: (m.order, m.name)))


def names() -> tuple:
  return tuple(m.name for m in registry())


def make(config: ml_collections.ConfigDict) -> list:
  """The active methods of `config`, built (their checks run here)."""
  return [cls(config) for cls in registry() if cls.active(config)]


def model_hooks(methods, mode: str = "train") -> dict:
  """The kwargs of models.build every method in `methods` asks for."""
  out = {}
  for m in methods:
    out.update(m.model_hooks(mode))
  for m in methods:  # then around what the others made (LoRA around quantization's dots)
    out = m.wrap_hooks(out, mode)
  return out


def trains(methods):
  """The params that train: those every method's `trains()` predicate accepts (None: all)."""
  preds = [p for p in (m.trains() for m in methods) if p is not None]
  if not preds:
    return None
  return lambda path: all(p(path) for p in preds)


def greedy_agreement(run, model, variables, params, own=False, rows=8, prompt=16, new=16) -> dict:
  """{"greedy_agreement": f}: `models.decode.greedy_agreement` of `model` on `variables` (an
  export as served) with a reference decoder, on the first `prompt` tokens of `rows` eval
  sequences, `new` new tokens. The reference: the run `eval.agreement_with` names (its newest
  checkpoint, read into `params`' structure), else (`own`) the float model of `params`; {} with
  neither, or for an encoder."""
  import numpy as np

  import models
  from models import decode
  import parallel

  exp = run.exp
  reference = exp.config.eval.get("agreement_with", "")
  if exp.model_config.kind != "decoder" or not (reference or own):
    return {}
  ids = np.asarray(exp.task.batch(0, "eval")["inputs"])[:rows, :prompt]
  new = min(new, exp.model_config.max_len - ids.shape[1])
  key = ("greedy", reference or "own", rows, prompt, new)
  if key not in run.cache:  # once per run: a pruned and quantized run has two exports
    if reference:
      params = parallel.load_params(os.path.join(reference, "checkpoints"), params)
    float_model = models.build(exp.model_config)
    run.cache[key] = decode.generate(float_model, {"params": params}, ids, max_new_tokens=new)[0]
  ours, _ = decode.generate(model, variables, ids, max_new_tokens=new)
  return {"greedy_agreement": float(np.mean(np.asarray(ours) == np.asarray(run.cache[key])))}


def export_row(prefix, evaluated, directory, params, size_key, disk_bytes, **extra) -> dict:
  """An export's eval row (keys `prefix`_*), its size on disk and the float32 size of
  `params`, logged."""
  f32_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
  row = {f"{prefix}_{k}": v for k, v in evaluated.items()}
  row.update({size_key: disk_bytes(directory), "float32_bytes": f32_bytes}, **extra)
  share = 100 * row[size_key] / f32_bytes
  logging.info("Exported %s (%.1f%% of float32): %s", directory, share, row)
  return row
