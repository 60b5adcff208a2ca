"""The device suite: one command that measures trimformer on an accelerator, in ~8 minutes.

    python -m experiments.bench_device --out runs/device            # the ~1B decoder, bf16
    python -m experiments.bench_device --out /tmp/device --smoke    # same code, tiny, CPU

It writes `<out>/device.json` (after every measurement, so a run cut short keeps what it
measured) and `<out>/device.md` (the tables and the targets, met or not):

  gemm      TFLOP/s of one (n, n) x (n, n) matmul: bf16, int8 x int8 -> int32, fp8 (e4m3);
            and of a bf16 dense layer served float vs int8 through QuantDot (codes from
            quant.convert, activations quantized per call). The bf16 rate at the largest size
            is the measured ceiling the step's TFLOP/s is also compared with.
  step      the train loop's own step (experiments.bench.step: the `lm.py` config of
            `--preset` in `--dtype`, layers scanned, cuDNN attention on GPU) at each of
            `--shapes` (batch x seq_len[:remat policy]): compile time, median step time,
            tokens/s, TFLOP/s, MFU (vs the datasheet peak), XLA's memory analysis.
  compress  the same step (the first shape) with int8 QAT, FP8 QAT, 2:4 masks and 90%
            masks (one-shot at step 0: the timed steps only apply the masks): step time
            and the ratio to the plain step.
  profile   3 more steps of the first shape under jax.profiler: the top device ops and the
            time share by kind (matmul, attention, collective, copy, other); the trace stays
            in `<out>/trace` for TensorBoard or Perfetto.
  decode    models.generate (experiments/bench_generate.py) at `--decode_batches`, float
            weights with a float and an int8 KV cache, and int8 weights (the integer
            export's serving model) with an int8 cache: prefill and decode tokens/s, KV-cache
            bytes, and the decode rate
            the HBM bandwidth allows (bytes one step reads: the weights and the cache).

`--budget_s` bounds the run: a measurement not started within it is listed as skipped. A
measurement that fails (out of memory, an unsupported kernel) is recorded with its error and
the suite goes on; cuDNN attention that fails is retried with XLA's.
"""

import dataclasses
import datetime
import json
import os
import sys
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp

from compress import quant
import models
from experiments import metrics
from experiments.bench import gemm, generate, profile, step
from experiments.configs import lm

_OUT = flags.DEFINE_string("out", None, "Directory for device.json, device.md and the trace.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The tiny preset at tiny shapes: seconds, on CPU.")
_PRESET = flags.DEFINE_string("preset", "llama-1b", "A decoder preset (models.PRESETS).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_SHAPES = flags.DEFINE_list(
  "shapes", ["8x2048", "16x2048", "16x2048:dots_no_batch"], "Step shapes: BxS[:remat policy]."
)
_GEMM = flags.DEFINE_list("gemm_sizes", ["4096", "8192"], "Square matmul sizes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per step measurement.")
_BUDGET = flags.DEFINE_float("budget_s", 450, "Start no measurement after this many seconds.")
_TRACE = flags.DEFINE_bool("trace", True, "Profile 3 steps of the first shape.")
_DECODE = flags.DEFINE_list("decode_batches", ["1", "8", "64"], "Batch sizes of the decode rows.")
_DECODE_LEN = flags.DEFINE_list("decode_len", ["512", "128"], "Prompt and new tokens per row.")

SMOKE = dict(
  preset="tiny",
  shapes=["8x32", "8x64:full"],
  gemm_sizes=["128"],
  steps=2,
  decode_batches=["2"],
  decode_len=["8", "4"],
)
# HBM bandwidth (bytes/s) by device kind, for the decode bound: the datasheets' figures.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
# One config override per compression variant of the step (experiments/methods/*).
COMPRESS = {
  "int8 QAT": {"quant.method": "qat"},
  "fp8 QAT": {"quant.method": "qat", "quant.format": "fp8"},
  "2:4 masks": {"prune.method": "oneshot", "prune.granularity": "2:4"},
  "90% masks": {"prune.method": "oneshot", "prune.sparsity": 0.9},
}
# The targets: (what, value key, comparison, threshold).
TARGETS = (
  ("MFU of the best step shape", "best_mfu", ">=", 0.55),
  ("fp8 QAT step speedup over bf16 (plain time / fp8 time)", "fp8_speedup", ">=", 1.3),
  ("int8 QAT step / plain step", "int8 QAT", "<=", 1.10),
  ("2:4 masks step / plain step", "2:4 masks", "<=", 1.03),
  ("90% masks step / plain step", "90% masks", "<=", 1.03),
  ("int8 GEMM / bf16 GEMM at the largest size", "int8_gemm_speedup", ">=", 1.6),
)


def step_config(preset, dtype, batch, seq_len, remat, overrides=None):
  """The lm.py config of `preset` for one step measurement."""
  c = lm.get_config(preset)
  c.dtype = dtype
  c.model.update(scan_layers=True, remat_policy=remat, max_len=max(c.model.max_len, seq_len))
  c.model.attention_impl = "cudnn" if jax.default_backend() == "gpu" else None
  c.train.update(batch_size=batch, seq_len=seq_len, microbatches=1)
  c.eval.update(steps=1, batch_size=batch)  # jit_steps makes the eval batches too
  for key, value in (overrides or {}).items():
    section, name = key.split(".")
    if name not in c[section]:
      raise KeyError(f"{key}: not a config key here")
    c[section][name] = value
  return c


class Suite:
  """Runs measurements under a time budget, recording each (or its error) in device.json."""

  def __init__(self, out: str, budget_s: float):
    self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
    os.makedirs(out, exist_ok=True)
    self.result = {"versions": metrics.versions(), "argv": sys.argv, "skipped": [], "errors": []}
    self.result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "seconds")

  def measure(self, section: str, name: str, fn):
    """`fn()`'s value under result[section][name]; None if out of time or failed."""
    elapsed = time.perf_counter() - self.t0
    if elapsed > self.budget_s:
      self.result["skipped"].append(f"{section}: {name} (budget {self.budget_s:.0f}s spent)")
      return None
    print(f"[{elapsed:6.0f}s] {section}: {name}", flush=True)
    try:
      value = fn()
    except Exception as e:  # noqa: BLE001 (recorded; the suite measures what it can)
      first = (str(e).strip().splitlines() or [""])[0][:300]
      self.result["errors"].append(f"{section}: {name}: {type(e).__name__}: {first}")
      traceback.print_exc()
      return None
    self.result.setdefault(section, {})[name] = value
    self.save()
    return value

  def save(self):
    self.result["wall_s"] = time.perf_counter() - self.t0
    with open(os.path.join(self.out, "device.json"), "w") as f:
      json.dump(self.result, f, indent=2, default=str)


def _step(config, steps, trace_dir=""):
  """bench.step.run's numbers; cuDNN attention that fails is retried with XLA's."""
  try:
    r = step.run(config, steps=steps, trace_dir=trace_dir)
  except Exception as e:  # noqa: BLE001
    if config.model.attention_impl != "cudnn":
      raise
    print(f"cuDNN attention failed ({type(e).__name__}: {str(e)[:200]}); retrying with XLA's")
    config.model.attention_impl = "xla"
    r = step.run(config, steps=steps, trace_dir=trace_dir)
    r["attention_fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
  r.pop("step_times_s", None)
  return r


def run_suite(
  out,
  preset,
  dtype,
  shapes,
  gemm_sizes,
  steps,
  budget_s,
  trace,
  decode_batches=("1", "8", "64"),
  decode_len=("512", "128"),
) -> dict:
  suite = Suite(out, budget_s)
  r = suite.result
  r["settings"] = dict(preset=preset, dtype=dtype, shapes=shapes, gemm_sizes=gemm_sizes)
  timing = dict(calls=steps, repeats=5)
  for n in (int(s) for s in gemm_sizes):
    for dtype_ in gemm.DTYPES:
      suite.measure("gemm", f"{dtype_} {n}^3", lambda: gemm.raw(dtype_, n, n, n, **timing))
    suite.measure("gemm", f"dense bf16 {n}^3", lambda: gemm.dense(None, n, n, n, **timing))
    int8 = quant.QuantConfig(bits=8, act_bits=8)
    suite.measure("gemm", f"dense int8 {n}^3", lambda: gemm.dense(int8, n, n, n, **timing))

  parsed = []
  for shape in shapes:
    size, _, remat = shape.partition(":")
    batch, seq_len = (int(x) for x in size.split("x"))
    parsed.append((batch, seq_len, remat or "none"))
  trace_dir = os.path.join(out, "trace") if trace else ""
  for i, (batch, seq_len, remat) in enumerate(parsed):
    config = step_config(preset, dtype, batch, seq_len, remat)
    traced = trace_dir if i == 0 else ""  # the first shape's run also traces 3 steps
    suite.measure("step", f"{batch}x{seq_len} remat={remat}", lambda: _step(config, steps, traced))
  if trace_dir and os.path.isdir(trace_dir):
    suite.measure("profile", "step", lambda: profile.summary(trace_dir))

  batch, seq_len, remat = parsed[0]
  for name, overrides in COMPRESS.items():
    try:
      config = step_config(preset, dtype, batch, seq_len, remat, overrides)
    except KeyError as e:  # e.g. a quantization format this version does not have
      r["skipped"].append(f"compress: {name} ({e})")
      continue
    suite.measure("compress", name, lambda: _step(config, steps))
  decode_rows(suite, preset, dtype, [int(b) for b in decode_batches], *map(int, decode_len))
  r["targets"] = targets(r)
  suite.save()
  write_markdown(r, os.path.join(out, "device.md"))
  return r


def decode_rows(suite, preset, dtype, batches, prompt_len, new):
  """bench_generate.measure's rows, each with the decode rate HBM bandwidth allows."""
  cfg = models.get_preset(preset, dtype=dtype, scan_layers=True)
  cfg = dataclasses.replace(cfg, max_len=max(cfg.max_len, prompt_len + new))
  variables = None
  bandwidth = next(
    (b for k, b in HBM_BYTES_PER_S.items() if k in jax.devices()[0].device_kind), None
  )

  def row(batch, weights, kv):
    nonlocal variables
    if variables is None:
      init = jax.jit(models.build(cfg).init)
      variables = init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    x = generate.measure(cfg, variables, batch, prompt_len, new, kv, 3, weights=weights)
    x["hbm_bound_tok_s"] = bandwidth and batch * bandwidth / x["bytes_per_step"]
    return x

  for batch in batches:  # weights / KV cache: float / float, float / int8, int8 / int8
    for w, kv in (("float", "float"), ("float", "int8"), ("int8", "int8")):
      suite.measure("decode", f"{batch} {w} {kv}", lambda: row(batch, w, kv))


def targets(r: dict) -> list[dict]:
  """Each target with its measured value (None: not measured) and whether it is met."""
  steps = r.get("step", {})
  first = next(iter(steps.values()), None)
  mfus = [s["mfu"] for s in steps.values() if s["mfu"] is not None]  # None: peak unknown
  values = {"best_mfu": max(mfus, default=None)}
  for name, c in r.get("compress", {}).items():
    if first:
      values[name] = c["step_time_s"] / first["step_time_s"]
  if "fp8 QAT" in values:
    values["fp8_speedup"] = 1 / values["fp8 QAT"]
  g = r.get("gemm", {})
  n = max((int(s) for s in r["settings"]["gemm_sizes"]), default=0)
  if g.get(f"int8 {n}^3") and g.get(f"bfloat16 {n}^3"):
    values["int8_gemm_speedup"] = g[f"int8 {n}^3"] / g[f"bfloat16 {n}^3"]
  out = []
  for what, key, op, threshold in TARGETS:
    v = values.get(key)
    met = None if v is None else (v >= threshold if op == ">=" else v <= threshold)
    out.append(dict(target=f"{what} {op} {threshold}", value=v, met=met))
  return out


def _fmt(v, spec="{:.3g}"):
  return "n/a" if v is None else spec.format(v)


def write_markdown(r: dict, path: str):
  v = r["versions"]
  s = r["settings"]
  lines = [
    f"# Device suite: {v['device_kind']}, {r['date']}",
    "",
    f"`{' '.join(['python -m experiments.bench_device'] + r['argv'][1:])}`; "
    f"{metrics.versions_line(v)}; {r['wall_s']:.0f} s wall.",
    "",
    "## Matmul (TFLOP/s)",
    "",
    "| n | bf16 | int8 -> int32 | fp8 e4m3 | int8 / bf16 | fp8 / bf16 | dense bf16 | dense int8 "
    "(QuantDot serve) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  g = r.get("gemm", {})
  for n in s["gemm_sizes"]:
    bf, i8, f8 = (g.get(f"{d} {n}^3") for d in gemm.DTYPES)
    ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    cells = [bf, i8, f8, ratio(i8, bf), ratio(f8, bf), g.get(f"dense bf16 {n}^3")]
    cells.append(g.get(f"dense int8 {n}^3"))
    lines.append(f"| {n}^3 | " + " | ".join(_fmt(c) for c in cells) + " |")
  ceiling = g.get(f"bfloat16 {max(s['gemm_sizes'], key=int)}^3") if s["gemm_sizes"] else None
  lines += [
    "",
    f"## Train step: {s['preset']}, {s['dtype']}, layers scanned",
    "",
    "| batch x seq | remat | attention | step ms | tokens/s | TFLOP/s | MFU | of bf16 matmul "
    "| compile s | XLA temp GiB | state GiB |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, x in r.get("step", {}).items():
    shape, remat = name.split(" remat=")
    cells = [
      shape,
      remat,
      x["attention_impl"] or "default",
      _fmt(x["step_time_s"] * 1e3, "{:.1f}"),
      _fmt(x["tokens_per_sec"], "{:,.0f}"),
      _fmt(x["tflops_per_device"], "{:.1f}"),
      _fmt(x["mfu"], "{:.1%}"),
      _fmt(None if not ceiling else x["tflops_per_device"] / ceiling, "{:.1%}"),
      _fmt(x["compile_s"], "{:.1f}"),
      _fmt((x.get("xla_temp_bytes") or 0) / 2**30, "{:.2f}"),
      _fmt(x["state_bytes_per_device"] / 2**30, "{:.2f}"),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  first = next(iter(r.get("step", {}).values()), None)
  lines += ["", "## Compressed train steps (first shape)", ""]
  lines += ["| variant | step ms | x plain step | compile s |", "|---|---:|---:|---:|"]
  for name, x in r.get("compress", {}).items():
    ratio = x["step_time_s"] / first["step_time_s"] if first else None
    cells = [_fmt(x["step_time_s"] * 1e3, "{:.1f}"), _fmt(ratio, "{:.3f}")]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {x['compile_s']:.1f} |")
  p = r.get("profile", {}).get("step")
  if p:
    kinds = ", ".join(f"{k} {share:.0%}" for k, share in p["kinds"].items())
    lines += ["", f"## Profile of the first shape ({p['line']}): {kinds}", ""]
    lines += ["| op | kind | ms / 3 steps | share |", "|---|---|---:|---:|"]
    for op in p["ops"]:
      name = op["name"].replace("|", "/")[:80]
      lines.append(f"| `{name}` | {op['kind']} | {op['seconds'] * 1e3:.2f} | {op['share']:.1%} |")
  if r.get("decode"):
    lines += ["", f"## Decoding ({s['preset']}, {s['dtype']}; bench_generate)", ""]
    lines += [
      "| batch | weights | KV cache | prefill tok/s | decode tok/s | HBM bound tok/s | of bound "
      "| KV GiB | bytes/step GiB |",
      "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["decode"].values():
      bound = x.get("hbm_bound_tok_s")
      cells = [
        str(x["batch"]),
        x.get("weights", "float"),
        x["kv_cache"],
        _fmt(x["prefill_tok_s"], "{:,.0f}"),
        _fmt(x["decode_tok_s"], "{:,.0f}"),
        _fmt(bound, "{:,.0f}"),
        _fmt(bound and x["decode_tok_s"] / bound, "{:.1%}"),
        _fmt(x["kv_cache_bytes"] / 2**30, "{:.3f}"),
        _fmt(x["bytes_per_step"] / 2**30, "{:.3f}"),
      ]
      lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Targets", ""]
  if s["preset"] != "llama-1b" or v["backend"] != "gpu":
    lines += [
      "(Set for the ~1B decoder, llama-1b, on one H200: only a check of the code here.)",
      "",
    ]
  lines += ["| target | measured | met |", "|---|---:|---|"]
  for t in r.get("targets", []):
    met = {None: "not measured", True: "yes", False: "**no**"}[t["met"]]
    lines.append(f"| {t['target']} | {_fmt(t['value'])} | {met} |")
  for key in ("skipped", "errors"):
    if r[key]:
      lines += ["", f"{key.capitalize()}:", ""] + [f"- {x}" for x in r[key]]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv):
  del argv
  if not _OUT.value:
    raise app.UsageError("--out: give the directory for device.json and device.md.")
  kw = dict(preset=_PRESET.value, shapes=_SHAPES.value, gemm_sizes=_GEMM.value, steps=_STEPS.value)
  kw.update(decode_batches=_DECODE.value, decode_len=_DECODE_LEN.value)
  if _SMOKE.value:
    kw.update(SMOKE)
  r = run_suite(_OUT.value, dtype=_DTYPE.value, budget_s=_BUDGET.value, trace=_TRACE.value, **kw)
  with open(os.path.join(_OUT.value, "device.md")) as f:
    print(f.read())
  print(f"wrote {_OUT.value}/device.json and device.md ({len(r['errors'])} errors)")


if __name__ == "__main__":
  app.run(main)
