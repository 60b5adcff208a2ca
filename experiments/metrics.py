"""Where a run's numbers go: metrics.jsonl, TensorBoard events, and a progress bar or lines
(experiments/progress.py)."""

import json
import os
import sys

from absl import logging

from experiments import progress


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX loads torch when it is
  installed (2-3 s at every start) only to accept torch tensors, which are never passed here."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # import torch -> ImportError, inside tensorboardX only
    try:
      import tensorboardX
    finally:
      del sys.modules["torch"]
  import tensorboardX

  return tensorboardX.SummaryWriter(logdir)


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and to TensorBoard.

  On resume from step `start_step`, rows past it (written by the interrupted run after
  its last checkpoint) are dropped, and a row at `start_step` written again with the same
  columns (the exports after the last step, when a run that had finished training is run
  again) replaces the old one, so the file reads as one uninterrupted run.

  People see the run's progress (experiments/progress.py): `advance` every step, a train row
  (`write(..., train=True)`) as the bar's loss and tokens/s (or a periodic line), every other
  row (eval, export) as a line of its own.
  """

  def __init__(self, workdir: str, start_step: int, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.progress = progress.Progress(
      total_steps,
      start_step,
      os.path.basename(os.path.normpath(workdir)),
      enabled=enabled,
      leave=None,  # a run's bar inside experiments.reproduce's goes when the run ends
    )
    self.start_step, self._rows_at_start = start_step, set()
    if not enabled:
      return
    if os.path.exists(self.path):
      rows = [r for r in read_metrics(workdir) if r["step"] <= start_step]
      self._rewrite(rows)
      self._rows_at_start = {frozenset(r) for r in rows if r["step"] == start_step}
    self.tb = _summary_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, train: bool = False):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    if step == self.start_step and frozenset(row) in self._rows_at_start:
      self._rows_at_start.remove(frozenset(row))
      old = read_metrics(os.path.dirname(self.path))
      self._rewrite([row if r["step"] == step and set(r) == set(row) else r for r in old])
    else:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()
    if train:
      self.progress.status(step, train_summary(row))
    else:
      shown = ", ".join(f"{k} {progress.number(v)}" for k, v in row.items() if k != "step")
      self.progress.line(f"step {step}: {shown}")

  def _rewrite(self, rows: list[dict]):
    with open(self.path + ".tmp", "w") as f:  # atomic: a kill leaves the old file or the new
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(self.path + ".tmp", self.path)

  def advance(self, n: int = 1):
    self.progress.update(n)

  def close(self):
    self.progress.close()
    if self.enabled:
      self.tb.close()


def train_summary(row: dict) -> str:
  """A train row for people: `loss 4.195, 16.2k tok/s` (and the non-finite steps, if any)."""
  parts = [f"loss {progress.number(row['loss'])}"] if "loss" in row else []
  if row.get("tokens_per_sec") is not None:
    parts.append(f"{progress.number(row['tokens_per_sec'])} tok/s")
  if row.get("nonfinite_steps"):
    parts.append(f"{row['nonfinite_steps']} non-finite steps skipped")
  return ", ".join(parts)


def _py(v):
  v = v.item() if hasattr(v, "item") else v
  return float(v) if isinstance(v, float) else v


def read_metrics(workdir: str) -> list[dict]:
  """All rows of a run's metrics.jsonl (a last line cut short by a killed run is left out)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:  # only the last line can be cut by a kill
        raise ValueError(f"{workdir}/metrics.jsonl line {i + 1} is not JSON: {line[:80]!r}")
      logging.warning("Dropping the cut last line of %s/metrics.jsonl: %r", workdir, line[:80])
  return rows


def versions() -> dict:
  """The libraries and backend a run's numbers came from (recorded in config.json,
  result.json and the tables): the same code can round differently under other versions."""
  import importlib.metadata

  import jax

  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  device = jax.devices()[0]
  return {**out, "backend": jax.default_backend(), "device_kind": device.device_kind}


def versions_line(v: dict) -> str:
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "flax", "optax", "numpy") if v.get(k))
  return f"{libs}; backend {v.get('backend')} ({v.get('device_kind')})"
