"""Benchmarks the train step of a config: compile time, step time, tokens/s, TFLOP/s, MFU, memory.

    python -m experiments.bench --config experiments/configs/lm.py:tiny --steps 20
    python -m experiments.bench --config experiments/configs/lm.py:llama-1b --steps 20 \
        --config.dtype=bfloat16 --config.model.attention_impl=cudnn \
        --config.train.batch_size=8 --config.train.seq_len=2048 \
        --config.model.scan_layers=True --config.model.remat_policy=dots_no_batch

The step is the train loop's own (experiments.experiment.build -> init_state -> jit_steps).
Timing: each step is blocked with `jax.block_until_ready` and the median is reported, so
one slow step (a GC pause, a late autotune) does not skew it. The input pipeline is not
timed: one device-resident batch is reused. cuDNN attention may not support a padding mask;
the decoder LM passes none, so `attention_impl=cudnn` works there (with a bf16/fp16 dtype).
"""

import math
import resource
import statistics
import sys
import time

import jax
import ml_collections

from experiments import experiment, throughput, train  # noqa: F401 (train defines --config)
from parallel import flops


def _peak_bytes(devices) -> int | None:
  """Largest `peak_bytes_in_use` over this process's `devices`; None where there are no stats (CPU).

  Other hosts' devices are not addressable here, so their stats cannot be read.
  """
  local = [d for d in devices if d.process_index == jax.process_index()]
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in local]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def state_bytes_per_device(tree) -> int:
  """Bytes of `tree`'s arrays one device holds: each leaf's shard (jax.Arrays, or
  ShapeDtypeStructs with shardings as `Experiment.shard_shapes` gives; no allocation needed).

  For a train state: the parameters and optimizer state on one device, after sharding.
  """
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return int(total)


def memory_analysis(compiled) -> dict:
  """XLA's memory analysis of one device's compiled program, in bytes (`{}` where the backend
  gives none): its arguments, outputs, the outputs aliased to (donated) arguments, the
  temporaries (activations, gradients, workspace) and XLA's peak estimate. The CPU backend's
  peak counts arguments and outputs only, not the temporaries; on TPU/GPU it includes them.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {
    "xla_argument_bytes": int(m.argument_size_in_bytes),
    "xla_output_bytes": int(m.output_size_in_bytes),
    "xla_alias_bytes": int(m.alias_size_in_bytes),
    "xla_temp_bytes": int(m.temp_size_in_bytes),
    "xla_peak_bytes": int(getattr(m, "peak_memory_in_bytes", 0)) or None,
  }


def _max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def run(
  config: ml_collections.ConfigDict, steps: int = 20, warmup: int = 2, trace_dir: str = ""
) -> dict:
  """Compiles the config's train step, runs `warmup` + `steps` steps; returns the numbers.
  `trace_dir`: then 3 more steps under `jax.profiler.trace` (with a Perfetto JSON) there."""
  exp = experiment.build(config)
  state, shardings = exp.init_state()
  train_step, _ = experiment.Run(exp, "", shardings).jit_steps()
  batch = exp.batch(0)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  state_bytes = state_bytes_per_device(state)

  t0 = time.perf_counter()
  lowered = train_step.lower(state, batch, {})
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  # XLA's own count for one device's program: it includes remat recomputation and
  # elementwise ops, and counts custom calls (e.g. cuDNN attention) as zero.
  xla_flops = (compiled.cost_analysis() or {}).get("flops")

  for _ in range(warmup):  # first runs allocate and may autotune
    state, metrics = jax.block_until_ready(compiled(state, batch, {}))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch, {}))
    times.append(time.perf_counter() - start)

  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(3):
        state, metrics = jax.block_until_ready(compiled(state, batch, {}))

  step_time = statistics.median(times)
  devices = exp.mesh.devices.flatten().tolist()
  n_devices = len(devices)
  peak = flops.peak_flops_per_device(devices[0])
  flops_per_step = throughput.step_flops(exp, config.train.batch_size, config.train.seq_len)
  mc = exp.model_config
  return {
    "preset": config.model.preset,
    "task": config.task,
    "kind": mc.kind,
    "dtype": config.dtype,
    "batch_size": config.train.batch_size,
    "seq_len": config.train.seq_len,
    "microbatches": config.train.microbatches,
    "pipeline_stages": mc.pipeline_stages,
    "pipeline_bubble": (mc.pipeline_stages - 1)
    / (mc.pipeline_microbatches + mc.pipeline_stages - 1),
    "scan_layers": mc.scan_layers,
    "remat_policy": mc.remat_policy,
    "attention_impl": mc.attention_impl,
    "n_params": int(n_params),
    "device_kind": devices[0].device_kind,
    "n_devices": n_devices,
    "mesh": dict(exp.mesh.shape),
    "lower_s": t1 - t0,
    "compile_s": t2 - t1,
    "warmup_steps": warmup,
    "steps": steps,
    "timing": "median of per-step times, each step blocked with jax.block_until_ready",
    "step_time_s": step_time,
    "step_times_s": times,
    "tokens_per_step": exp.task.tokens_per_step,
    "flops_per_step": flops_per_step,
    "xla_flops_per_device": xla_flops,
    "peak_flops_per_device": peak,
    **throughput.throughput_metrics(
      flops_per_step, exp.task.tokens_per_step, step_time, n_devices, peak
    ),
    "state_bytes_per_device": state_bytes,
    **memory_analysis(compiled),
    "peak_bytes_in_use": _peak_bytes(devices),
    "max_rss_bytes": _max_rss_bytes(),
    "final_loss": float(metrics["loss"]),
    "jax_version": jax.__version__,
  }


def summary(r: dict) -> str:
  """A readable multi-line summary of `run`'s result."""

  def opt(value, fmt):
    return "n/a" if value is None else fmt.format(value)

  lines = [
    (
      f"model      {r['preset']} ({r['kind']}, {r['n_params']:,} params), dtype {r['dtype']}, "
      f"scan_layers={r['scan_layers']}, remat={r['remat_policy']}, "
      f"attention={r['attention_impl'] or 'default'}"
    ),
    f"devices    {r['n_devices']} x {r['device_kind']}, mesh {r['mesh']}",
    (
      f"batch      {r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step, "
      f"{r['microbatches']} microbatch(es)"
      + (
        f", {r['pipeline_stages']} pipeline stages (bubble {r['pipeline_bubble']:.0%})"
        if r.get("pipeline_stages", 1) > 1
        else ""
      )
    ),
    f"compile    lower {r['lower_s']:.2f}s + compile {r['compile_s']:.2f}s",
    (
      f"step       {r['step_time_s'] * 1e3:.2f} ms (median of {r['steps']} after "
      f"{r['warmup_steps']} warm-up; min {min(r['step_times_s']) * 1e3:.2f}, "
      f"max {max(r['step_times_s']) * 1e3:.2f})"
    ),
    (
      f"throughput {r['tokens_per_sec']:,.0f} tokens/s, "
      f"{r['tflops_per_device']:.4g} TFLOP/s per device "
      f"({r['flops_per_step']:.4g} model FLOPs/step; XLA counts "
      f"{opt(r['xla_flops_per_device'], '{:.4g}')} per device)"
    ),
    (
      f"MFU        {opt(r['mfu'], '{:.1%}')} "
      f"(peak {opt(r['peak_flops_per_device'], '{:.4g}')} FLOP/s per device)"
    ),
    (
      f"memory     device peak {opt(r['peak_bytes_in_use'], '{:,} B')}, "
      f"host max RSS {r['max_rss_bytes'] / 2**20:,.0f} MiB"
    ),
    (
      f"per device (with stages: per stage, per device) params + optimizer state "
      f"{r['state_bytes_per_device']:,} B; XLA: "
      f"temporaries {opt(r.get('xla_temp_bytes'), '{:,} B')}, "
      f"peak {opt(r.get('xla_peak_bytes'), '{:,} B')}"
    ),
    f"loss       {r['final_loss']:.4f} after the last step",
  ]
  return "\n".join(lines)
