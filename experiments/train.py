"""The one train loop: every experiment is a config run through `train_and_evaluate`.

    python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm
    python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm \
        --config.train.steps=1000 --config.model.n_layers=4

Running the same command again with the same workdir resumes from the last complete
checkpoint; batches are a function of (seed, step), so the result equals an
uninterrupted run.
"""

import dataclasses
import json
import os
import time

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import optax
from jax.sharding import PartitionSpec as P

from compress import quant
import models
import parallel
from parallel import launch  # not re-exported: `python -m parallel.launch` runs it
from experiments import compression, distillation, optim, tasks, throughput
from experiments.metrics import MetricWriter
from experiments.tokenizer import ByteTokenizer


def model_config(config: ml_collections.ConfigDict, tokenizer) -> models.ModelConfig:
  """The ModelConfig the config describes, checked against the tokenizer and data."""
  fields = dict(config.model)
  preset = fields.pop("preset")
  mc = models.get_preset(preset, **fields, dtype=config.dtype)
  if mc.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({tokenizer.vocab_size} ids): set --config.model.vocab_size to at least "
      f"{tokenizer.vocab_size}."
    )
  if mc.positions == "learned" and config.train.seq_len > mc.max_len:
    raise ValueError(
      f"train.seq_len={config.train.seq_len} exceeds the model's learned positions "
      f"(model.max_len={mc.max_len}): shorten the sequences or raise max_len."
    )
  return mc


def check_workdir(workdir: str, config: ml_collections.ConfigDict):
  """Refuses a workdir that holds a run of a different model (its checkpoints would not fit)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  old_model, new_model = old.get("model", {}), config.model.to_dict()
  diff = {
    k: (old_model.get(k), new_model.get(k))
    for k in set(old_model) | set(new_model)
    if old_model.get(k) != new_model.get(k)
  }
  if old.get("task") != config.task:
    diff["task"] = (old.get("task"), config.task)
  for section in ("quant", "prune", "distill"):
    if section in config and old.get(section, {}) != config[section].to_dict():
      diff[section] = (old.get(section), config[section].to_dict())
  if diff:
    changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
    raise ValueError(
      f"--workdir {workdir} holds a run with a different model config ({changes}). "
      "Use a new --workdir, or the same model config to resume that run."
    )


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
  if t.batch_size % (t.microbatches * batch_shards):
    raise ValueError(
      f"train.batch_size={t.batch_size} does not split into train.microbatches="
      f"{t.microbatches} microbatches of a multiple of {batch_shards} rows."
    )


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config describes, built and checked before anything compiles."""

  config: ml_collections.ConfigDict
  model_config: models.ModelConfig
  model: nn.Module
  task: tasks.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  policy: object = None  # compress.quant.Policy when the run quantizes
  teacher: distillation.Teacher | None = None  # when the run distills

  def inputs(self, batch: dict) -> dict:
    """The model's keyword inputs in a batch (beyond the token ids)."""
    return {k: batch[k] for k in self.task.input_keys}

  def model_in(self, quant_mode: str) -> nn.Module:
    """The same model with its QuantDots in another mode ("calibrate", "convert", "serve")."""
    dgs = compression.dot_generals(self.config, self.policy, quant_mode)
    return models.build(self.model_config, **dgs)

  @property
  def batch_sharding(self):
    return parallel.batch_sharding(self.mesh, self.rules)

  def batch(self, step: int, split: str = "train") -> dict:
    """The global batch at `step`: this process's NumPy slice -> one jax.Array per key."""
    local = self.task.batch(step, split)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local
    )

  def init(self, rng: jax.Array) -> dict:
    """The train state {"step", "params", "opt", "rng"} (+ "collections": the model's other
    variables, e.g. quantization ranges), with logically partitioned leaves."""
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.task.batch(0, "train"))
    init_rng, train_rng = jax.random.split(rng)
    variables = dict(
      self.model.init({"params": init_rng}, example["inputs"], **self.inputs(example))
    )
    params = variables.pop("params")
    shape = distillation.projection_shape(self.model_config, self.teacher)
    if shape:  # hidden states matched across widths: a learned projection, trained with the rest
      params = {**params, **distillation.init_projection(shape, jax.random.fold_in(init_rng, 1))}
    opt = self.tx.init(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt, "rng": train_rng}
    return {**state, "collections": variables} if variables else state

  def shard_shapes(self):
    """(abstract state with shardings, shardings): the restore target, no allocation."""
    return parallel.shard_shapes(self.init, self.mesh, self.rules, self.rng)

  def init_state(self):
    return parallel.init_sharded(self.init, self.mesh, self.rules, self.rng)

  @property
  def rng(self):
    return jax.random.PRNGKey(self.config.seed)

  def jit_steps(self, shardings, teacher_shardings=None):
    """The jitted train step (donating its state) and eval step, with explicit shardings.

    When the run distills from a live teacher, the train step is
    `(state, batch, teacher_variables)`, the teacher's shardings given here.
    """
    model, task = self.model, self.task
    if self.teacher is not None:
      loss = distillation.make_loss(task, model, self.model_config, self.teacher)
    else:
      loss = lambda p, b, r, c: task.loss(model, {"params": p, **c}, b, r, True)  # noqa: E731
    step = parallel.make_train_step(loss, self.tx, self.config.train.microbatches)
    frozen = (teacher_shardings,) if self.teacher is not None and self.teacher.live else ()
    train_step = parallel.jit_with_mesh(
      step,
      self.mesh,
      self.rules,
      in_shardings=(shardings, self.batch_sharding, *frozen),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    eval_step = parallel.jit_with_mesh(
      lambda p, c, b: task.loss(model, {"params": p, **c}, b, None, False)[1],
      self.mesh,
      self.rules,
      in_shardings=(
        distillation.model_params(shardings["params"]),  # the model's own: no projection
        shardings.get("collections", {}),
        self.batch_sharding,
      ),
      out_shardings=None,
    )
    return train_step, eval_step

  def reinit_steps(self, state: dict, shardings: dict) -> dict:
    """LSQ step sizes re-initialized from the current weights (after init_from) and a batch."""
    model = self.model

    def fn(p, c, b, rng):
      kwargs = self.inputs(b)
      kept = quant.without_steps(p)
      _, new = model.apply(
        {"params": kept, **c}, b["inputs"], mutable=["params"], rngs={"params": rng}, **kwargs
      )
      return new["params"]

    jitted = parallel.jit_with_mesh(
      fn,
      self.mesh,
      self.rules,
      in_shardings=(
        shardings["params"],
        shardings.get("collections", {}),
        self.batch_sharding,
        None,
      ),
      out_shardings=shardings["params"],
    )
    return jitted(state["params"], state.get("collections", {}), self.batch(0), self.rng)

  def load_teacher(self):
    """(the teacher's variables, their shardings), from its run's checkpoint onto this mesh."""
    example = self.task.batch(0, "train")
    args = (self.teacher, example, self.task.input_keys, self.mesh, self.rules)
    _, shardings = distillation.teacher_shapes(*args)
    variables = distillation.load_teacher(*args)
    return variables, {"params": shardings["params"], **shardings["collections"]}

  def init_from_teacher(self, state: dict, shardings: dict, teacher_vars: dict) -> dict:
    """The student's params with the layers `distill.init` maps copied from the teacher."""
    jitted = parallel.jit_with_mesh(
      lambda p, t: distillation.init_student(p, t, self.teacher),
      self.mesh,
      self.rules,
      in_shardings=(shardings["params"], None),
      out_shardings=shardings["params"],
    )
    return jitted(state["params"], teacher_vars["params"])

  def calibrate(self, state: dict, shardings: dict) -> dict:
    """Static activation ranges from `quant.calib_batches` train batches (QuantDot's
    "calibrate" mode: a float forward recording each quantized input's range)."""
    model = self.model_in("calibrate")

    def step(p, c, b):
      variables = {"params": p, **c}
      kwargs = self.inputs(b)
      _, updated = model.apply(variables, b["inputs"], mutable=["quant"], **kwargs)
      return {**c, **updated}

    c_shardings = shardings["collections"]
    jitted = parallel.jit_with_mesh(
      step,
      self.mesh,
      self.rules,
      in_shardings=(shardings["params"], c_shardings, self.batch_sharding),
      out_shardings=c_shardings,
    )
    batches = (self.batch(i) for i in range(self.config.quant.calib_batches))
    calib = lambda st, b: {**st, "collections": jitted(st["params"], st["collections"], b)}  # noqa: E731
    return quant.calibrate_model(calib, state, batches)


def build(
  config: ml_collections.ConfigDict, workdir: str | None = None, devices=None
) -> Experiment:
  """Checks the config (and the workdir it would use) and builds the experiment; no compiling.

  `devices` (default: all) is what the mesh spans, e.g. `jax.devices()[:1]` for a reference.
  """
  tokenizer = ByteTokenizer()
  mc = model_config(config, tokenizer)
  if workdir:
    check_workdir(workdir, config)

  def build_model(run_config, record_attention=False):
    run_mc = model_config(run_config, tokenizer)
    if record_attention:  # attention transfer reads the probabilities the model sows
      run_mc = dataclasses.replace(run_mc, record_attention=True)
    dgs = compression.dot_generals(run_config, compression.quant_policy(run_config))
    return run_mc, models.build(run_mc, **dgs)

  teacher = distillation.make_teacher(config, mc, workdir, build_model)
  if teacher is not None and config.distill.attention_weight > 0:
    mc = dataclasses.replace(mc, record_attention=True)
  mesh = parallel.make_mesh(**config.mesh, devices=devices)
  rules = parallel.get_rules(config.sharding.rules)
  # Each process feeds the batch rows its devices hold (not always block process_index).
  feed = parallel.sharding.process_batch_slice(parallel.batch_sharding(mesh, rules))
  check_batch(config, mesh, feed[1])
  task = tasks.make_task(config, tokenizer, *feed)
  policy = compression.quant_policy(config)
  tx, schedule = optim.make_optimizer(config, config.train.steps)
  model = models.build(mc, **compression.dot_generals(config, policy))
  return Experiment(config, mc, model, task, mesh, rules, tx, schedule, policy, teacher)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains and evaluates the model `config` describes; returns the last eval row.

  `devices` (default: all) are the devices the mesh spans.
  """
  exp = build(config, workdir, devices)  # everything wrong with the input is caught here
  init_from = config.get("init_from") or ""
  if config.get("pretrain"):  # e.g. MLM pretraining before classification: same loop, own workdir
    init_from = os.path.join(workdir, "pretrain")
    train_and_evaluate(config.pretrain, init_from, devices)
  if exp.teacher is not None:
    train_teacher(exp.teacher, devices)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:  # atomic: other processes may be reading it
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)

  ckpt = parallel.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.train.keep_checkpoints,
    async_save=config.train.async_checkpoint,
  )
  teacher_vars = teacher_shardings = None
  if exp.teacher is not None:
    teacher_vars, teacher_shardings = exp.load_teacher()
  if ckpt.latest_step() is not None:
    abstract, shardings = exp.shard_shapes()
    state = ckpt.restore(abstract)
  else:
    state, shardings = exp.init_state()
    if init_from:
      state["params"] = parallel.load_params(
        os.path.join(init_from, "checkpoints"), state["params"]
      )
    if exp.teacher is not None and exp.teacher.init_map:  # DistilBERT: every other layer
      state["params"] = exp.init_from_teacher(state, shardings, teacher_vars)
    loaded = init_from or (exp.teacher is not None and exp.teacher.init_map)
    if loaded and exp.policy is not None and config.quant.lsq:  # steps fit the loaded weights
      state["params"] = exp.reinit_steps(state, shardings)
    if compression.prunes(config) and not config.train.steps:  # one-shot, no training
      state["params"] = parallel.jit_with_mesh(
        lambda p: compression.prune_now(config, p),
        exp.mesh,
        exp.rules,
        in_shardings=(shardings["params"],),
        out_shardings=shardings["params"],
      )(state["params"])
    if compression.needs_ranges(config):
      state = exp.calibrate(state, shardings)
  if exp.teacher is not None and not exp.teacher.live:  # the step reads cached top-k logits
    part = distillation.cache_top_k(exp, teacher_vars, os.path.join(workdir, "teacher_top_k"))
    exp = dataclasses.replace(exp, task=distillation.with_cache(exp.task, part))
    teacher_vars = None  # the teacher leaves device memory
  frozen = () if teacher_vars is None else (teacher_vars,)
  if exp.policy is not None:
    compression.report(exp.policy, state.get("collections", {}))
  start = int(state["step"])
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info(
    "Model %s: %s parameters; mesh %s; starting at step %d",
    exp.model_config.kind,
    f"{n_params:,}",
    dict(exp.mesh.shape),
    start,
  )
  train_step, eval_step = exp.jit_steps(shardings, teacher_shardings)
  task, schedule = exp.task, exp.schedule
  eval_batches = [exp.batch(i, "eval") for i in range(config.eval.steps)]
  writer = MetricWriter(workdir, start, config.train.steps, enabled=is_main)

  def evaluate_params(params):
    c = state.get("collections", {})
    params = distillation.model_params(params)
    return task.summarize(tasks.sum_eval([eval_step(params, c, b) for b in eval_batches]))

  def evaluate(step, write=True):
    row = evaluate_params(state["params"])
    if compression.prunes(config):
      row.update(compression.sparsity_row(state))
    if write:
      writer.write(step, row)
    return row

  # Metrics are fetched one log step late, so the host never stalls the device; tokens/s
  # is measured between those fetches, i.e. between completed steps, not dispatches.
  pending, clock = None, [time.perf_counter(), start]
  flops_per_step = throughput.step_flops(exp, config.train.batch_size, config.train.seq_len)
  peak = parallel.flops.peak_flops_per_device()

  def flush():
    nonlocal pending
    if pending is not None:
      step, metrics, lr = pending
      metrics, now = jax.device_get(metrics), time.perf_counter()
      speed = {}  # none for a log step that is the first step (its time is compilation)
      if step > clock[1]:
        step_time = (now - clock[0]) / (step - clock[1])
        speed = throughput.throughput_metrics(
          flops_per_step, task.tokens_per_step, step_time, exp.mesh.size, peak
        )
      writer.write(
        step, {**{k: float(v) for k, v in metrics.items()}, "learning_rate": lr, **speed}
      )
      pending, clock[:] = None, [now, step]

  t, last_eval = config.train, {}
  for step in range(start, t.steps):
    state, metrics = train_step(state, exp.batch(step), *frozen)
    done = step + 1
    if step == start:  # compilation is not throughput
      jax.block_until_ready(metrics)
      logging.info("First step (compilation included) took %.1fs", time.perf_counter() - clock[0])
      clock[:] = [time.perf_counter(), done]
    flush()
    if done % t.log_every == 0 or done == t.steps:
      pending = (done, metrics, float(schedule(step)))
    if done % config.eval.every == 0 or done == t.steps:
      flush()
      last_eval = evaluate(done)
      clock[:] = [time.perf_counter(), done]  # eval time does not count against throughput
    stop = t.stop_after_steps and done - start >= t.stop_after_steps
    if done % t.checkpoint_every == 0 or done == t.steps or stop:
      ckpt.save(done, state)
    writer.advance()
    if stop:
      logging.info(
        "Stopping after %d steps as train.stop_after_steps asks; rerun to resume.", done - start
      )
      break
  flush()
  if not last_eval:  # no training (PTQ), or resumed after the final step (row written)
    last_eval = evaluate(start, write=t.steps == 0)
  finished = int(state["step"]) >= t.steps  # not when stopped early (stop_after_steps)
  if exp.policy is not None and config.quant.export and finished:

    def evaluate_serving(model, variables):
      variables = jax.device_put(variables, jax.sharding.NamedSharding(exp.mesh, P()))
      step = jax.jit(lambda v, b: task.loss(model, v, b, None, False)[1])
      with jax.set_mesh(exp.mesh):
        return task.summarize(tasks.sum_eval([step(variables, b) for b in eval_batches]))

    served = compression.export(exp, state, workdir, evaluate_serving)
    writer.write(max(start, t.steps), served)
    last_eval = {**last_eval, **served}
  if compression.prunes(config) and config.prune.export and finished:
    model_shardings = distillation.model_params(shardings["params"])
    reload = lambda p: evaluate_params(jax.device_put(p, model_shardings))  # noqa: E731
    sparse = compression.export_sparse(exp, state, workdir, reload)
    writer.write(max(start, t.steps), sparse)
    last_eval = {**last_eval, **sparse}
  ckpt.close()
  writer.close()
  return last_eval


def train_teacher(teacher: distillation.Teacher, devices=None):
  """Runs the teacher's experiment in its workdir first, unless it already finished there."""
  latest = parallel.checkpoint.latest_step(os.path.join(teacher.workdir, "checkpoints"))
  if latest is not None and latest >= teacher.config.train.steps:
    return
  logging.info("Training the teacher in %s first", teacher.workdir)
  train_and_evaluate(teacher.config, teacher.workdir, devices)


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. experiments/configs/lm.py:tiny", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")


def main(argv):
  del argv
  launch.initialize_from_env()  # multi-process runs join before anything touches devices
  logging.set_verbosity(logging.INFO)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
