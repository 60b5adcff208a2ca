"""The checks `experiment.build` runs before anything compiles, and the check of every batch:
each error names the value, what it must be, and the override that fixes it."""

import json
import logging
import numbers
import os

import ml_collections
import numpy as np

import models
from models import hf, hf_files
from experiments import methods
from experiments.configs import common
from parallel import checkpoint

# Keys that say how a run is carried out, not what it computes: any resume may change them.
HOW = (
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.async_checkpoint",
  "train.checkpoint_digest",
  "train.stop_after_steps",
  "data.tfds.data_dir",
  "init_from",  # read by a fresh run only
)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def config_changes(old: dict, config: ml_collections.ConfigDict) -> dict:
  """{dotted key: (value in the run's config.json, value now)} for every key that differs;
  a key the old run predates counts as its default (experiments/configs/common.defaults)."""
  new = _flat(json.loads(config.to_json_best_effort()))
  old = {**common.defaults(config), **_flat({k: v for k, v in old.items() if k != "history"})}
  old.pop("versions", None)
  return {k: (old.get(k), new.get(k)) for k in sorted(new) if old.get(k) != new.get(k)}


def check_writable(workdir: str):
  """Refuses a --workdir that is a file, or that this process could not write to."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file: give a directory (new or a run's).")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):  # the nearest directory that exists: it gets created
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(
      f"--workdir {workdir}: {existing} is not writable by this user. Pick a directory you "
      "can write to, or change its permissions."
    )


def check_workdir(workdir: str, config: ml_collections.ConfigDict):
  """Refuses a workdir that cannot be written, or that holds a run of a different model
  (its checkpoints would not fit)."""
  check_writable(workdir)
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path} is not valid JSON ({e}): the workdir's record of its run is damaged. Restore "
      "it, or use a new --workdir."
    ) from None
  old_model, new_model = old.get("model", {}), config.model.to_dict()
  default = common.defaults(config)  # a field added since the old run: its default then
  old_model = {
    **{k: default[f"model.{k}"] for k in new_model if f"model.{k}" in default},
    **old_model,
  }
  diff = {
    k: (old_model.get(k), new_model.get(k))
    for k in set(old_model) | set(new_model)
    if old_model.get(k) != new_model.get(k)
  }
  if old.get("task") != config.task:
    diff["task"] = (old.get("task"), config.task)
  for method in methods.registry():  # a section the old run predates held its defaults
    section, default = method.name, method.section().to_dict()
    if section in config and {**default, **old.get(section, {})} != config[section].to_dict():
      diff[section] = (old.get(section), config[section].to_dict())
  if diff:
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(
      f"--workdir {workdir} holds a run with a different model config ({changes}). "
      "Use a new --workdir, or the same model config to resume that run."
    )
  # A finished run trains no more: a change that would alter training would change nothing
  # (and config.json would claim it). More train.steps continue it, the change recorded.
  done = checkpoint.latest_step(os.path.join(workdir, "checkpoints"))
  changed = {
    k: v
    for k, v in config_changes(old, config).items()
    if k != "train.steps" and not k.startswith(("mesh.", *HOW))
  }
  if done is not None and done >= config.train.steps and changed:
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    raise ValueError(
      f"--workdir {workdir} holds a run that finished at step {done}; this config changes "
      f"{changes}, which would train nothing. Use a new --workdir for the changed run, or "
      "raise train.steps to continue this one with the change (recorded in its config.json)."
    )


def check_init_from(config: ml_collections.ConfigDict):
  """An HF checkpoint to start from (init_from="hf:<directory>") must be one the model
  families read: refused from its config.json, before the model's init compiles. A Hub
  name is checked when it is fetched."""
  source = config.get("init_from") or ""
  directory = source[3:] if source.startswith("hf:") else ""
  if not os.path.isfile(os.path.join(directory, "config.json")):
    return
  hf.architecture(hf_files.read_config(directory))


def check_batch(config: ml_collections.ConfigDict, mesh, n_feeds: int):
  """Batch sizes must split over the data-parallel shards, feeding processes, microbatches."""
  t, n_proc = config.train, n_feeds
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for name, bs in (("train.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
    if bs % batch_shards or bs % n_proc:
      raise ValueError(
        f"{name}={bs} is not divisible by the data-parallel shards "
        f"(mesh.data*mesh.fsdp={batch_shards}) and processes ({n_proc})."
      )
  stages = mesh.shape.get("stage", 1)
  sizes = [("train.batch_size", t.batch_size)]
  if stages > 1:  # the pipeline splits eval batches too
    sizes.append(("eval.batch_size", config.eval.batch_size))
  for name, bs in sizes:
    if bs % (t.microbatches * batch_shards):
      raise ValueError(
        f"{name}={bs} does not split into train.microbatches={t.microbatches} microbatches "
        f"of a multiple of {batch_shards} rows (mesh.data*mesh.fsdp)."
      )
  if 1 < stages and t.microbatches < stages:
    bubble = (stages - 1) / (t.microbatches + stages - 1)
    logging.warning(
      "train.microbatches=%d is fewer than mesh.stage=%d pipeline stages: a stage is idle "
      "%.0f%% of the time (the bubble); microbatches >= 4 x stages keeps it under 20%%.",
      t.microbatches,
      stages,
      100 * bubble,
    )


# (dotted key, the test its value must pass, what it must be): the counts, sizes and rates
# that nothing else checks before compiling. A key the config lacks is not checked.
RANGES = (
  ("train.steps", lambda v: v >= 0, ">= 0 (0: no training, e.g. PTQ or a one-shot prune)"),
  ("train.batch_size", lambda v: v >= 1, ">= 1"),
  ("train.seq_len", lambda v: v >= 1, ">= 1"),
  ("train.microbatches", lambda v: v >= 1, ">= 1 (1: the whole batch at once)"),
  ("train.log_every", lambda v: v >= 1, ">= 1 (steps between train metrics)"),
  ("train.checkpoint_every", lambda v: v >= 1, ">= 1 (steps between checkpoints)"),
  ("train.keep_checkpoints", lambda v: v >= 1, ">= 1 (checkpoints kept on disk)"),
  ("train.stop_after_steps", lambda v: v >= 0, ">= 0 (0: run to train.steps)"),
  ("eval.every", lambda v: v >= 1, ">= 1 (steps between evaluations)"),
  ("eval.steps", lambda v: v >= 0, ">= 0 (0: the whole eval split)"),
  ("eval.batch_size", lambda v: v >= 1, ">= 1"),
  ("optim.lr", lambda v: v >= 0, ">= 0"),
  ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
  ("optim.final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (of optim.lr)"),
  ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
  ("optim.eps", lambda v: v > 0, "> 0"),
  ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
  ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0: no clipping)"),
  ("quant.step_lr_scale", lambda v: v > 0, "> 0 (LSQ: the step sizes' lr multiplier)"),
  ("data.markov.n_symbols", lambda v: 2 <= v <= 64, "in [2, 64] (the source's alphabet)"),
  ("data.markov.order", lambda v: v >= 1, ">= 1"),
  ("data.tfds.shuffle_buffer", lambda v: v >= 1, ">= 1 (1: no shuffling)"),
  ("train.data_batches", lambda v: v >= 0, ">= 0 (0: a fresh batch every step)"),
  ("train.max_nonfinite", lambda v: v >= 0, ">= 0 (non-finite steps skipped before stopping)"),
  ("prune.sparsity", lambda v: 0 <= v < 1, "in [0, 1) (0.9 prunes 90% of the weights)"),
  ("quant.bits", lambda v: v == 0 or 2 <= v <= 8, "0 (float) or an integer from 2 to 8"),
  ("quant.act_bits", lambda v: v == 0 or 2 <= v <= 8, "0 (float) or an integer from 2 to 8"),
  ("quant.storage_bits", lambda v: v == 0 or 2 <= v <= 8, "0 (float32) or from 2 to 8"),
)


def check_ranges(config: ml_collections.ConfigDict, prefix: str = ""):
  """Refuses the RANGES values out of range, in `config` and the runs it holds (pretrain,
  teacher), which would otherwise fail (or misbehave) only after compiling."""
  nonfinite = config.get("train", {}).get("nonfinite", "skip")
  if nonfinite not in ("skip", "stop"):
    raise ValueError(
      f"{prefix}train.nonfinite={nonfinite!r}: 'skip' (skip a step whose loss or gradient is "
      "not finite, up to train.max_nonfinite of them) or 'stop' (stop at the first)."
    )
  for key, ok, want in RANGES:
    node = config
    for part in key.split("."):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if node is None:
      continue
    if isinstance(node, bool) or not isinstance(node, numbers.Real) or not ok(node):
      raise ValueError(f"{prefix}{key}={node!r} must be {want}: set --config.{prefix}{key}.")
  for section in common.RUN_SECTIONS:
    if config.get(section):
      check_ranges(config[section], f"{prefix}{section}.")


def check_tokens(batch: dict, mc: models.ModelConfig, split: str, step: int):
  """Refuses a batch the model cannot read, on the host, before it reaches the devices
  (where an id past the embedding table would be clamped silently): token ids outside
  [0, vocab_size) in "inputs" (and "targets" where their weight is not 0), and sequences
  longer than the model's learned positions."""
  where = f"The {split} batch at step {step}"
  inputs = batch["inputs"]
  if mc.positions == "learned" and inputs.shape[-1] > mc.max_len:
    raise ValueError(
      f"{where} has sequences of {inputs.shape[-1]} tokens, more than the model's learned "
      f"positions (model.max_len={mc.max_len}): raise model.max_len or shorten the sequences "
      "(train.seq_len)."
    )
  for key in ("inputs", "targets"):
    ids = batch.get(key)
    if ids is None or ids.shape != inputs.shape or not ids.size:
      continue  # classification's "label" is not a token
    if ids.min() >= 0 and ids.max() < mc.vocab_size:
      continue
    bad = (ids < 0) | (ids >= mc.vocab_size)
    weights = batch.get("weights")
    if key == "targets" and weights is not None and weights.shape == ids.shape:
      bad &= weights != 0  # ignored positions may hold anything
    if bad.any():
      row, pos = np.argwhere(bad)[0]
      raise ValueError(
        f"{where}: {key}[row {row}, position {pos}] = {ids[row, pos]} is outside the "
        f"model's vocabulary [0, {mc.vocab_size}) ({bad.sum()} such ids in the batch). Check "
        "the data and data.tokenizer, or raise model.vocab_size above the largest id."
      )
