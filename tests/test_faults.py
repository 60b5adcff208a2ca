"""Fault injection: runs killed (at a random moment, during an async save), preempted
(SIGTERM), fed non-finite losses, and damaged checkpoints; each must lose nothing and say
what happened.

Elsewhere: an unreadable latest checkpoint (tests/test_train.py), multi-process SIGTERM
forwarding (tests/test_launch.py), bad configs and data (tests/test_validation.py).
`python -m experiments.chaos` runs the kills on any config, as many as asked.
"""

import os
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from experiments import chaos, experiment, train
from experiments.configs import lm
from experiments.metrics import MetricWriter, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/experiments/configs/lm.py:tiny"
# 40 steps, a checkpoint and a log row every 5, evals at 20 and 40: ~10 s a run on 2 cores.
OVERRIDES = [
  *("--config.train.steps=40", "--config.train.checkpoint_every=5"),
  *("--config.train.log_every=5", "--config.eval.every=20", "--config.eval.steps=2"),
]


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
  """One compilation cache for every subprocess run of the module: a run loads the programs
  an earlier one compiled (the same executables; chaos.Run's default is one per directory)."""
  return str(tmp_path_factory.mktemp("jit_cache"))


def _subprocess_env(monkeypatch, jit_cache):
  monkeypatch.chdir(REPO)  # `python -m experiments.train` in the subprocesses
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # faster to compile
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jit_cache)


@pytest.fixture(autouse=True)
def _cwd(monkeypatch, jit_cache):
  _subprocess_env(monkeypatch, jit_cache)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jit_cache):
  """The uninterrupted run (CONFIG, OVERRIDES) that the faulted runs must equal, made once;
  read only."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  with pytest.MonkeyPatch.context() as monkeypatch:
    _subprocess_env(monkeypatch, jit_cache)
    chaos.run_to_end(CONFIG, workdir, OVERRIDES)
  return workdir


def test_kills_and_sigterm_then_rerun_equal_the_uninterrupted_run(reference, tmp_path):
  """One workdir through three faults, then to the end: SIGKILL while the first checkpoint is
  being written (nothing complete yet: the rerun starts at step 0 and says why), SIGTERM at
  a random moment between steps 5 and 20 (it saves where it is and exits 143), SIGKILL after
  step 25. Every row of metrics.jsonl and every array of the final checkpoint equal the
  uninterrupted run's, bit for bit."""
  rng = random.Random()  # the moments vary from run to run; the outcome must not
  workdir = str(tmp_path / "run")

  in_save = chaos.interrupt(chaos.Run(CONFIG, workdir, OVERRIDES), "kill-in-save", 0.0)
  assert in_save["exit"] == -9 and in_save["save_in_flight"], in_save
  assert in_save["left_incomplete"] and in_save["latest_checkpoint"] is None, in_save

  run = chaos.Run(CONFIG, workdir, OVERRIDES)
  term = chaos.interrupt(run, "term", rng.uniform(0, 0.5), after_step=rng.choice([5, 10, 15]))
  assert run.said("checkpoint(s) whose save was interrupted")  # the first fault, logged
  assert term["exit"] == 143, term
  (saved,) = run.said("Preempted: saved the checkpoint at step")
  assert term["latest_checkpoint"] == int(saved.split("step ")[-1].split(";")[0])

  kill = chaos.interrupt(chaos.Run(CONFIG, workdir, OVERRIDES), "kill", 0, after_step=25)
  assert kill["exit"] == -9 and kill["latest_checkpoint"] >= term["latest_checkpoint"], kill

  rerun = chaos.run_to_end(CONFIG, workdir, OVERRIDES)
  assert rerun.said(f"Restored the checkpoint at step {kill['latest_checkpoint']}")
  assert chaos.compare(reference, workdir) == []
  assert chaos.final_eval(workdir) == chaos.final_eval(reference)


def test_chaos_faults_error_mid_save_and_disk_full(reference, tmp_path):
  """experiments.chaos's faults: an exception the step after a save started (the error alone,
  that checkpoint complete) and, where a tmpfs can be mounted, a full disk; each rerun ends
  equal to the uninterrupted run."""
  results = chaos.faults(
    CONFIG, str(tmp_path), ["error-mid-save", "disk-full"], OVERRIDES, reference
  )
  assert results[0].mode == "error-mid-save" and results[0].outcome["latest_checkpoint"] == 5
  assert all(r.differences == [] for r in results), [r.differences for r in results]


def test_sigterm_during_the_exports_stops_at_once_and_the_rerun_exports(monkeypatch, tmp_path):
  """SIGTERM while exporting (after the final checkpoint): Preempted at once, naming the
  phase, no export row; the rerun does the exports."""
  import signal
  import time

  from experiments.configs import quant as quant_configs
  from experiments.methods import quant as quant_method

  c = quant_configs.get_config("tiny")
  c.train.update(steps=4, checkpoint_every=4, log_every=2, batch_size=8, seq_len=16)
  c.eval.update(every=4, steps=1, batch_size=8)
  export = quant_method.Quant.export

  def interrupted(self, run, state):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler raises here
    raise AssertionError("SIGTERM did not stop the export")

  monkeypatch.setattr(quant_method.Quant, "export", interrupted)
  with pytest.raises(parallel.Preempted, match="during the exports.*latest checkpoint is step 4"):
    run(c, tmp_path)
  assert not any("serve_eval_loss" in r for r in read_metrics(tmp_path))
  monkeypatch.setattr(quant_method.Quant, "export", export)
  final = run(c, tmp_path)
  assert "serve_eval_loss" in final and (tmp_path / "export").exists()


def tiny(steps, **train):
  c = lm.get_config("tiny")
  c.train.update({"steps": steps, "checkpoint_every": steps, "log_every": 1, **train})
  c.eval.update(every=steps, steps=1)
  return c


def poison(monkeypatch, steps: set[int]):
  """Makes the loss NaN at the given steps (numbered as metrics.jsonl numbers them): each batch
  carries a factor, 1 or NaN, that the loss is multiplied by, so the gradients are NaN too."""
  make_step, batch = parallel.make_train_step, experiment.Experiment.batch

  def poisoned_make_step(loss_fn, tx, microbatches=1, **kwargs):
    def loss(params, b, rng, collections, *frozen):
      b = dict(b)
      factor = b.pop("factor")[0]
      total, sums = loss_fn(params, b, rng, collections, *frozen)
      return total * factor, {**sums, "loss": sums["loss"] * factor}

    return make_step(loss, tx, microbatches, **kwargs)

  def poisoned_batch(self, step, split="train"):
    out = batch(self, step, split)
    if split == "train":
      value = np.nan if step + 1 in steps else 1.0
      factor = np.full(out["inputs"].shape[:1], value, np.float32)
      out["factor"] = jax.make_array_from_process_local_data(self.batch_sharding, factor)
    return out

  monkeypatch.setattr(parallel, "make_train_step", poisoned_make_step)
  monkeypatch.setattr(experiment.Experiment, "batch", poisoned_batch)


def run(c, workdir):
  return train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])


def test_nonfinite_steps_are_skipped_counted_and_limited(monkeypatch, tmp_path):
  """Policy "skip": NaN at steps 3 and 6 with train.max_nonfinite=1. Step 3 is skipped and
  counted; at step 6 (the second) the run stops, naming both; metrics.jsonl has the count."""
  poison(monkeypatch, {3, 6})
  with pytest.raises(FloatingPointError, match="at 2 steps, the first 3, the last 6"):
    run(tiny(8, max_nonfinite=1), tmp_path)
  rows = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if r["step"] not in (3, 6))


def test_nonfinite_stop_policy_names_the_step(monkeypatch, tmp_path):
  poison(monkeypatch, {4})
  with pytest.raises(FloatingPointError, match=r"at step 4 \(train.nonfinite='stop'\)"):
    run(tiny(8, nonfinite="stop"), tmp_path)
  assert [r["nonfinite_steps"] for r in read_metrics(tmp_path)] == [0, 0, 0, 1]


def test_stop_is_exact_between_log_and_save_steps(monkeypatch, tmp_path):
  """NaN at step 3 of 20, logging every 10 and saving every 5: the run stops naming step 3;
  no row and no checkpoint holds a later step (those steps changed nothing)."""
  poison(monkeypatch, {3})
  with pytest.raises(FloatingPointError, match=r"at step 3 \(train.nonfinite='stop'\)"):
    run(tiny(20, nonfinite="stop", log_every=10, checkpoint_every=5), tmp_path)
  rows = read_metrics(tmp_path) if (tmp_path / "metrics.jsonl").exists() else []
  assert [r for r in rows if "loss" in r] == []
  assert not os.path.exists(tmp_path / "checkpoints") or os.listdir(tmp_path / "checkpoints") == []


def test_a_nonfinite_step_changes_nothing_but_the_count():
  """The step on its own: with a NaN gradient the params and the optimizer state (Adam's
  moments and count) come back bit for bit; the step advances and the count records it."""
  import optax

  tx = optax.adamw(1e-2)
  params = {"w": jnp.arange(4.0)}

  def loss(p, batch, rng, collections):
    total = jnp.sum(p["w"] * batch["x"])
    return total, {"loss": total, "weight": jnp.float32(1.0)}

  step = jax.jit(parallel.make_train_step(loss, tx))
  zero = jnp.zeros((), jnp.int32)
  state = {
    "step": zero,
    "params": params,
    "opt": tx.init(params),
    "rng": jax.random.PRNGKey(0),
    "nonfinite": {"count": zero, "first": zero, "last": zero},
  }
  state, _ = step(state, {"x": jnp.ones(4)})
  bad, metrics = step(state, {"x": jnp.array([1.0, np.nan, 1.0, 1.0])})
  jax.tree.map(np.testing.assert_array_equal, bad["params"], state["params"])
  jax.tree.map(np.testing.assert_array_equal, bad["opt"], state["opt"])
  assert int(bad["step"]) == 2 and int(metrics["nonfinite_steps"]) == 1
  assert {k: int(v) for k, v in bad["nonfinite"].items()} == {"count": 1, "first": 2, "last": 2}
  good, _ = step(bad, {"x": jnp.ones(4)})
  assert not np.array_equal(good["params"]["w"], bad["params"]["w"])  # training goes on


def test_past_the_limit_the_step_freezes_the_state():
  """max_nonfinite=0 ("stop"): after the NaN step, finite steps change nothing at all, so
  the state the loop finds later is the one right after the step that crossed the limit."""
  import optax

  tx = optax.adam(1e-2)
  params = {"w": jnp.arange(4.0)}

  def loss(p, batch, rng, collections):
    total = jnp.sum(p["w"] * batch["x"])
    return total, {"loss": total, "weight": jnp.float32(1.0)}

  step = jax.jit(parallel.make_train_step(loss, tx, max_nonfinite=0))
  zero = jnp.zeros((), jnp.int32)
  state = {"step": zero, "params": params, "opt": tx.init(params), "rng": jax.random.key(0)}
  state["nonfinite"] = {"count": zero, "first": zero, "last": zero}
  state, _ = step(state, {"x": jnp.ones(4)})
  bad, _ = step(state, {"x": jnp.array([1.0, np.nan, 1.0, 1.0])})
  assert int(bad["step"]) == 2 and int(bad["nonfinite"]["count"]) == 1
  later = bad
  for x in (jnp.ones(4), jnp.full(4, np.nan), jnp.ones(4)):
    later, _ = step(later, {"x": x})
  same = lambda t: {k: v for k, v in t.items() if k != "rng"}  # noqa: E731 (rng: a key array)
  jax.tree.map(np.testing.assert_array_equal, same(later), same(bad))


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
  """Every checkpoint damaged: the rerun refuses (it never starts again from step 0) and
  leaves the directory as it was."""
  run(tiny(4, checkpoint_every=2), tmp_path)
  rows = read_metrics(tmp_path)
  for step in ("2", "4"):
    os.remove(tmp_path / "checkpoints" / step / "default" / "_METADATA")
  with pytest.raises(RuntimeError, match=r"No checkpoint in .* reads back \(steps \[4, 2\]\)"):
    run(tiny(6, checkpoint_every=2), tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert read_metrics(tmp_path) == rows


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  writer = MetricWriter(str(tmp_path), start_step=2, total_steps=4)
  writer.write(3, {"loss": 1.25})
  writer.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  # A finished run run again writes its last rows (the exports) again: they replace the old.
  writer = MetricWriter(str(tmp_path), start_step=3, total_steps=3)
  writer.write(3, {"loss": 1.0})
  writer.write(3, {"serve_eval_loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path)[2:] == [
    {"step": 3, "loss": 1.0},
    {"step": 3, "serve_eval_loss": 1.5},
  ]
  path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    read_metrics(tmp_path)


def test_preempted_is_raised_after_the_checkpoint(monkeypatch, tmp_path):
  """In-process SIGTERM (a notebook, a reproduce worker): the loop saves at the step it is at
  and raises Preempted; the rerun resumes there."""
  import signal

  calls = []
  real_save = parallel.Checkpointer.save

  def save(self, step, state):
    calls.append(step)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 4 runs
    return real_save(self, step, state)

  monkeypatch.setattr(parallel.Checkpointer, "save", save)
  c = tiny(8, checkpoint_every=3)
  with pytest.raises(parallel.Preempted) as e:
    run(c, tmp_path)
  assert e.value.step == 4 and calls == [3, 4]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
  monkeypatch.setattr(parallel.Checkpointer, "save", real_save)
  out = run(c, tmp_path)
  assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, 9))
  assert np.isfinite(out["eval_loss"])


def test_a_second_run_on_a_workdir_stops_at_once(reference, tmp_path):
  """Two real processes on one workdir (a job resubmitted while the first still runs): the
  second exits non-zero within seconds, naming the holder, before compiling; the first
  finishes as an uninterrupted run does, bit for bit."""
  workdir = str(tmp_path / "run")
  first = chaos.Run(CONFIG, workdir, OVERRIDES)
  assert first.first_step.wait(timeout=300)
  second = chaos.Run(CONFIG, workdir, OVERRIDES)
  assert second.wait(timeout=120) != 0
  assert second.said("is in use by another run") and not second.said("First step")
  assert first.wait() == 0 and not os.path.exists(os.path.join(workdir, "run.lock"))
  assert chaos.compare(reference, workdir) == []


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
  import json
  import socket
  import subprocess
  import sys

  from experiments import lock

  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()  # a run killed with its lock in place
  path = tmp_path / lock.NAME
  host = socket.gethostname()
  path.write_text(json.dumps({"host": host, "pid": gone.pid, "since": "then"}))
  with lock.hold(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not path.exists()
  live = {"host": host, "pid": os.getppid(), "since": "now"}  # a live process, not this one
  path.write_text(json.dumps(live))
  with pytest.raises(lock.WorkdirInUse, match="in use by another run .*wait for it"):
    with lock.hold(str(tmp_path)):
      pass
  path.write_text(json.dumps({**live, "host": "elsewhere"}))
  with pytest.raises(lock.WorkdirInUse, match=f"remove {path}"):
    with lock.hold(str(tmp_path)):
      pass


def test_an_error_in_the_loop_keeps_the_save_in_flight(monkeypatch, tmp_path):
  """A bad batch at step 7 while the step-5 save is still being written: the run raises that
  error alone, and the step-5 checkpoint is complete afterwards."""
  batch = experiment.Experiment.batch

  def bad_at_7(self, step, split="train"):
    if split == "train" and step == 6:  # the batch of step 7
      raise ValueError("bad batch at step 7")
    return batch(self, step, split)

  monkeypatch.setattr(experiment.Experiment, "batch", bad_at_7)
  with pytest.raises(ValueError, match="bad batch at step 7"):
    run(tiny(10, checkpoint_every=5), tmp_path)
  ckpt_dir = str(tmp_path / "checkpoints")
  assert parallel.checkpoint.latest_step(ckpt_dir) == 5
  assert parallel.checkpoint.incomplete(ckpt_dir) == []
  assert not (tmp_path / "run.lock").exists()  # released on the way out
