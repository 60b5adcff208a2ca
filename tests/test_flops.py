"""FLOPs, peaks and MFU: the formula by hand, against real parameter shapes and XLA's count."""

import json
import os
import subprocess
import sys

import jax
import pytest

import models
from experiments import throughput
from experiments.configs import lm
from parallel import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BxS = (lm.get_config("tiny").train.batch_size, lm.get_config("tiny").train.seq_len)

# B=2, S=8, L=3, E=16, Hq=4, Hkv=2, D=4, F=32, V=10.
SMALL = dict(
  batch=2,
  seq_len=8,
  n_layers=3,
  d_model=16,
  n_heads=4,
  n_kv_heads=2,
  head_dim=4,
  d_ff=32,
  vocab_size=10,
  gated_mlp=False,
  causal=False,
)


def f(**overrides):
  return flops.train_flops_per_step(**{**SMALL, **overrides})


def test_hand_computed():
  ffn = 2 * 2 * 8 * 32 * 16 + 2 * 2 * 8 * 32 * 16  # 2BSFE (x a=1) + 2BSFE = 32768
  qkv = 2 * 2 * 8 * 16 * (4 + 2 * 2) * 4  # 2BSE(Hq + 2Hkv)D = 16384
  out_proj = 2 * 2 * 8 * 16 * 4 * 4  # 2BSE Hq D = 8192
  attention = 4 * 2 * 8**2 * 4 * 4  # 4BS^2 Hq D = 8192
  unembed = 2 * 2 * 8 * 16 * 10  # 2BSEV = 5120
  expected = 3 * (3 * (ffn + qkv + out_proj) + unembed) + 3 * 3 * attention
  assert expected == 605184
  assert f() == expected


def test_causal_halves_attention():
  attention = 4 * 2 * 8**2 * 4 * 4
  assert f(causal=False) - f(causal=True) == 3 * 3 * attention / 2


def test_gated_mlp_adds_one_input_matmul():
  assert f(gated_mlp=True) - f() == 3 * 3 * (2 * 2 * 8 * 32 * 16)


def test_gqa_shrinks_only_kv_projections():
  # From Hkv = Hq = 4 (multi-head) to Hkv = 1: 2 x 3 fewer heads of K and V.
  assert f(n_kv_heads=4) - f(n_kv_heads=1) == 3 * 3 * (2 * 2 * 8 * 16 * 2 * 3 * 4)


def test_matmul_terms_are_six_flops_per_param_per_token():
  """Without attention scores, a step is 6 x tokens x (matmul parameters) of the real model.

  llama-1b covers gated MLP, GQA and an untied LM head; the parameter count comes from the
  model's own shapes, so a mis-mapped config field breaks the equality.
  """
  mc = models.get_preset("llama-1b")
  b, s = 2, 16
  attention = 3 * mc.n_layers * 4 * b * s**2 * mc.n_heads * mc.resolved_head_dim / 2
  norms = (2 * mc.n_layers + 1) * mc.d_model  # RMSNorm scales: no matmul
  input_embed = mc.vocab_size * mc.d_model  # a gather, not a matmul
  matmul_params = models.count_params(mc) - norms - input_embed
  assert throughput.step_flops(mc, b, s) - attention == 6 * b * s * matmul_params


def test_encoder_heads():
  """Encoders attend both ways; MLM adds its E x E transform, classify has no per-token output."""
  dec = models.get_preset("tiny")
  b, s, e, v, L = 4, 32, dec.d_model, dec.vocab_size, dec.n_layers
  full_attention = 3 * L * 4 * b * s**2 * dec.n_heads * dec.resolved_head_dim
  body = throughput.step_flops(dec, b, s) - 6 * b * s * e * v - full_attention / 2
  dims = lambda mc: (mc.d_model, mc.n_layers, mc.n_heads, mc.d_ff, mc.vocab_size)  # noqa: E731
  for head, width in (("mlm", v + e), ("classify", 0), ("none", 0)):
    mc = models.get_preset("tiny-encoder", head=head)
    assert dims(mc) == dims(dec)  # same shapes, so only attention and the head differ
    assert throughput.step_flops(mc, b, s) == body + full_attention + 6 * b * s * e * width


@pytest.mark.parametrize(
  "kind, peak",
  [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("cpu", None),
    ("TPU v4 lite", None),  # v4i, an inference chip: not v4
    ("NVIDIA H100 NVL", None),  # its own lower peak: unknown beats wrong
    ("Tesla V100-SXM2-16GB", None),
  ],
)
def test_peak_lookup(kind, peak):
  name = flops.chip_name(kind)
  assert (flops.PEAK_FLOPS[name] if name else None) == peak


def test_no_peak_no_mfu_on_cpu():
  assert flops.peak_flops_per_device(jax.devices()[0]) is None
  assert flops.mfu(1e12, 1.0, 1, None) is None
  assert throughput.throughput_metrics(1e12, 1000, 1.0, 1, None)["mfu"] is None


def test_throughput_metrics():
  # 2 TFLOP in 0.5 s over 2 devices = 2 TFLOP/s each, half of a 4 TFLOP/s peak.
  m = throughput.throughput_metrics(2e12, 1000, 0.5, 2, 4e12)
  assert m == pytest.approx({"tokens_per_sec": 2000.0, "tflops_per_device": 2.0, "mfu": 0.5})


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
  """The bench CLI on the tiny config for 3 steps (one compile, shared by the tests below)."""
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  cmd = [sys.executable, "-m", "experiments.bench", "--config", "experiments/configs/lm.py:tiny"]
  cmd += ["--steps", "3", "--warmup", "1", "--out", str(out)]
  # One CPU device (not conftest's 8), so XLA's per-device count is the whole batch's.
  xla_flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, XLA_FLAGS=" ".join(x for x in xla_flags if "device_count" not in x))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tokens/s" in proc.stdout and "MFU        n/a" in proc.stdout, proc.stdout
  return json.loads(out.read_text())


def test_bench_writes_json(bench_json):
  r = bench_json
  keys = {
    "compile_s",
    "lower_s",
    "step_time_s",
    "tokens_per_sec",
    "tflops_per_device",
    "mfu",
    "peak_bytes_in_use",
    "max_rss_bytes",
    "n_params",
    "mesh",
    "device_kind",
    "n_devices",
    "dtype",
    "flops_per_step",
    "xla_flops_per_device",
  }
  assert keys <= set(r)
  assert len(r["step_times_s"]) == 3 and r["step_time_s"] > 0 and r["compile_s"] > 0
  assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
  assert r["mfu"] is None and r["peak_flops_per_device"] is None  # CPU: no made-up MFU
  assert r["device_kind"] == "cpu" and r["n_devices"] == 1 and r["max_rss_bytes"] > 0
  assert r["n_params"] == models.count_params(models.get_preset("tiny"))
  assert r["flops_per_step"] == throughput.step_flops(models.get_preset("tiny"), *TINY_BxS)


def test_formula_matches_xla(bench_json):
  """XLA's count of the compiled train step (one device, so the whole batch) vs the formula.

  Compared with causal=False: XLA computes every S x S attention score and masks after, where
  the formula counts the useful half. XLA also counts what the formula leaves out: norms,
  GELU, softmax, cross-entropy, AdamW and the embedding gather's gradient, all elementwise,
  about 3% here. So XLA must be at or above the formula, and within 10% of it.
  """
  mc = models.get_preset("tiny")
  full = flops.train_flops_per_step(
    batch=TINY_BxS[0],
    seq_len=TINY_BxS[1],
    n_layers=mc.n_layers,
    d_model=mc.d_model,
    n_heads=mc.n_heads,
    n_kv_heads=mc.resolved_kv_heads,
    head_dim=mc.resolved_head_dim,
    d_ff=mc.d_ff,
    vocab_size=mc.vocab_size,
    gated_mlp=mc.gated_mlp,
    causal=False,
  )
  ratio = bench_json["xla_flops_per_device"] / full
  assert 1.0 <= ratio <= 1.10, ratio
