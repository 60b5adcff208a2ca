"""The device suite (experiments.bench_device): its --smoke run on CPU, the profile reader and
the targets' arithmetic."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from experiments import bench_device
from experiments.bench import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """`python -m experiments.bench_device --smoke` on one CPU device: (device.json, device.md)."""
  out = tmp_path_factory.mktemp("device")
  cmd = [sys.executable, "-m", "experiments.bench_device", "--smoke", "--out", str(out)]
  xla_flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, XLA_FLAGS=" ".join(x for x in xla_flags if "device_count" not in x))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((out / "device.json").read_text()), (out / "device.md").read_text()


def test_smoke_measures_every_section(smoke):
  r, md = smoke
  assert r["errors"] == []
  assert set(r["gemm"]) == {f"{d} 128^3" for d in ("bfloat16", "int8", "float8_e4m3fn")} | {
    "dense bf16 128^3",
    "dense int8 128^3",
  }
  assert all(v > 0 for v in r["gemm"].values())
  assert list(r["step"]) == ["8x32 remat=none", "8x64 remat=full"]
  for s in r["step"].values():
    assert s["step_time_s"] > 0 and s["tokens_per_step"] == s["batch_size"] * s["seq_len"]
    assert s["scan_layers"] and s["dtype"] == "bfloat16"
  assert r["step"]["8x64 remat=full"]["remat_policy"] == "full"
  assert set(r["compress"]) == {"int8 QAT", "fp8 QAT", "2:4 masks", "90% masks"}
  p = r["profile"]["step"]
  assert p["ops"] and abs(sum(p["kinds"].values()) - 1) < 1e-6
  assert [t["target"].split(" >=")[0].split(" <=")[0] for t in r["targets"]] == [
    t[0] for t in bench_device.TARGETS
  ]
  assert set(r["decode"]) == {"2 float float", "2 float int8", "2 int8 int8"}
  assert all(x["decode_tok_s"] > 0 and x["hbm_bound_tok_s"] is None for x in r["decode"].values())
  sections = (
    "## Matmul",
    "## Train step",
    "## Compressed train steps",
    "## Decoding",
    "## Targets",
  )
  for title in sections:
    assert title in md


def _event(pid, tid, name, dur_us):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur_us}


def _meta(kind, pid, name, tid=None):
  e = {"ph": "M", "pid": pid, "name": kind, "args": {"name": name}}
  return e if tid is None else {**e, "tid": tid}


def test_profile_sums_the_busiest_device_line(tmp_path):
  events = [
    _meta("process_name", 1, "/host:CPU"),
    _meta("process_name", 2, "/device:GPU:0"),
    _meta("thread_name", 2, "XLA Modules", tid=7),
    _meta("thread_name", 2, "Stream #13(Compute)", tid=8),
    _meta("thread_name", 2, "Stream #14(MemcpyD2D)", tid=9),
    _event(1, 1, "PjitFunction(step)", 5000),  # host: ignored when there is a device
    _event(2, 7, "jit_step", 4000),  # a module line: ignored
    _event(2, 8, "sm90_xmma_gemm_bf16", 600),
    _event(2, 8, "sm90_xmma_gemm_bf16", 600),
    _event(2, 8, "cudnn_fmha_fwd", 300),
    _event(2, 8, "loop_add_fusion", 300),
    _event(2, 9, "copy.1", 100),
  ]
  d = tmp_path / "plugins" / "profile" / "run"
  d.mkdir(parents=True)
  with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = profile.summary(str(tmp_path))
  assert s["line"] == "/device:GPU:0 Stream #13(Compute)"
  assert s["busy_s"] == pytest.approx(1.8e-3)
  assert [(o["name"], o["kind"]) for o in s["ops"]] == [
    ("sm90_xmma_gemm_bf16", "matmul"),
    ("cudnn_fmha_fwd", "attention"),
    ("loop_add_fusion", "other"),
  ]
  assert s["kinds"] == pytest.approx({"matmul": 2 / 3, "attention": 1 / 6, "other": 1 / 6})


def test_targets_compare_against_the_plain_step():
  r = {
    "settings": {"gemm_sizes": ["4096", "8192"]},
    "step": {"a": {"step_time_s": 1.0, "mfu": 0.5}, "b": {"step_time_s": 2.0, "mfu": 0.52}},
    "compress": {"int8 QAT": {"step_time_s": 1.2}, "fp8 QAT": {"step_time_s": 0.7}},
    "gemm": {"int8 8192^3": 1300.0, "bfloat16 8192^3": 780.0, "int8 4096^3": 1.0},
  }
  t = {x["target"].split(" >=")[0].split(" <=")[0]: x for x in bench_device.targets(r)}
  assert (
    t["MFU of the best step shape"]["value"] == 0.52 and not t["MFU of the best step shape"]["met"]
  )
  assert t["int8 QAT step / plain step"]["value"] == pytest.approx(1.2)
  assert t["int8 QAT step / plain step"]["met"] is False
  fp8 = t["fp8 QAT step speedup over bf16 (plain time / fp8 time)"]
  assert fp8["value"] == pytest.approx(1 / 0.7) and fp8["met"]
  gemm = t["int8 GEMM / bf16 GEMM at the largest size"]
  assert gemm["value"] == pytest.approx(1300 / 780) and gemm["met"]
  assert t["2:4 masks step / plain step"]["met"] is None  # not measured
