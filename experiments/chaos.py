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
`WORKDIR/chaos.md` and `chaos.json` get one row per kill; the exit status is 1 if any differs.
Config overrides (`--config.train.steps=60`) go to every run.
"""

import dataclasses
import json
import os
import random
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
# Not compared: wall-clock columns, and the exports' file sizes (their serialized layout
# varies by a few percent between identical runs; what they hold is compared: serve_eval_loss).
UNCOMPARED = ("tokens_per_sec", "tflops_per_device", "mfu", "export_bytes", "sparse_bytes")


class Run:
  """`python -m experiments.train` in a subprocess, its log in `workdir/train.log`."""

  def __init__(self, config: str, workdir: str, overrides: list[str]):
    os.makedirs(workdir, exist_ok=True)
    self.workdir, self.first_step = workdir, threading.Event()
    cmd = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}"]
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
  kill: int
  mode: str
  outcome: dict
  resumed: str
  final_eval_loss: float | None
  differences: list


def final_eval(workdir: str) -> float | None:
  evals = [r["eval_loss"] for r in _rows(workdir) if "eval_loss" in r]
  return evals[-1] if evals else None


def chaos(config: str, workdir: str, kills: int, seed: int, overrides: list[str]) -> list[Result]:
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
  write(workdir, final_eval(ref_dir), results)
  return results


def write(workdir: str, reference: float, results: list[Result]):
  with open(os.path.join(workdir, "chaos.json"), "w") as f:
    json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
  lines = [
    f"Reference final eval_loss: {reference!r}\n",
    "| kill | mode | at (s after step 1) | save in flight | exit | latest complete checkpoint "
    "| rerun | final eval_loss | equal to reference |",
    "|---:|---|---:|---|---:|---:|---|---:|---|",
  ]
  for r in results:
    o = r.outcome
    lines.append(
      f"| {r.kill} | {r.mode} | {o['at_s']} | {o.get('save_in_flight')} | {o.get('exit')} | "
      f"{o.get('latest_checkpoint')} | {r.resumed} | {r.final_eval_loss!r} | "
      f"{'yes, bit for bit' if not r.differences else 'NO: ' + '; '.join(r.differences[:3])} |"
    )
  with open(os.path.join(workdir, "chaos.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


_KILLS = flags.DEFINE_integer("kills", 5, "How many interrupted runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill moments.")


def main(argv):
  del argv
  config = flags.FLAGS["config"]  # experiments.train's flags: --config, --config.x=..., --workdir
  overrides = [f"--config.{k}={v}" for k, v in config.override_values.items()]
  results = chaos(
    config.config_filename, train._WORKDIR.value, _KILLS.value, _SEED.value, overrides
  )
  sys.exit(1 if any(r.differences for r in results) else 0)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
