"""Fault injection: kills a training run at random moments, reruns it, and checks that it
ends exactly where an uninterrupted run ends.

    python -m experiments.chaos --config experiments/configs/lm.py:tiny --workdir /tmp/chaos \
        --kills 5 [--config.train.steps=300 ...]

First the run goes uninterrupted (`python -m experiments.train`, in `WORKDIR/reference`).
Then, for each kill, the same command starts in a fresh workdir and, at a random moment
after its first step (uniform over the reference's training time, from `--seed`), gets
- `kill`: SIGKILL (`kill -9`): it loses at most the steps since its last complete checkpoint;
- `kill-in-save`: SIGKILL the moment a checkpoint save is in flight (an orbax temporary
  directory exists), so the checkpoint being written is incomplete;
- `term`: SIGTERM, as Cloud TPU sends before preemption: it must save and exit with 143.
The modes take turns. The same command then runs again to the end, and its metrics.jsonl
(every loss and eval row; timings and export file sizes aside) and final checkpoint (params,
optimizer state with any pruning masks, QAT ranges, step, RNG) must equal the reference's bit
for bit.
Then the faults of `--faults`, each in a fresh workdir, rerun to the end and compared too:
- `second-writer`: a second run of the same command on the workdir while the first runs: it
  must exit at once (non-zero, the lock's message); the first goes on undisturbed;
- `error-mid-save`: an exception in the loop (a batch that fails) the step after a checkpoint
  save started: the error alone is reported and that checkpoint completes;
- `disk-full`: the run on a tmpfs with room for two checkpoints (root only; skipped where
  mounting is not allowed): the third save is refused in one line, naming its step, the
  earlier ones stay; the workdir is then copied to a roomy disk and the run finished there.
`WORKDIR/chaos.md` and `chaos.json` get one row per kill and fault; the exit status is 1 if
any differs. Config overrides (`--config.train.steps=60`) go to every run.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags
import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import train
from experiments.metrics import read_metrics
from parallel import checkpoint

MODES = ("kill", "kill-in-save", "term")
FAULTS = ("second-writer", "error-mid-save", "disk-full")
# `python -c` for error-mid-save: the batch of step ERROR_STEP fails (its step is the one right
# after a checkpoint save started), then experiments.train's own main runs.
_FAIL_AT = """
import sys
from absl import app
from experiments import experiment, train
batch = experiment.Experiment.batch
def failing(self, step, split="train"):
  if split == "train" and step + 1 == {step}:
    raise RuntimeError("injected fault: the batch of step {step} failed")
  return batch(self, step, split)
experiment.Experiment.batch = failing
sys.argv[0] = "train"
app.run(train.main)
"""
# Not compared: wall-clock columns, and the exports' file sizes (their serialized layout
# varies by a few percent between identical runs; what they hold is compared: serve_eval_loss).
UNCOMPARED = ("tokens_per_sec", "tflops_per_device", "mfu", "export_bytes", "sparse_bytes")


class Run:
  """`python -m experiments.train` in a subprocess, its log in `workdir/train.log`."""

  def __init__(self, config: str, workdir: str, overrides: list[str], fail_at: int = 0):
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.first_step = workdir, threading.Event()
    entry = ["-c", _FAIL_AT.format(step=fail_at)] if fail_at else ["-m", "experiments.train"]
    cmd = [sys.executable, *entry, f"--config={config}", f"--workdir={workdir}"]
    self.log = open(os.path.join(workdir, "train.log"), "a")
    self.proc = subprocess.Popen(
      cmd + overrides, stderr=subprocess.PIPE, stdout=self.log, text=True, env=_env(workdir)
    )
    self.lines = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.log.write(line)
      self.lines.append(line)
      if "First step" in line:
        self.first_step_at = time.perf_counter()
        self.first_step.set()

  def wait(self, timeout: float | None = None) -> int:
    code = self.proc.wait(timeout)
    self.proc_ended_at = time.perf_counter()
    self._reader.join()
    self.log.close()
    return code

  def said(self, text: str) -> list[str]:
    return [line.strip() for line in self.lines if text in line]


def _env(workdir: str) -> dict:
  env = dict(os.environ)
  # Reruns load the programs the first run compiled (same executables, less waiting).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(workdir), "jit_cache"))
  return env


def run_to_end(config, workdir, overrides) -> Run:
  run = Run(config, workdir, overrides)
  if run.wait() != 0:
    raise RuntimeError(f"The run in {workdir} failed: see {workdir}/train.log")
  return run


def interrupt(run: Run, mode: str, delay: float, after_step: int = 0) -> dict:
  """Sends `mode`'s signal `delay` seconds after the run's first step (and once metrics.jsonl
  has a row at `after_step` or later); what it left behind."""
  ckpt_dir = os.path.join(run.workdir, "checkpoints")
  if not run.first_step.wait(timeout=600):
    raise RuntimeError(f"No first step in {run.workdir} after 600 s: see train.log")
  time.sleep(max(0.0, run.first_step_at + delay - time.perf_counter()))
  while after_step and run.proc.poll() is None:
    rows = _rows(run.workdir)
    if rows and rows[-1]["step"] >= after_step:
      break
    time.sleep(0.005)
  if mode == "kill-in-save":  # wait for a save in flight
    while run.proc.poll() is None and not checkpoint.incomplete(ckpt_dir):
      time.sleep(0.0005)
  at = time.perf_counter() - run.first_step_at
  in_flight = checkpoint.incomplete(ckpt_dir)  # just before the signal: a save is being written
  if run.proc.poll() is not None:
    return {"signal": "none (the run had finished)", "at_s": at}
  run.proc.send_signal(signal.SIGTERM if mode == "term" else signal.SIGKILL)
  code = run.wait(timeout=600)
  rows = _rows(run.workdir)
  return {
    "signal": "SIGTERM" if mode == "term" else "SIGKILL",
    "at_s": round(at, 2),
    "save_in_flight": bool(in_flight),
    "exit": code,
    "last_logged_step": rows[-1]["step"] if rows else None,
    "latest_checkpoint": checkpoint.latest_step(ckpt_dir),
    "left_incomplete": checkpoint.incomplete(ckpt_dir),
  }


def _rows(workdir: str) -> list[dict]:
  return read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


def _state(workdir: str) -> tuple[int, dict]:
  """(step, the whole train state as NumPy) of a run's latest checkpoint, whatever its mesh."""
  manager = checkpoint._reader(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step()
  meta = checkpoint.metadata(manager, step)
  to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  state = checkpoint.read(manager, step, ocp.args.PyTreeRestore(restore_args=to_numpy))
  manager.close()
  return step, state


def compare(reference: str, workdir: str) -> list[str]:
  """How the run in `workdir` differs from the reference run (empty: bit for bit equal)."""
  diffs = []
  strip = lambda rows: [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in rows]  # noqa: E731
  a, b = strip(_rows(reference)), strip(_rows(workdir))
  if [r["step"] for r in a] != [r["step"] for r in b]:
    diffs.append(f"metrics.jsonl steps differ: {[r['step'] for r in b]}")
  diffs += [f"metrics.jsonl row {ra['step']}: {ra} != {rb}" for ra, rb in zip(a, b) if ra != rb]
  (sa, ta), (sb, tb) = _state(reference), _state(workdir)
  if sa != sb:
    diffs.append(f"final checkpoint step {sb} != {sa}")
  fa, fb = jax.tree_util.tree_flatten_with_path(ta)[0], jax.tree_util.tree_flatten_with_path(tb)[0]
  if [p for p, _ in fa] != [p for p, _ in fb]:
    diffs.append("the final checkpoints hold different trees")
  for (path, x), (_, y) in zip(fa, fb):
    if not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True):
      diffs.append(f"final checkpoint {jax.tree_util.keystr(path)} differs")
  return diffs


@dataclasses.dataclass
class Result:
  kill: int | str  # the kill's number, or "f<i>" for the i-th fault
  mode: str
  outcome: dict
  resumed: str
  final_eval_loss: float | None
  differences: list


def final_eval(workdir: str) -> float | None:
  evals = [r["eval_loss"] for r in _rows(workdir) if "eval_loss" in r]
  return evals[-1] if evals else None


def _every(config: str, overrides: list[str]) -> int:
  """The run's train.checkpoint_every (the config file's, or the override's)."""
  for o in overrides:
    if o.startswith("--config.train.checkpoint_every="):
      return int(o.split("=", 1)[1])
  from experiments import configs

  return configs.load(config).train.checkpoint_every


def second_writer(config, run_dir, overrides) -> dict:
  first = Run(config, run_dir, overrides)
  if not first.first_step.wait(timeout=600):
    raise RuntimeError(f"No first step in {run_dir} after 600 s: see train.log")
  start = time.perf_counter()
  second = subprocess.run(
    [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={run_dir}"]
    + overrides,
    capture_output=True,
    text=True,
    env=_env(run_dir),
  )
  took = time.perf_counter() - start
  lines = second.stderr.strip().splitlines()
  return {
    "second_exit": second.returncode,
    "second_took_s": round(took, 1),
    "second_said": lines[-1][:160] if lines else "",
    "exit": first.wait(timeout=1200),
    "latest_checkpoint": checkpoint.latest_step(os.path.join(run_dir, "checkpoints")),
    "ok": second.returncode != 0 and "FATAL" in (lines[-1] if lines else ""),
  }


def error_mid_save(config, run_dir, overrides) -> dict:
  every = _every(config, overrides)
  run = Run(config, run_dir, overrides, fail_at=every + 1)
  code = run.wait(timeout=1200)
  said = run.said("injected fault")
  return {
    "exit": code,
    "error_lines": len(said),
    "event_loop_closed": len(run.said("Event loop is closed")),
    "latest_checkpoint": checkpoint.latest_step(os.path.join(run_dir, "checkpoints")),
    "left_incomplete": checkpoint.incomplete(os.path.join(run_dir, "checkpoints")),
    "ok": code != 0 and bool(said) and not run.said("Event loop is closed"),
  }


def disk_full(config, run_dir, overrides, reference: str) -> dict | None:
  """None where no tmpfs can be mounted (not root, or not allowed)."""
  ckpt = os.path.join(reference, "checkpoints")
  step = checkpoint.latest_step(ckpt)
  size = sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(os.path.join(ckpt, str(step)))
    for f in fs
  )
  mount = run_dir + "-tmpfs"
  os.makedirs(mount, exist_ok=True)
  cmd = ["mount", "-t", "tmpfs", "-o", f"size={int(size * 2.5) + 2**20}", "tmpfs", mount]
  if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
    os.rmdir(mount)
    return None
  try:
    small = os.path.join(mount, "run")
    run = Run(config, small, overrides)
    code = run.wait(timeout=1200)
    fatal = run.said("FATAL")
    outcome = {
      "exit": code,
      "said": fatal[-1][:160] if fatal else "",
      "latest_checkpoint": checkpoint.latest_step(os.path.join(small, "checkpoints")),
      "tracebacks": len(run.said("Traceback")),
      "ok": code != 0 and len(fatal) == 1 and "No room for the checkpoint" in fatal[0],
    }
    shutil.copytree(small, run_dir)  # the rerun finishes on a disk with room
  finally:
    subprocess.run(["umount", mount], capture_output=True)
    os.rmdir(mount)
  return outcome


def faults(config, workdir, names, overrides, ref_dir) -> list[Result]:
  results = []
  for i, name in enumerate(names):
    run_dir = os.path.join(workdir, name)
    if os.path.exists(run_dir):
      raise FileExistsError(f"{run_dir} exists: use a new --workdir (the reference is reused).")
    if name == "second-writer":
      outcome = second_writer(config, run_dir, overrides)
    elif name == "error-mid-save":
      outcome = error_mid_save(config, run_dir, overrides)
    elif name == "disk-full":
      outcome = disk_full(config, run_dir, overrides, ref_dir)
      if outcome is None:
        print("disk-full: skipped (no tmpfs can be mounted here: needs root)", flush=True)
        continue
    else:
      raise ValueError(f"--faults: unknown fault {name!r}; choose from {FAULTS}.")
    rerun = run_to_end(config, run_dir, overrides)
    said = rerun.said("Restored the checkpoint") + rerun.said("newest checkpoint that reads")
    resumed = said[0].split("] ", 1)[-1].split(" from /")[0] if said else "from step 0"
    diffs = compare(ref_dir, run_dir)
    if not outcome.pop("ok"):
      diffs = [f"the fault was not handled as expected: {outcome}"] + diffs
    results.append(Result(f"f{i}", name, outcome, resumed, final_eval(run_dir), diffs))
    print(f"{name}: {outcome}; rerun: {resumed}: {'EQUAL' if not diffs else diffs[:3]}", flush=True)
  return results


def chaos(
  config: str, workdir: str, kills: int, seed: int, overrides: list[str], fault_names=()
) -> list[Result]:
  ref_dir = os.path.join(workdir, "reference")
  if final_eval(ref_dir) is None or not os.path.exists(os.path.join(ref_dir, "done")):
    ref = run_to_end(config, ref_dir, overrides)
    duration = ref.proc_ended_at - ref.first_step_at
    with open(os.path.join(ref_dir, "done"), "w") as f:
      f.write(f"{duration:.3f}")
  duration = float(open(os.path.join(ref_dir, "done")).read())
  print(f"reference: final eval_loss {final_eval(ref_dir)!r}, {duration:.1f}s after its first step")
  rng, results = random.Random(seed), []
  for i in range(kills):
    mode, run_dir = MODES[i % len(MODES)], os.path.join(workdir, f"kill{i}")
    if os.path.exists(run_dir):
      raise FileExistsError(f"{run_dir} exists: use a new --workdir (the reference is reused).")
    delay = rng.uniform(0.05, 0.9 if mode != "kill-in-save" else 0.6) * duration
    outcome = interrupt(Run(config, run_dir, overrides), mode, delay)
    rerun = run_to_end(config, run_dir, overrides)
    said = rerun.said("Restored the checkpoint") + rerun.said("newest checkpoint that reads")
    resumed = said[0].split("] ", 1)[-1].split(" from /")[0] if said else "from step 0"
    r = Result(i, mode, outcome, resumed, final_eval(run_dir), compare(ref_dir, run_dir))
    results.append(r)
    print(
      f"kill {i}: {mode} at {outcome['at_s']}s (save in flight: "
      f"{outcome.get('save_in_flight')}, exit {outcome.get('exit')}, latest checkpoint "
      f"{outcome.get('latest_checkpoint')}); rerun: {resumed}; final eval_loss "
      f"{r.final_eval_loss!r}: {'EQUAL' if not r.differences else r.differences[:3]}",
      flush=True,
    )
  results += faults(config, workdir, fault_names, overrides, ref_dir)
  write(workdir, final_eval(ref_dir), results)
  return results


def write(workdir: str, reference: float, results: list[Result]):
  with open(os.path.join(workdir, "chaos.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
  lines = [
    f"Reference final eval_loss: {reference!r}\n",
    "| run | fault | what happened | exit | latest complete checkpoint | rerun "
    "| final eval_loss | equal to reference |",
    "|---|---|---|---:|---:|---|---:|---|",
  ]
  for r in results:
    o = r.outcome
    if "at_s" in o:
      what = f"at {o['at_s']}s after step 1, save in flight: {o.get('save_in_flight')}"
    else:
      what = "; ".join(f"{k}: {v}" for k, v in o.items() if k not in ("exit", "latest_checkpoint"))
    what = what.replace("|", "/")
    lines.append(
      f"| {r.kill} | {r.mode} | {what} | {o.get('exit')} | {o.get('latest_checkpoint')} | "
      f"{r.resumed} | {r.final_eval_loss!r} | "
      f"{'yes, bit for bit' if not r.differences else 'NO: ' + '; '.join(r.differences[:3])} |"
    )
  with open(os.path.join(workdir, "chaos.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


_KILLS = flags.DEFINE_integer("kills", 5, "How many interrupted runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill moments.")
_FAULTS = flags.DEFINE_list("faults", list(FAULTS), f"Faults after the kills, of {FAULTS}.")


def main(argv):
  del argv
  config = flags.FLAGS["config"]  # experiments.train's flags: --config, --config.x=..., --workdir
  overrides = [f"--config.{k}={v}" for k, v in config.override_values.items()]
  results = chaos(
    config.config_filename,
    train._WORKDIR.value,
    _KILLS.value,
    _SEED.value,
    overrides,
    _FAULTS.value,
  )
  sys.exit(1 if any(r.differences for r in results) else 0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
