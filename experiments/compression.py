"""Compression from config: the `quant` section -> a policy, the model's quantized
dot_generals, calibration, and the integer export at the end of a run; the `prune`
section -> the pruning transform around the optimizer, and the sparse export.

    --config.quant.method=qat --config.quant.bits=4 --config.quant.tile=32
    --config.quant.method=ptq --config.init_from=/runs/float --config.train.steps=0
    --config.prune.method=gradual --config.prune.sparsity=0.9 --config.prune.end=400
    --config.prune.method=oneshot --config.prune.granularity=2:4
"""

import functools
import json
import os

from absl import logging
import jax
import ml_collections

from compress import prune, quant
from experiments.distillation import model_params


def quant_section() -> ml_collections.ConfigDict:
  """The defaults of `config.quant` (method "none": a float run)."""
  return ml_collections.ConfigDict(
    dict(
      method="none",  # "none" | "qat" (train fake-quantized) | "ptq" (calibrate, no training)
      bits=8,  # weights; 0 keeps them float
      act_bits=8,  # activations; 0: weight-only quantization
      granularity="channel",  # "tensor" | "channel"; tile > 0 overrides: sub-channel tiles
      tile=0,
      act_granularity="tensor",  # "tensor" | "token" (dynamic only)
      symmetric=True,
      act_symmetric=True,
      act_static=False,  # activation ranges calibrated once on calib_batches, then fixed
      calibrator="absmax",  # weights: "absmax" | "percentile" | "mse"
      act_calibrator="absmax",
      lsq=False,  # learned step sizes (LSQ), no weight decay, lr x step_lr_scale
      step_lr_scale=1.0,
      float_layers=r"lm_head|mlm_head/decoder|classifier",  # regex of layers kept float
      attention=False,  # also quantize the two attention einsums (q.k and p.v)
      calib_batches=8,
      export=True,  # write <workdir>/export (integer weights) and evaluate it
      storage_bits=8,  # export: other float matrices (embeddings) stored at this width; 0: f32
    )
  )


def quant_policy(config: ml_collections.ConfigDict) -> quant.Policy | None:
  """The policy `config.quant` describes (None for a float run); bad values raise here."""
  q = config.get("quant")
  if q is None or q.method == "none":
    return None
  if q.method not in ("qat", "ptq"):
    raise ValueError(f"quant.method={q.method!r}: choose 'none', 'qat' or 'ptq'.")
  if q.method == "ptq":
    if config.train.steps != 0:
      raise ValueError(
        "quant.method='ptq' quantizes a trained model without training: set "
        "--config.train.steps=0 (and init_from), or use quant.method='qat'."
      )
    if not (config.get("init_from") or config.get("pretrain")):
      raise ValueError("quant.method='ptq' needs a trained model: set --config.init_from=WORKDIR.")
  if (q.act_static or q.method == "ptq") and q.calib_batches < 1:
    raise ValueError(
      f"quant.calib_batches={q.calib_batches}: calibration needs at least one batch."
    )
  if q.storage_bits:
    quant.check_bits(q.storage_bits, "quant.storage_bits")
  qc = quant.QuantConfig(
    bits=q.bits or None,
    act_bits=q.act_bits or None,
    granularity=q.tile if q.tile else q.granularity,
    act_granularity=q.act_granularity,
    symmetric=q.symmetric,
    act_symmetric=q.act_symmetric,
    act_static=q.act_static,
    calibrator=q.calibrator,
    act_calibrator=q.act_calibrator,
    lsq=q.lsq,
  )
  rules = ([(q.float_layers, None)] if q.float_layers else []) + [(".*", qc)]
  return quant.Policy.of(*rules)


def dot_generals(config, policy: quant.Policy | None, mode: str = "train") -> dict:
  """The model's dot_general factories (kwargs of models.build) for QuantDot `mode`."""
  if policy is None:
    return {}
  out = {"dot_general_cls": functools.partial(quant.QuantDot, policy, mode)}
  if config.quant.attention:
    out["attn_dot_general_cls"] = functools.partial(quant.QuantDot, policy, mode, "act_act")
  return out


def report(policy: quant.Policy, collections: dict):
  """Logs which layers each rule took and warns about rules that matched nothing."""
  matched, unused = quant.report(policy, collections.get("quant", {}))
  for pattern in unused:
    logging.warning("quant rule %r matched no layer: check the regex.", pattern)
  logging.info("quantized layers (layer: rule): %s", dict(matched))
  return matched, unused


def needs_ranges(config) -> bool:
  q = config.quant
  return q.method != "none" and (q.act_static or q.method == "ptq") and q.act_bits > 0


def export(exp, state, workdir: str, evaluate_serving) -> dict:
  """Converts the trained model to integer weights, saves it to <workdir>/export, reloads
  it and evaluates the serving (int8 x int8 -> int32) model. Returns the eval row."""
  q = exp.config.quant
  if jax.process_count() > 1:
    logging.info("quant.export is single-process for now: skipped.")
    return {}
  variables = {"params": model_params(state["params"]), **state.get("collections", {})}
  example = exp.task.batch(0, "eval")
  ids = example["inputs"][:1, :1]
  convert_model = exp.model_in("convert")
  serving = jax.jit(
    lambda v: quant.convert(convert_model.apply, v, ids),
  )(variables)
  directory = os.path.join(workdir, "export")
  # a pruned model's zero codes cost a bit each (Deep Compression's prune + quantize)
  quant.save(directory, serving, storage_bits=q.storage_bits or None, sparse=prunes(exp.config))
  loaded = quant.load(directory)
  row = evaluate_serving(exp.model_in("serve"), loaded)
  return _export_row("serve", row, directory, variables["params"], "export_bytes", quant.disk_bytes)


def _export_row(prefix, evaluated, directory, params, size_key, disk_bytes, **extra) -> dict:
  """The reloaded export's eval row (keys `prefix`_*), its size on disk and the float32
  size of `params`, logged."""
  f32_bytes = 4 * sum(x.size for x in jax.tree.leaves(params))
  row = {f"{prefix}_{k}": v for k, v in evaluated.items()}
  row.update({size_key: disk_bytes(directory), "float32_bytes": f32_bytes}, **extra)
  share = 100 * row[size_key] / f32_bytes
  logging.info("Exported %s (%.1f%% of float32): %s", directory, share, row)
  return row


PRUNE_METHODS = ("none", "gradual", "oneshot", "periodic")


def prune_section() -> ml_collections.ConfigDict:
  """The defaults of `config.prune` (method "none": no pruning)."""
  return ml_collections.ConfigDict(
    dict(
      method="none",  # "none" | "gradual" (Zhu & Gupta cubic) | "oneshot" (at start) | "periodic"
      sparsity=0.9,  # final fraction of the selected weights pruned (N:M: implied, ignored)
      granularity="unstructured",  # "unstructured" | "N:M" (e.g. "2:4") | "RxC" | "heads" | "neurons"
      distribution="uniform",  # "uniform" | "erk" | "global"
      score="magnitude",  # "magnitude" | "random" | "saliency" | "movement"
      select=r"kernel$",  # regex on the parameter path; rank >= 2 only
      exclude="",
      start=0,  # gradual: t0; oneshot: the step; periodic: first update
      end=0,  # gradual: the step the final sparsity is reached (t0 + n * dt)
      every=100,  # gradual / periodic: dt
      export=True,  # write <workdir>/sparse (bitmask + values, N:M values + indices)
    )
  )


def _granularity(p):
  return prune.parse_granularity(p.granularity)


def _sparsity_and_kwargs(config):
  """(sparsity, the other keyword arguments of prune.pruning) from config.prune."""
  p = config.prune
  g = _granularity(p)
  kwargs = dict(
    granularity=g,
    distribution=p.distribution,
    select=p.select,
    exclude=p.exclude or None,
    score=p.score,
    seed=config.seed,
  )
  return (None if isinstance(g, prune.NM) else p.sparsity), kwargs


def prune_tx(config, inner):
  """`inner` (the optimizer) wrapped by the pruning transform `config.prune` describes;
  `inner` itself when it prunes nothing. Bad values raise here, before anything compiles."""
  p = config.get("prune")
  if p is None or p.method == "none":
    return inner
  if p.method not in PRUNE_METHODS:
    raise ValueError(f"prune.method={p.method!r}: choose one of {PRUNE_METHODS}.")
  if p.method == "gradual":
    schedule = prune.cubic(p.start, p.end, p.every)
  elif p.method == "oneshot":
    schedule = prune.one_shot(p.start)
  else:
    schedule = prune.periodic(p.every, p.start, p.end or None)
  if not config.train.steps:
    if p.method != "oneshot":
      raise ValueError(
        f"prune.method={p.method!r} prunes during training but train.steps=0: use "
        "prune.method='oneshot' to prune a trained model (init_from) without training."
      )
    if not (config.get("init_from") or config.get("pretrain")):
      raise ValueError("Pruning without training needs a trained model: set --config.init_from.")
  last = schedule.end if schedule.end is not None else schedule.start
  if config.train.steps and last >= config.train.steps:
    raise ValueError(
      f"prune: the schedule's last mask update (step {last}) is not before train.steps="
      f"{config.train.steps}; end it earlier (prune.end / prune.start) or train longer."
    )
  sparsity, kwargs = _sparsity_and_kwargs(config)
  return prune.pruning(sparsity, schedule, inner, **kwargs)


def prunes(config) -> bool:
  p = config.get("prune")
  return p is not None and p.method != "none"


def prune_now(config, params):
  """`params` pruned at the final sparsity right away: a run with train.steps=0."""
  sparsity, kwargs = _sparsity_and_kwargs(config)
  return prune.one_shot_prune(params, sparsity, **kwargs)


def sparsity_row(state) -> dict:
  """{"sparsity": over the pruned parameters} for the metrics."""
  masks = prune.masks_of(state["opt"])
  rep = prune.report(state["params"], masks[0] if masks else None, select=r"kernel$")
  return {"sparsity": rep["selected"]["sparsity"]}


def export_sparse(exp, state, workdir: str, evaluate_params) -> dict:
  """Saves the pruned params in sparse form to <workdir>/sparse, writes the per-layer
  report to <workdir>/sparsity.json, reloads and evaluates the loaded params."""
  if jax.process_count() > 1:
    logging.info("prune.export is single-process for now: skipped.")
    return {}
  masks = prune.masks_of(state["opt"])
  params = model_params(state["params"])  # the model's own (not a distillation projection)
  rep = prune.report(params, model_params(masks[0]) if masks else None)
  logging.info("Sparsity:\n%s", prune.format_report(rep))
  with open(os.path.join(workdir, "sparsity.json"), "w") as f:
    json.dump(rep, f, indent=1)
  g = _granularity(exp.config.prune)
  directory = os.path.join(workdir, "sparse")
  prune.save(directory, params, nm=g if isinstance(g, prune.NM) else None)
  row = evaluate_params(prune.load(directory))
  sparsity = dict(sparsity=rep["selected"]["sparsity"], sparsity_all=rep["all"]["sparsity"])
  return _export_row("sparse", row, directory, params, "sparse_bytes", prune.disk_bytes, **sparsity)
