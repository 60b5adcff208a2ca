"""Quantization from config (`config.quant`): a policy, the model's quantized dot_generals,
LSQ's step sizes in the optimizer, calibration, and the integer export at the end of a run.

    --config.quant.method=qat --config.quant.bits=4 --config.quant.tile=32
    --config.quant.method=ptq --config.init_from=/runs/float --config.train.steps=0
    --config.quant.method=qat --config.quant.format=fp8
"""

import functools
import os

from absl import logging
import jax
import ml_collections
import optax

from compress import quant
import models
import parallel
from experiments.methods import Method, register, export_row, greedy_agreement


def policy_of(config: ml_collections.ConfigDict) -> quant.Policy | None:
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
  fmt = q.get("format", "int")
  qc = quant.QuantConfig(
    format=fmt,
    bits=q.bits or None,
    act_bits=q.act_bits or None,
    granularity=q.tile if q.tile else (q.granularity if fmt == "int" else "tensor"),
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


@register
class Quant(Method):
  name = "quant"
  order = 30

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.quant` (method "none": a float run)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "qat" (train fake-quantized) | "ptq" (calibrate, no training)
        format="int",  # "int" | "fp8": e4m3 weights and activations, e5m2 gradients, per tensor
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

  def __init__(self, config):
    super().__init__(config)
    self.policy = policy_of(config)

  def model_hooks(self, mode="train"):
    out = {"dot_general_cls": functools.partial(quant.QuantDot, self.policy, mode)}
    if self.c.attention:
      out["attn_dot_general_cls"] = functools.partial(quant.QuantDot, self.policy, mode, "act_act")
    return out

  def update_rule(self, rule, schedule):
    """LSQ: the step sizes get their own Adam (no weight decay, lr x quant.step_lr_scale)."""
    if not self.c.lsq:
      return rule
    o = self.config.optim
    step_lr = lambda count: schedule(count) * self.c.step_lr_scale  # noqa: E731
    return quant.split_optimizer(rule, optax.adam(step_lr, b1=o.b1, b2=o.b2, eps=o.eps))

  def prepare(self, run, state, fresh):
    if fresh and run.loaded and self.c.lsq:  # step sizes that fit the loaded weights
      state["params"] = reinit_steps(run, state)
    if fresh and needs_ranges(self.config):
      state = calibrate(run, state)
    matched, unused = quant.report(self.policy, state.get("collections", {}).get("quant", {}))
    for pattern in unused:
      logging.warning("quant rule %r matched no layer: check the regex.", pattern)
    logging.info("quantized layers (layer: rule): %s", dict(matched))
    return state

  def export(self, run, state):
    """Converts to integer weights, saves them to <workdir>/export, reloads them and
    evaluates the serving (int8 x int8 -> int32) model."""
    if not self.c.export:
      return {}
    if self.c.get("format", "int") == "fp8":
      logging.info("quant.export writes integer weights: an fp8 run has none to write.")
      return {}
    if jax.process_count() > 1:
      logging.info("quant.export is single-process for now: skipped.")
      return {}
    exp = run.exp
    variables = {"params": state["params"], **state.get("collections", {})}
    ids = exp.task.batch(0, "eval")["inputs"][:1, :1]
    convert_model = exp.model_in("convert")
    serving = jax.jit(lambda v: quant.convert(convert_model.apply, v, ids))(variables)
    directory = os.path.join(run.workdir, "export")
    # a pruned model's zero codes cost a bit each (Deep Compression's prune + quantize)
    sparse = self.config.get("prune", {}).get("method", "none") != "none"
    s = models.structure()
    bits, matrices = self.c.storage_bits or None, f"{s.weights}|{s.embeddings}"
    quant.save(directory, serving, storage_bits=bits, sparse=sparse, matrices=matrices)
    serve_model, served = exp.model_in("serve"), quant.load(directory)
    row = run.evaluate_model(serve_model, served)
    row.update(greedy_agreement(run, serve_model, served, state["params"], own=True))
    return export_row("serve", row, directory, state["params"], "export_bytes", quant.disk_bytes)


def needs_ranges(config) -> bool:
  q = config.quant
  return q.method != "none" and (q.act_static or q.method == "ptq") and q.act_bits > 0


def reinit_steps(run, state: dict) -> dict:
  """LSQ step sizes re-initialized from the current weights (after a load) and a batch."""
  exp, shardings = run.exp, run.shardings

  def fn(p, c, b, rng):
    _, new = exp.model.apply(
      {"params": quant.without_steps(p), **c},
      b["inputs"],
      mutable=["params"],
      rngs={"params": rng},
      **exp.inputs(b),
    )
    return new["params"]

  jitted = parallel.jit_with_mesh(
    fn,
    exp.mesh,
    exp.rules,
    in_shardings=(shardings["params"], shardings.get("collections", {}), exp.batch_sharding, None),
    out_shardings=shardings["params"],
  )
  return jitted(state["params"], state.get("collections", {}), exp.batch(0), exp.rng)


def calibrate(run, state: dict) -> dict:
  """Static activation ranges from `quant.calib_batches` train batches (QuantDot's
  "calibrate" mode: a float forward recording each quantized input's range)."""
  exp, shardings = run.exp, run.shardings
  model = exp.model_in("calibrate")

  def step(p, c, b):
    _, updated = model.apply({"params": p, **c}, b["inputs"], mutable=["quant"], **exp.inputs(b))
    return {**c, **updated}

  c_shardings = shardings["collections"]
  jitted = parallel.jit_with_mesh(
    step,
    exp.mesh,
    exp.rules,
    in_shardings=(shardings["params"], c_shardings, exp.batch_sharding),
    out_shardings=c_shardings,
  )
  batches = (exp.batch(i) for i in range(exp.config.quant.calib_batches))
  calib = lambda st, b: {**st, "collections": jitted(st["params"], st["collections"], b)}  # noqa: E731
  return quant.calibrate_model(calib, state, batches)
