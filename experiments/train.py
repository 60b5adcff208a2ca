"""The one train loop: every experiment is a config run through `train_and_evaluate`.

    python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm
    python -m experiments.train --config experiments/configs/lm.py:tiny --workdir /tmp/lm \
        --config.train.steps=1000 --config.model.n_layers=4

Running the same command again with the same workdir resumes from the newest checkpoint
that reads back; batches are a function of (seed, step), so the result equals an
uninterrupted run, bit for bit on CPU, after a `kill -9` at any moment. On SIGTERM the loop
saves after the current step and the command exits with 143. A step whose loss or gradients
are not finite is not applied, and is counted against `train.nonfinite` (skip | stop).
"""

import dataclasses
import os
import sys
import time

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags
from jax.sharding import PartitionSpec as P

import parallel
from parallel import launch  # not re-exported: `python -m parallel.launch` runs it
from experiments import compression, configs, distillation, tasks, teacher_cache, throughput
from experiments.experiment import build
from experiments.metrics import MetricWriter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains and evaluates the model `config` describes; returns the last eval row.

  `devices` (default: all) are the devices the mesh spans.
  """
  exp = build(config, workdir, devices)  # everything wrong with the input is caught here
  # ... and every sharded dimension its mesh axes must divide, before a teacher or pretraining
  # stage runs for minutes first (a trace of the init: nothing compiles or allocates).
  abstract, shardings = exp.shard_shapes()
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
  if ckpt.latest_step() is not None:  # the newest complete one that reads back, or an error
    state, _ = ckpt.restore_latest(abstract)
  else:
    state, shardings = exp.init_state()
    if init_from.startswith("hf:"):  # a Hugging Face checkpoint: a directory or a Hub name
      state["params"] = exp.load_hf(init_from[len("hf:") :], state["params"], shardings["params"])
    elif init_from:
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
    part = teacher_cache.cache_top_k(exp, teacher_vars, os.path.join(workdir, "teacher_top_k"))
    exp = dataclasses.replace(exp, task=teacher_cache.with_cache(exp.task, part))
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
  eval_batches = [exp.batch(i, "eval") for i in range(tasks.eval_steps(config, task))]
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
        step, {**{k: v.item() for k, v in metrics.items()}, "learning_rate": lr, **speed}
      )
      pending, clock[:] = None, [now, step]
      check_nonfinite(config.train, int(metrics.get("nonfinite_steps", 0)), state, ckpt)

  t, last_eval = config.train, {}
  preemption = parallel.Preemption()  # SIGTERM: save after the current step, then stop
  try:
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
      preempted = preemption.reached(done)
      if done % t.checkpoint_every == 0 or done == t.steps or stop or preempted:
        ckpt.save(done, state)
      writer.advance()
      if preempted:
        flush()
        ckpt.close()
        writer.close()
        logging.warning("Preempted: saved the checkpoint at step %d; rerun to resume.", done)
        raise parallel.Preempted(done)
      if stop:
        logging.info(
          "Stopping after %d steps as train.stop_after_steps asks; rerun to resume.", done - start
        )
        break
    flush()
  finally:
    preemption.close()
  if not last_eval:  # no training (PTQ), or resumed after the final step (row written)
    last_eval = evaluate(start, write=t.steps == 0)
  if t.steps == 0 and ckpt.latest_step() is None:  # e.g. an HF teacher used as it is
    ckpt.save(0, state)
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


def check_nonfinite(t: ml_collections.ConfigDict, count: int, state: dict, ckpt):
  """Applies `train.nonfinite` to the count of steps skipped for a non-finite loss or
  gradient: "stop" stops at the first, "skip" after more than `train.max_nonfinite`."""
  policy = t.get("nonfinite", "skip")
  limit = 0 if policy == "stop" else t.get("max_nonfinite", 10)
  if count <= limit:
    return
  first, last = (int(jax.device_get(state["nonfinite"][k])) for k in ("first", "last"))
  ckpt.wait()
  where = (
    f"at step {first}" if count == 1 else f"at {count} steps, the first {first}, the last {last}"
  )
  fix = (
    "set train.nonfinite='skip' to skip such steps"
    if policy == "stop"
    else f"raise train.max_nonfinite (now {limit}) to skip more"
  )
  raise FloatingPointError(
    f"Non-finite loss or gradients {where} (train.nonfinite={policy!r}); those updates "
    f"were not applied. The latest checkpoint is step {ckpt.latest_step()}. Lower optim.lr, "
    f"check the data, or {fix}."
  )


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
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except parallel.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM: a terminated job (to be rerun), not a finished one


if __name__ == "__main__":
  try:  # a mistyped --config.x.y: one line naming the closest key, not a traceback
    configs.check_overrides(sys.argv)
  except ValueError as e:
    sys.exit(f"FATAL: {e}")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
