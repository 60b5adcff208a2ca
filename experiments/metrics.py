"""Where a run's numbers go: metrics.jsonl, TensorBoard events, a progress bar and log lines."""

import json
import os

from absl import logging
import tqdm

from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and to TensorBoard.

  On resume from step `start_step`, rows past it (written by the interrupted run after
  its last checkpoint) are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, start_step: int, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.bar = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      disable=not enabled or None,
      dynamic_ncols=True,
      desc=os.path.basename(os.path.normpath(workdir)),
    )
    if not enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if r["step"] <= start_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items() if k != "step"}
    logging.info("step %d: %s", step, ", ".join(f"{k}={v}" for k, v in shown.items()))
    keys = ("loss", "eval_loss", "excess_loss", "accuracy", "tokens_per_sec")
    self.bar.set_postfix({k: shown[k] for k in keys if k in shown}, refresh=False)

  def advance(self, n: int = 1):
    self.bar.update(n)

  def close(self):
    self.bar.close()
    if self.enabled:
      self.tb.close()


def _py(v):
  v = v.item() if hasattr(v, "item") else v
  return float(v) if isinstance(v, float) else v


def read_metrics(workdir: str) -> list[dict]:
  """All rows of a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
