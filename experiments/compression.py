"""Compression from config: the `quant` section -> a policy, the model's quantized
dot_generals, calibration, and the integer export at the end of a run.

    --config.quant.method=qat --config.quant.bits=4 --config.quant.tile=32
    --config.quant.method=ptq --config.init_from=/runs/float --config.train.steps=0
"""

import functools
import os

from absl import logging
import jax
import ml_collections

from compress import quant


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
  variables = {"params": state["params"], **state.get("collections", {})}
  example = exp.task.batch(0, "eval")
  ids = example["inputs"][:1, :1]
  convert_model = exp.model_in("convert")
  serving = jax.jit(
    lambda v: quant.convert(convert_model.apply, v, ids),
  )(variables)
  directory = os.path.join(workdir, "export")
  quant.save(directory, serving, storage_bits=q.storage_bits or None)
  loaded = quant.load(directory)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  row = evaluate_serving(exp.model_in("serve"), loaded)
  row = {f"serve_{k}": v for k, v in row.items()}
  row.update(export_bytes=quant.disk_bytes(directory), float32_bytes=4 * n_params)
  logging.info(
    "Exported %s (%.1f%% of float32): %s",
    directory,
    100 * row["export_bytes"] / (4 * n_params),
    row,
  )
  return row
