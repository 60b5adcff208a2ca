"""Tokens/s, MFU and per-device memory of one model across mesh presets (pipeline stages, data,
FSDP, tensor).

Each arm is a mesh preset over the same devices: pure data parallel (rules `dp`), FSDP
(`fsdp`), tensor parallel (`tp`, data x tensor), FSDP x tensor and data x FSDP x tensor
(`fsdp_tp`), and pipeline parallel (models.pipeline: 2 stages x data, and 2 stages x FSDP x
tensor, in 4 microbatches at tiny scale, 8 at full; the bubble (S - 1) / (M + S - 1) is in the
rows). Every arm scans its layers (the layout stages split), so all start from the same init. An arm runs the one train loop (`train.train_and_evaluate`) for a few dozen
steps and reports the median of its logged tokens/s, TFLOP/s per device and MFU (the rows
after the first logged one, so compilation and warm-up are out), with the per-device memory
of its compiled train step: the parameters and optimizer state one device holds, and the
temporaries and peak that XLA's memory analysis of the step reports (experiments.bench's
helpers). Seeds do not matter here: each arm runs once.

- tiny: the tiny LM (experiments/configs/lm.py:tiny; 4 heads, so at most 4-way tensor
  parallel), batch 16 x 64, 40 steps logged every 5, float32, on 8 simulated CPU devices
  (each arm a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, since the
  calling process may have started jax with one device): about 5 minutes on 2 CPU cores,
  most of it compiling. Its tokens/s measure the overheads of simulated devices, not scaling.
- full: TinyLlama-1.1B (lm.py:llama-1b) in bfloat16, scan_layers, remat `dots_no_batch`,
  global batch 64 x 2048 tokens (8 sequences per device on 8 accelerators), 60 steps logged
  every 10, on the synthetic source from 4 batches held in host memory (`train.data_batches`,
  so generating data does not limit the step). The mesh spans all devices (the -1 axis takes
  what the others leave); tensor parallel is at most 4-way (4 KV heads). Expects 8 GPUs of
  80 GB or more (H100/H200) or a TPU v4-8/v5p-8: about 15 minutes, mostly compilation. Not
  run here yet.
- test: the tiny LM for 6 steps: a smoke run; its numbers mean nothing.
"""

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

from experiments.tables import Arm, Check, Report, copy, finetune
from experiments.configs import lm as lm_config

TITLE = "Tokens/s, MFU and per-device memory across mesh presets (stages, data, FSDP, tensor)"
PAPER = """
MaxText counts MFU as matmul FLOPs (forward + backward, no remat) per second over the chip's
dense bf16 peak (parallel/flops.py uses the same count). Published figures:

| model | hardware | MFU |
|---|---|---:|
| Llama2-7B (MaxText) | 8x H100 | ~49-50% (~490 TFLOP/s per GPU) |
| 32B (MaxText) | TPU v5p-128 | 71.5% |
| GPT-2-style 13B (Levanter) | TPU v3-256 | 54.4% |
"""

# Timings must not share the CPU with another arm.
MAX_WORKERS = 1

N_DEVICES = 8  # tiny / test: simulated CPU devices
# name -> ((data, fsdp, tensor[, stage]) at tiny/test scale, the same at full scale (-1: the
# devices the other axes leave), sharding rules preset).
PRESETS = {
  "dp": ((8, 1, 1), (-1, 1, 1), "dp"),
  "fsdp": ((1, 8, 1), (1, -1, 1), "fsdp"),
  "tp": ((2, 1, 4), (-1, 1, 4), "tp"),
  "fsdp-tp": ((1, 4, 2), (1, -1, 2), "fsdp_tp"),
  "dp-fsdp-tp": ((2, 2, 2), (-1, 2, 2), "fsdp_tp"),
  "pp-dp": ((4, 1, 1, 2), (-1, 1, 1, 2), "fsdp_tp"),
  "pp-fsdp-tp": ((1, 2, 2, 2), (1, -1, 2, 2), "fsdp_tp"),
}
MICROBATCHES = {"tiny": 4, "test": 4, "full": 8}  # the pipelined arms
STEPS = {"tiny": (40, 5), "test": (6, 2), "full": (60, 10)}  # (steps, log_every)
LOSS_TOLERANCE = 0.02  # nats: how far apart the presets' eval losses may end


def base(scale: str):
  """The run every preset shares at `scale` (its mesh is the default, all devices data)."""
  steps, log_every = STEPS[scale]
  if scale == "full":
    c = lm_config.get_config("llama-1b")
    c.dtype = "bfloat16"
    c.model.update(scan_layers=True, remat_policy="dots_no_batch")
    c.train.update(batch_size=64, seq_len=2048, data_batches=4)
    c.eval.update(steps=1, batch_size=64)
  else:
    c = lm_config.get_config("tiny")
    c.model.scan_layers = True
    c.eval.update(steps=1, batch_size=16)
  c = finetune(c, steps)
  c.train.log_every = log_every
  return c


def arms(scale: str) -> list[Arm]:
  c = base(scale)
  out = []
  for name, (tiny_mesh, full_mesh, rules) in PRESETS.items():
    data, fsdp, tensor, *stage = full_mesh if scale == "full" else tiny_mesh
    stage = stage[0] if stage else 1
    config = copy(
      c,
      **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "sharding.rules": rules},
      **{"mesh.stage": stage, "train.microbatches": MICROBATCHES[scale] if stage > 1 else 1},
    )
    out.append(Arm(name, config, shared=True, run="experiments.tables.parallel:run"))
  return out


def _devices_needed(config) -> int:
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.get("stage", 1)]
  return N_DEVICES if -1 in sizes else math.prod(sizes)


def run(config, workdir: str) -> dict:
  """One arm's row: on CPU in a subprocess with enough simulated devices, else in-process on
  the real devices (the mesh spans them all)."""
  import jax

  n = _devices_needed(config)
  if jax.default_backend() != "cpu" or jax.device_count() >= n:
    return measure(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "arm_config.json")
  row_path = os.path.join(workdir, "row.json")
  log_path = os.path.join(workdir, "measure.log")
  with open(config_path, "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  if os.path.exists(row_path):
    os.remove(row_path)
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  # The parent's compilation cache (reproduce's DIR/.jax_cache), else one of this arm's own:
  # the step compiled for its memory analysis is then read back, not compiled again, by the
  # train loop.
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or os.path.join(
    workdir, ".jax_cache"
  )
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "experiments.tables.parallel", config_path, workdir, row_path]
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
  if proc.returncode != 0 or not os.path.exists(row_path):
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); {log_path} ends:\n{tail}")
  with open(row_path) as f:
    return json.load(f)


def measure(config, workdir: str) -> dict:
  """Compiles the arm's train step for XLA's memory analysis, then trains it from scratch
  (in workdir/train) and summarizes the throughput rows the train loop logged."""
  from experiments import experiment, train
  from experiments.bench import step as bench
  from experiments.metrics import read_metrics

  exp = experiment.build(config)
  abstract, shardings = exp.shard_shapes()  # no allocation: the shapes and their shardings
  train_step, _ = experiment.Run(exp, "", shardings).jit_steps()
  compiled = train_step.lower(abstract, exp.batch(0), {}).compile()
  memory = bench.memory_analysis(compiled)
  state_bytes = bench.state_bytes_per_device(abstract)
  del compiled

  train_dir = os.path.join(workdir, "train")
  shutil.rmtree(train_dir, ignore_errors=True)  # timings of a resumed run would be partial
  final = train.train_and_evaluate(config, train_dir)
  rows = read_metrics(train_dir)
  shutil.rmtree(os.path.join(train_dir, "checkpoints"), ignore_errors=True)  # GBs at full
  timed = [r for r in rows if r.get("tokens_per_sec")]
  timed = timed[1:] or timed  # the first logged row may hold warm-up
  losses = [r["loss"] for r in rows if "loss" in r]
  tokens_per_step = config.train.batch_size * config.train.seq_len
  devices = exp.mesh.devices.flatten().tolist()
  mesh = dict(exp.mesh.shape)

  def median(key):
    values = [r[key] for r in timed if r.get(key) is not None]
    return statistics.median(values) if values else None

  stages, microbatches = mesh.get("stage", 1), config.train.microbatches
  row = {
    "stage": stages,
    "microbatches": microbatches,
    "pipeline_bubble": (stages - 1) / (microbatches + stages - 1),
    "data": mesh["data"],
    "fsdp": mesh["fsdp"],
    "tensor": mesh["tensor"],
    "rules": str(config.sharding.rules),
    "n_devices": len(devices),
    "device_kind": devices[0].device_kind,
    "steps": config.train.steps,
    "timed_rows": len(timed),
    "tokens_per_sec": median("tokens_per_sec"),
    "tflops_per_device": median("tflops_per_device"),
    "mfu": median("mfu"),
    "step_time_s": statistics.median(tokens_per_step / r["tokens_per_sec"] for r in timed),
    "train_loss": losses[-1] if losses else None,
    "state_bytes_per_device": state_bytes,
    **memory,
    "peak_bytes_in_use": bench._peak_bytes(devices),
    **{k: v for k, v in final.items() if isinstance(v, (int, float))},
  }
  return {k: v for k, v in row.items() if v is not None}


def _bytes(n) -> str:
  if n is None:
    return "n/a"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def report(res) -> Report:
  names = [n for n in PRESETS if n in res.rows]
  row = {n: res.rows[n][0]["row"] for n in names}
  get = lambda n, k: row[n].get(k)  # noqa: E731
  loss_key = "eval_loss"
  cpu = all(get(n, "device_kind").lower() == "cpu" for n in names)

  table = []
  for n in names:
    mfu = get(n, "mfu")
    table.append(
      [
        n,
        f"{get(n, 'stage') or 1} x {get(n, 'data')} x {get(n, 'fsdp')} x {get(n, 'tensor')}",
        get(n, "rules"),
        f"{get(n, 'pipeline_bubble') or 0:.0%}",
        f"{get(n, 'tokens_per_sec'):,.0f}",
        f"{get(n, 'tflops_per_device'):.4g}",
        "n/a" if mfu is None else f"{mfu:.1%}",
        _bytes(get(n, "state_bytes_per_device")),
        f"{_bytes(get(n, 'xla_temp_bytes'))} / {_bytes(get(n, 'xla_peak_bytes'))}",
        f"{1e3 * get(n, 'step_time_s'):.1f} ms",
        f"{get(n, loss_key):.4f}",
      ]
    )

  checks = []
  losses = {n: get(n, loss_key) for n in names}
  finite = all(v is not None and math.isfinite(v) for v in losses.values()) and all(
    math.isfinite(get(n, "train_loss")) for n in names
  )
  checks.append(
    Check(
      f"every preset trains to a finite loss ({get(names[0], 'steps')} steps)",
      finite,
      ", ".join(f"{n} {v:.4f}" for n, v in losses.items()),
    )
  )
  spread = max(losses.values()) - min(losses.values())
  checks.append(
    Check(
      f"sharding does not change the math: the presets' {loss_key} values agree within "
      f"{LOSS_TOLERANCE} nats",
      bool(spread <= LOSS_TOLERANCE),
      f"max - min = {spread:.2g}",
    )
  )
  if "dp" in row:
    dp = get("dp", "state_bytes_per_device")
    for n in names:
      f, t, s = get(n, "fsdp"), get(n, "tensor"), get(n, "stage") or 1
      if f * t * s == 1:
        continue
      ratio = get(n, "state_bytes_per_device") / dp
      # FSDP shards every matrix (all have an embed axis) but not the small norms and biases;
      # tensor parallelism leaves whatever has no vocab/mlp/heads axis replicated (the learned
      # position table, norms, biases of the embed width): a small share at full scale.
      # Stages split the layers only: every stage holds the embeddings and the final norm.
      slack = 1.1 if t == 1 and s == 1 else 1.35
      checks.append(
        Check(
          f"{n}: per-device parameters + optimizer state about 1/{f * t * s} of pure data "
          f"parallel's (at most {slack} x 1/{f * t * s})",
          bool(ratio <= slack / (f * t * s)),
          f"{_bytes(get(n, 'state_bytes_per_device'))} vs {_bytes(dp)}: 1/{1 / ratio:.2f}",
        )
      )

  notes = (
    "tokens/s and TFLOP/s: the median of the train loop's logged rows after the first "
    "(compilation excluded). Memory is per device: parameters + optimizer state as sharded, "
    "then XLA's memory analysis of the compiled train step (temporaries / peak estimate). "
    "MFU is n/a where the chip's peak is unknown (CPUs)."
  )
  if cpu:
    notes += (
      " On CPU the 8 devices are simulated and share the machine's cores (2 here), so tokens/s "
      "measure the overheads of each layout (collectives, partitioned ops), not scaling; no "
      "speed ordering is claimed. The CPU backend's XLA peak counts arguments and outputs, "
      "not temporaries."
    )

  def plot(fig, res):
    import numpy as np

    x = np.arange(len(names))
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(x, [get(n, "tokens_per_sec") for n in names], color="tab:blue")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"throughput ({get(names[0], 'n_devices')} x {get(names[0], 'device_kind')})")
    ax = fig.add_subplot(1, 2, 2)
    mib = lambda n, k: (get(n, k) or 0) / 2**20  # noqa: E731
    state = [mib(n, "state_bytes_per_device") for n in names]
    temp = [mib(n, "xla_temp_bytes") for n in names]
    ax.bar(x, state, label="parameters + optimizer state")
    ax.bar(x, temp, bottom=state, label="XLA temporaries")
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("MiB per device")
    ax.set_title("memory per device")
    ax.legend()

  columns = [
    "mesh preset",
    "stage x data x fsdp x tensor",
    "rules",
    "bubble",
    "tokens/s",
    "TFLOP/s per device",
    "MFU",
    "params + opt state per device",
    "XLA temp / peak per device",
    "step time",
    loss_key,
  ]
  return Report(columns, table, checks, plot, notes)


def main(argv):
  """`python -m experiments.tables.parallel CONFIG_JSON WORKDIR ROW_JSON`: one arm's row."""
  from absl import flags, logging
  import jax
  import ml_collections

  config_path, workdir, row_path = argv
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.INFO)
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if jax.device_count() < _devices_needed(config):
    raise RuntimeError(f"{jax.device_count()} devices, the mesh needs {_devices_needed(config)}")
  row = measure(config, workdir)
  with open(row_path + ".tmp", "w") as f:
    json.dump(row, f, indent=1)
  os.replace(row_path + ".tmp", row_path)


if __name__ == "__main__":
  main(sys.argv[1:])
