"""Throughput numbers for a run: FLOPs per step of a model config, tokens/s, TFLOP/s, MFU.

The FLOP count is parallel.flops' (MaxText's): matmuls only, forward + backward, no remat.
"""

import models
from parallel import flops


def output_width(mc: models.ModelConfig) -> int:
  """Width of the per-token output matmuls, as the "vocab" of the unembed term (2BSE x width).

  LM: V. MLM: V + E, since BERT's head first applies an E x E transform to every token,
  which has the unembed's form. Classify and "none": 0; the pooler and classifier read only
  the first token of each sequence (2BE(E + C) FLOPs, under 1/S of one layer), so are left out.
  """
  if mc.head == "lm":
    return mc.vocab_size
  if mc.head == "mlm":
    return mc.vocab_size + mc.d_model
  return 0


def step_flops(exp_or_model_config, batch: int, seq_len: int) -> float:
  """Training FLOPs of one step over the global batch (an Experiment or a ModelConfig),
  with a distillation teacher's forward pass when the step runs one."""
  mc = getattr(exp_or_model_config, "model_config", exp_or_model_config)
  teacher = getattr(exp_or_model_config, "teacher", None)
  extra = 0.0
  if teacher is not None and teacher.live:  # its forward pass: a third of a training step
    extra = step_flops(teacher.model_config, batch, seq_len) / 3
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
