"""experiments.bench.nanodo: trimformer's train step against nanodo's, in a subprocess (it pins
itself to one CPU device before jax starts). nanodo is not on the package index: the timed run
needs a clone on PYTHONPATH and is skipped without one; the skip itself always runs."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args: str, code: str = "") -> subprocess.CompletedProcess:
  """`python -m experiments.bench.nanodo *args` (or `python -c code`) from the repository."""
  cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "experiments.bench.nanodo"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  proc = subprocess.run(
    cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.skipif(importlib.util.find_spec("nanodo") is None, reason="nanodo is not importable")
def test_times_both_steps_on_one_device(tmp_path):
  out = tmp_path / "nanodo.json"
  args = ("--pairs", "3", "--warmup", "1", "--seq_len", "32", "--batch", "4", "--threads", "1")
  proc = bench(*args, "--vocab", "64", "--cost", "--out", str(out))
  r = json.loads(out.read_text())
  assert len(r["devices"]) == 1 and r["threads"] == 1 and r["shape"]["vocab"] == 64
  assert set(r["median_s"]) == {"trimformer", "nanodo", "nanodo-bare"}
  assert all(len(t) == 3 and min(t) > 0 for t in r["times_s"].values())
  for name, ratio in r["ratio"].items():
    assert ratio == pytest.approx(r["median_s"]["trimformer"] / r["median_s"][name])
    assert f"ratio trimformer / {name}: {ratio:.3f}" in proc.stdout
  # The same tokens (vocabulary 64: the synthetic language's symbols relabelled 0..63), a few
  # steps from a random init: every loss is about log(64), no more than a random guess's.
  assert all(2.0 < loss < math.log(64) + 0.5 for loss in r["final_loss"].values()), r
  # nanodo's metrics are extra work on the same forward and backward pass
  flops = {k: c["flops"] for k, c in r["cost"].items()}
  assert flops["nanodo"] > flops["nanodo-bare"] > 0 and flops["trimformer"] > 0


def test_skips_without_nanodo():
  code = (
    "import sys; sys.modules['nanodo'] = None\n"  # `import nanodo` raises ImportError
    "from experiments.bench import nanodo; sys.exit(nanodo.main(sys.argv[1:]))"
  )
  proc = bench("--pairs", "1", code=code)
  assert proc.stdout.startswith("SKIP: nanodo is not importable")
