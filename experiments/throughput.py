"""Throughput numbers for a run: FLOPs per step of a model config, tokens/s, TFLOP/s, MFU;
and the train loop's log of them.

The FLOP count is parallel.flops' (MaxText's): matmuls only, forward + backward, no remat.
"""

import time

from absl import logging
import jax

import models
from parallel import flops


def output_width(mc: models.ModelConfig) -> int:
  """Width of the per-token output matmuls, as the "vocab" of the unembed term (2BSE x width).

  LM: V. MLM: V + E, since BERT's head first applies an E x E transform to every token,
  which has the unembed's form. "tokens": its C classes; "span": 2 (start, end), both on every
  token. Classify and "none": 0; the pooler and classifier read only the first token of each
  sequence (2BE(E + C) FLOPs, under 1/S of one layer), so are left out.
  """
  if mc.head == "lm":
    return mc.vocab_size
  if mc.head == "mlm":
    return mc.vocab_size + mc.d_model
  if mc.head in ("tokens", "span"):
    return mc.num_labels
  return 0


def step_flops(exp_or_model_config, batch: int, seq_len: int) -> float:
  """Training FLOPs of one step over the global batch (an Experiment or a ModelConfig),
  with what the experiment's methods add (a distillation teacher's forward pass)."""
  mc = getattr(exp_or_model_config, "model_config", exp_or_model_config)
  methods = getattr(exp_or_model_config, "methods", ())
  extra = sum(m.flops(batch, seq_len) for m in methods)
  return extra + flops.train_flops_per_step(
    batch=batch,
    seq_len=seq_len,
    n_layers=mc.n_layers,
    d_model=mc.d_model,
    n_heads=mc.n_heads,
    n_kv_heads=mc.resolved_kv_heads,
    head_dim=mc.resolved_head_dim,
    d_ff=mc.d_ff,
    vocab_size=output_width(mc),
    gated_mlp=mc.gated_mlp,
    causal=mc.kind == "decoder",
  )


def throughput_metrics(
  flops_per_step: float,
  tokens_per_step: int,
  step_time_s: float,
  n_devices: int,
  peak: float | None,
) -> dict:
  """{"tokens_per_sec", "tflops_per_device", "mfu"} for one step of `step_time_s` seconds.

  `peak` is a device's peak FLOP/s (parallel.flops.peak_flops_per_device); mfu is None
  without one.
  """
  return {
    "tokens_per_sec": tokens_per_step / step_time_s,
    "tflops_per_device": flops_per_step / step_time_s / n_devices / 1e12,
    "mfu": flops.mfu(flops_per_step, step_time_s, n_devices, peak),
  }


class TrainLog:
  """The train rows of metrics.jsonl: every `train.log_every` steps, fetched one log step
  late so the host never stalls the device; tokens/s is measured between those fetches (i.e.
  between completed steps, not dispatches), the first step's compilation left out.
  `nonfinite` (train.NonfinitePolicy) sees every fetched count of non-finite steps and drops
  the rows of steps that changed nothing (after the policy's limit froze the state). Each row
  is also the progress bar's loss and tokens/s (or a periodic line): MetricWriter.write."""

  def __init__(self, run, writer, start: int, nonfinite):
    self.config, self.writer, self.nonfinite = run.exp.config, writer, nonfinite
    self.pending, self.start, self.clock = None, start, [time.perf_counter(), start]
    t = self.config.train
    self.flops = step_flops(run.exp, t.batch_size, t.seq_len)
    self.tokens, self.devices = run.exp.task.tokens_per_step, run.exp.mesh.size
    self.schedule, self.peak = run.exp.schedule, flops.peak_flops_per_device()
    mc = run.exp.model_config  # a pipeline's idle share of stage-iterations, in every speed row
    self.bubble = {}
    if mc.pipeline_stages > 1:
      bubble = models.pipeline.bubble_fraction(mc.pipeline_stages, mc.pipeline_microbatches)
      self.bubble = {"pipeline_bubble": bubble}

  def step(self, done: int, metrics: dict):
    if done == self.start + 1:  # compilation is not throughput
      jax.block_until_ready(metrics)
      logging.info(
        "First step (compilation included) took %.1fs", time.perf_counter() - self.clock[0]
      )
      self.restart(done)
    self.flush()
    t = self.config.train
    if done % t.log_every == 0 or done == t.steps:
      self.pending = (done, metrics, float(self.schedule(done - 1)))

  def restart(self, done: int):
    """Time from now on (after compilation, or an eval) counts."""
    self.clock[:] = [time.perf_counter(), done]

  def flush(self):
    if self.pending is None:
      return
    step, metrics, lr = self.pending
    metrics, now = jax.device_get(metrics), time.perf_counter()
    speed = {}  # none for a log step that is the first step (its time is compilation)
    if step > self.clock[1]:
      step_time = (now - self.clock[0]) / (step - self.clock[1])
      speed = throughput_metrics(self.flops, self.tokens, step_time, self.devices, self.peak)
      speed.update(self.bubble)
    row = {k: v.item() for k, v in metrics.items()}
    count = int(row.get("nonfinite_steps", 0))
    if self.nonfinite.keeps_row(step, count):
      self.writer.write(step, {**row, "learning_rate": lr, **speed}, train=True)
    self.pending, self.clock[:] = None, [now, step]
    self.nonfinite.check(count)
