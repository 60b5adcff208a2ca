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

import json
import os
import sys

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

import parallel
from parallel import launch  # not re-exported: `python -m parallel.launch` runs it
from experiments import checks, configs, lock, metrics, progress, throughput
from experiments.configs import describe
from experiments.experiment import Run, build
from experiments.metrics import MetricWriter


class ConfigError(ValueError):
  """Bad input found before anything compiled: `experiments.train` prints it as one line."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """Trains and evaluates the model `config` describes; returns the last eval row.

  `devices` (default: all) are the devices the mesh spans. The run holds the workdir
  (experiments/lock.py): a second run on it stops at once. The active compression methods
  (experiments/methods) are asked at each stage, in their fixed order.
  """
  exp, abstract, shardings = _checked_build(config, workdir, devices)
  with lock.hold(workdir):
    return _train(exp, abstract, shardings, workdir, devices)


def _train(exp, abstract, shardings, workdir: str, devices) -> dict:
  """The run itself, in the workdir it holds."""
  config = exp.config
  init_from = config.get("init_from") or ""
  if config.get("pretrain"):  # e.g. MLM pretraining before classification: same loop, own workdir
    init_from = os.path.join(workdir, "pretrain")
    train_and_evaluate(config.pretrain, init_from, devices)
  run = Run(exp, workdir, shardings, devices)
  with parallel.preemption.stop_at_once("the methods' setup", None):
    for m in exp.methods:  # a method's own sub-run saves and stops as any run does
      m.setup(run)
  write_config(config, workdir)
  t = config.train
  ckpt = parallel.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=t.keep_checkpoints,
    async_save=t.async_checkpoint,
    digest=t.checkpoint_digest,
  )
  with ckpt:  # closed, waiting for a save in flight, also when the run fails
    fresh = ckpt.latest_step() is None  # else the newest complete one that reads back, or an error
    state = run.init(init_from) if fresh else ckpt.restore_latest(abstract)[0]
    with parallel.preemption.stop_at_once("the methods' preparation", ckpt.latest_step()):
      for m in exp.methods:  # e.g. a cache a method writes to a temporary directory
        state = m.prepare(run, state, fresh)
    start = int(state["step"])
    _log_start(exp, state, start)
    train_step, _ = run.jit_steps()
    writer = MetricWriter(workdir, start, t.steps, enabled=jax.process_index() == 0)
    nonfinite = NonfinitePolicy(t, lambda: state, ckpt)
    log = throughput.TrainLog(run, writer, start, nonfinite)

    def evaluate(step, write=True):
      row = run.evaluate(state["params"], state.get("collections", {}))
      for m in run.exp.methods:
        row.update(m.eval_fields(run, state))
      if write:
        writer.write(step, row)
      return row

    last_eval, preemption = {}, parallel.Preemption()  # SIGTERM: save after this step, stop
    try:
      for step in range(start, t.steps):
        state, metrics = train_step(state, run.exp.batch(step), run.frozen)
        done = step + 1
        log.step(done, metrics)
        if done % config.eval.every == 0 or done == t.steps:
          log.flush()
          nonfinite.check()  # a frozen state is neither evaluated nor saved
          last_eval = evaluate(done)
          log.restart(done)  # eval time does not count against throughput
        stop = t.stop_after_steps and done - start >= t.stop_after_steps
        preempted = preemption.reached(done)
        if done % t.checkpoint_every == 0 or done == t.steps or stop or preempted:
          log.flush()  # a checkpoint's rows are written before it exists (a crash loses none)
          nonfinite.check()
          ckpt.save(done, state)
        writer.advance()
        if preempted:
          log.flush()
          writer.close()
          logging.warning("Preempted: saved the checkpoint at step %d; rerun to resume.", done)
          raise parallel.Preempted(done)
        if stop:
          logging.info(
            "Stopping after %d steps (train.stop_after_steps); rerun to resume.", done - start
          )
          break
      log.flush()
    finally:
      preemption.close()
    if not last_eval:  # no training (PTQ), or resumed after the final step (row written)
      last_eval = evaluate(start, write=t.steps == 0)
    if t.steps == 0 and ckpt.latest_step() is None:  # e.g. an HF model used as it is
      ckpt.save(0, state)
    if int(state["step"]) >= t.steps:  # finished (not stopped early): the exports
      ckpt.wait()  # the final checkpoint is complete before any export starts
      with parallel.preemption.stop_at_once("the exports", ckpt.latest_step()):
        for m in run.exp.methods:
          row = m.export(run, state)
          if row:
            writer.write(max(start, t.steps), row)
            last_eval = {**last_eval, **row}
    writer.close()
    return last_eval


def _checked_build(config, workdir, devices):
  """`build` and the sharded shapes; the input's faults raised as one-line `ConfigError`s."""
  try:
    exp = build(config, workdir, devices)  # everything wrong with the input is caught here
    # ... and every sharded dimension its mesh axes must divide, before a pretraining stage or
    # a method's setup runs for minutes first (a trace of the init: nothing compiles).
    abstract, shardings = exp.shard_shapes()
  except ConfigError:
    raise
  except (ValueError, KeyError, FileNotFoundError) as e:  # the input's fault, said in one line
    raise ConfigError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
  return exp, abstract, shardings


def _log_start(exp, state, start):
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  logging.info(
    "Model %s: %s parameters; mesh %s; starting at step %d",
    exp.model_config.kind,
    f"{n_params:,}",
    dict(exp.mesh.shape),
    start,
  )


def write_config(config: ml_collections.ConfigDict, workdir: str):
  """<workdir>/config.json, with the library versions, written atomically (other processes
  may be reading it). A resumed run whose config changed (the learning rate, more steps)
  appends {"step", "changes": {key: [before, after]}} to its "history": the values at the top
  are the ones training goes on with, and the history says what trained before."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  written = {**json.loads(config.to_json_best_effort()), "versions": metrics.versions()}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    written["history"] = old.get("history", [])
    changes = checks.config_changes(old, config)
    step = parallel.checkpoint.latest_step(os.path.join(workdir, "checkpoints"))
    if changes and step is not None:
      written["history"].append({"step": step, "changes": changes})
      logging.warning(
        "Resuming at step %d with a changed config (recorded in config.json's history): %s",
        step,
        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
      )
  with open(path + ".tmp", "w") as f:
    json.dump(written, f, indent=2)
  os.replace(path + ".tmp", path)


class NonfinitePolicy:
  """`train.nonfinite` on the count of steps skipped for a non-finite loss or gradient:
  "stop" stops at the first, "skip" after more than `train.max_nonfinite`. The step freezes
  the state once the count is over that limit (parallel.make_train_step), so whenever the
  loop looks (a log row, an eval, a save) the state is the one right after the step that
  crossed it, and rows of the frozen steps after it are not written."""

  def __init__(self, t: ml_collections.ConfigDict, get_state, ckpt):
    self.policy = t.get("nonfinite", "skip")
    self.limit = 0 if self.policy == "stop" else t.get("max_nonfinite", 10)
    self.get_state, self.ckpt = get_state, ckpt

  def _fetch(self, key: str) -> int:
    return int(jax.device_get(self.get_state()["nonfinite"][key]))

  def keeps_row(self, step: int, count: int) -> bool:
    """Whether the train row of `step` (with that count) is of a step that ran."""
    return count <= self.limit or step <= self._fetch("last")

  def check(self, count: int | None = None):
    """Raises when over the limit (`count` None: the current state's own count)."""
    if count is None:
      if "nonfinite" not in self.get_state():
        return
      count = self._fetch("count")
    if count <= self.limit:
      return
    first, last = self._fetch("first"), self._fetch("last")
    self.ckpt.wait()
    where = (
      f"at step {first}" if count == 1 else f"at {count} steps, the first {first}, the last {last}"
    )
    fix = (
      "set train.nonfinite='skip' to skip such steps"
      if self.policy == "stop"
      else f"raise train.max_nonfinite (now {self.limit}) to skip more"
    )
    latest = self.ckpt.latest_step()
    saved = (
      "No checkpoint was saved" if latest is None else f"The latest checkpoint is step {latest}"
    )
    raise FloatingPointError(
      f"Non-finite loss or gradients {where} (train.nonfinite={self.policy!r}); those updates "
      f"were not applied. {saved}. Lower optim.lr, check the data, or {fix}."
    )


_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. experiments/configs/lm.py:tiny; --config.<key>=<value> sets a key, "
  "--config_help lists them all.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_CONFIG_HELP = flags.DEFINE_bool(
  "config_help", False, "List every key of --config with its value and meaning, then exit."
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Also show the libraries' INFO logs (orbax, jax); off: trimformer's own."
)


def main(argv):
  del argv
  if _CONFIG_HELP.value:  # nothing runs: no --workdir needed
    print(describe.describe(_CONFIG.value, flags.FLAGS["config"].serialize().split("=", 1)[1]))
    return
  if not _WORKDIR.value:
    sys.exit("FATAL: --workdir is required: the directory for the run's checkpoints and metrics.")
  launch.initialize_from_env()  # multi-process runs join before anything touches devices
  logging.set_verbosity(logging.INFO)
  progress.quiet_libraries(_VERBOSE.value)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except parallel.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)  # 128 + SIGTERM: a terminated job (to be rerun), not a finished one
  except (ConfigError, lock.WorkdirInUse, parallel.CheckpointError, FloatingPointError) as e:
    sys.exit(f"FATAL: {e}")  # the input's or the run's trouble, said in one line: no traceback


if __name__ == "__main__":
  try:  # a mistyped --config.x.y: one line naming the closest key, not a traceback
    configs.check_overrides(sys.argv)
  except ValueError as e:
    sys.exit(f"FATAL: {e}")
  flags.mark_flags_as_required(["config"])  # --workdir too, unless --config_help (main)
  app.run(main)
