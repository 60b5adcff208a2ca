"""Where a traced step's time goes: the device ops of a `jax.profiler.trace`, summed by name
and by kind (matmul, attention, collective, copy, other), read from its Perfetto JSON with the
standard library (no TensorBoard needed to read it on the machine that ran it).

    with jax.profiler.trace(d, create_perfetto_trace=True): ...   # a few steps
    summary(d)   # -> {"threads": ..., "ops": [(name, seconds, share)], "kinds": {...}}

On a GPU or TPU the ops are the kernels on the device's busiest stream/line; on the CPU
(where there is no device timeline) the host's XLA ops, without Python or runtime frames.
"""

import collections
import glob
import gzip
import json
import os
import re

# Kernel names by kind, lowercased: cuBLAS/cuBLASLt/CUTLASS GEMMs and XLA's dot fusions;
# cuDNN / flash attention; NCCL and XLA collectives; copies and transposes.
KINDS = (
  ("attention", r"fmha|flash|cudnn|attention|sdpa|softmax"),
  ("matmul", r"gemm|cublas|cutlass|nvjet|xmma|wgmma|dot|matmul|convolution"),
  ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective"),
  ("copy", r"copy|transpose|memcpy|memset|dynamic-update-slice"),
)
# Lines of a device that summarize others (modules, steps) rather than run kernels.
_SUMMARY_LINES = re.compile(r"module|step|framework|source|launch|host", re.I)


def kind(name: str) -> str:
  lowered = name.lower()
  for k, pattern in KINDS:
    if re.search(pattern, lowered):
      return k
  return "other"


def _load(trace_dir: str) -> list[dict]:
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(files[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def summary(trace_dir: str, top: int = 12) -> dict:
  """The busiest kernel line's ops by total time: {"line", "busy_s", "ops": [{name, kind,
  seconds, share}], "kinds": {kind: share}}; shares are of that line's busy time."""
  events = _load(trace_dir)
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device = {pid for pid, name in procs.items() if name.startswith("/device:")}
  per_line = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    pid, line = e["pid"], threads.get((e["pid"], e.get("tid")), "")
    if device and (pid not in device or _SUMMARY_LINES.search(line)):
      continue
    if not device and (e["name"].startswith("$") or "::" in e["name"]):  # CPU: XLA ops only
      continue
    per_line[(procs.get(pid, ""), line)][e["name"]] += e["dur"] * 1e-6  # microseconds
  if not per_line:
    return {"line": None, "busy_s": 0.0, "ops": [], "kinds": {}}
  line, ops = max(per_line.items(), key=lambda kv: sum(kv[1].values()))
  busy = sum(ops.values())
  kinds = collections.Counter()
  for name, t in ops.items():
    kinds[kind(name)] += t / busy
  return {
    "line": " ".join(line).strip(),
    "busy_s": busy,
    "ops": [
      {"name": n, "kind": kind(n), "seconds": t, "share": t / busy} for n, t in ops.most_common(top)
    ],
    "kinds": dict(kinds.most_common()),
  }
