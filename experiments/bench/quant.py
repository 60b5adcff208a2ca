"""Benchmarks int8 quantization: QAT training overhead, int8 matmul throughput, int8 serving.

    python -m experiments.bench.quant                          # CPU: about 2 minutes (2 cores)
    python -m experiments.bench.quant --preset gpt2-small --seq_len 1024 --dtype bfloat16

It measures, on the first device:
  train   ms per train step (mean next-token cross-entropy, value_and_grad, optax.adamw, state
          donated) of the float model and of int8 QAT models (QuantDot on every dense layer but
          lm_head: per-channel, sub-channel tiles of 32, LSQ), and each one's overhead over float.
  matmul  TFLOP/s (2MNK / time) of one lax.dot_general: int8 x int8 -> int32 vs bfloat16 and
          float32 (default precision), and the int8/bf16 ratio. Sizes default to 4096^3 on an
          accelerator, 1024^3 on CPU (--matmul_sizes 2048,4096x4096x1024).
  serve   ms per forward and tokens/s of the float model vs the converted int8 serving model
          (QuantDot mode "serve" on quant.convert's integer kernels).
Timing: after a compile and a warm-up call, `--steps` calls are run, then blocked on with
`jax.block_until_ready`; the median per-call time over `--repeats` such runs is reported.
All variants share one float init. Attention einsums stay float (no attn_dot_general_cls).
"""

import functools
import json
import statistics
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import models
from compress import quant
from compress.quant import Policy, QuantConfig, QuantDot
from experiments.bench import gemm

_PRESET = flags.DEFINE_string("preset", "tiny", "A decoder preset of models.config.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_D_MODEL = flags.DEFINE_integer("d_model", None, "Override d_model (and d_ff = 4 d_model).")
_DTYPE = flags.DEFINE_string("dtype", None, "Override the compute dtype (e.g. bfloat16).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats; the median is reported.")
_MATMUL_SIZES = flags.DEFINE_list(
  "matmul_sizes", None, "Matmul sizes: S (M=N=K=S) or MxNxK. Default 4096 (GPU/TPU), 1024 (CPU)."
)
_JSON = flags.DEFINE_string("json", None, "Also write the rows (and the header) to this path.")


def _time(run, steps: int, repeats: int) -> float:
  """Median seconds per call; `run(n)` makes n calls and blocks on the last result."""
  run(1)  # compile
  run(1)  # warm up (allocation, autotuning)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(steps)
    times.append((time.perf_counter() - start) / steps)
  return statistics.median(times)


def _call_s(fn, args, steps: int, repeats: int) -> float:
  return gemm.seconds(fn, args, calls=steps, repeats=repeats)


def _qat(cfg: QuantConfig, mode: str = "train"):
  return functools.partial(QuantDot, Policy.of((r"lm_head", None), (r".*", cfg)), mode=mode)


def _variables(model, params, ids) -> dict:
  """`model`'s variables around shared float `params`: one jitted forward creates what the
  quantizers add (LSQ steps). Cheaper than `init` per variant, whose RNG is slow to compile."""
  apply = jax.jit(functools.partial(model.apply, mutable=["params", "quant"]))
  return nn.unbox(apply({"params": params}, ids, rngs={"params": jax.random.key(0)})[1])


def _train_step_s(model, variables, ids, steps: int, repeats: int) -> float:
  rest = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adamw(1e-3)

  def loss_fn(params, ids):
    logits = model.apply({"params": params, **rest}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, ids):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params = jax.tree.map(jnp.copy, variables["params"])  # the step donates its state
  state = [(params, tx.init(params))]

  def run(n):
    for _ in range(n):
      state[0], loss = step(state[0], ids)
    jax.block_until_ready(loss)

  return _time(run, steps, repeats)


def _matmul_rows(sizes, steps: int, repeats: int) -> list[dict]:
  rows = []
  for size in sizes:
    m, n, k = size * 3 if len(size) == 1 else size
    tflops = {}
    for dtype in ("int8", "bfloat16", "float32"):
      tflops[dtype] = gemm.raw(dtype, m, n, k, calls=steps, repeats=repeats)
      rows.append(_row("matmul", f"{dtype} {m}x{n}x{k}", tflops[dtype], "TFLOP/s"))
    rows[-3]["note"] = f"{tflops['int8'] / tflops['bfloat16']:.2f}x bf16"
  return rows


def _row(section, name, value, unit, note="") -> dict:
  return dict(section=section, name=name, value=value, unit=unit, note=note)


def main(argv):
  del argv
  device = jax.devices()[0]
  overrides = {} if _DTYPE.value is None else {"dtype": _DTYPE.value}
  if _D_MODEL.value:
    overrides.update(d_model=_D_MODEL.value, d_ff=4 * _D_MODEL.value)
  mc = models.get_preset(_PRESET.value, **overrides)
  b, s, steps, reps = _BATCH.value, _SEQ_LEN.value, _STEPS.value, _REPEATS.value
  if s > mc.max_len:
    mc = models.get_preset(_PRESET.value, **overrides, max_len=s)
  default = "1024" if device.platform == "cpu" else "4096"
  sizes = [tuple(int(d) for d in x.split("x")) for x in (_MATMUL_SIZES.value or [default])]
  header = dict(device=device.device_kind, jax=jax.__version__, preset=_PRESET.value)
  header.update(d_model=mc.d_model, n_layers=mc.n_layers, dtype=mc.dtype, batch=b, seq_len=s)
  print("bench_quant  " + "  ".join(f"{k}={v}" for k, v in header.items()))

  ids = jax.random.randint(jax.random.key(2), (b, s), 0, mc.vocab_size)
  float_model = models.build(mc)
  params = nn.unbox(jax.jit(float_model.init)(jax.random.key(0), ids))["params"]
  int8 = QuantConfig(bits=8, act_bits=8)
  variants = {
    "float": None,
    "int8 QAT (channel)": int8,
    "int8 QAT (tile 32)": QuantConfig(bits=8, act_bits=8, granularity=32),
    "int8 QAT (LSQ)": QuantConfig(bits=8, act_bits=8, lsq=True),
  }
  rows, times = [], {}
  for name, cfg in variants.items():
    model = models.build(mc, None if cfg is None else _qat(cfg))
    times[name] = t = _train_step_s(model, _variables(model, params, ids), ids, steps, reps)
    note = "" if cfg is None else f"{100 * (t / times['float'] - 1):+.1f}% vs float"
    rows.append(_row("train", name, t * 1e3, "ms/step", note))

  rows += _matmul_rows(sizes, steps, reps)

  qat_vars = _variables(models.build(mc, _qat(int8)), params, ids)
  convert_model = models.build(mc, _qat(int8, "convert"))
  convert_apply = jax.jit(functools.partial(convert_model.apply, mutable=["quant"]))  # 1 compile
  serving = quant.convert(lambda v, x, mutable: convert_apply(v, x), qat_vars, ids[:1, :1])
  serve_model = models.build(mc, _qat(int8, "serve"))
  for name, model, variables in (
    ("float forward", float_model, {"params": params}),
    ("int8 serve forward", serve_model, serving),
  ):
    t = _call_s(jax.jit(model.apply), (variables, ids), steps, reps)
    rows.append(_row("serve", name, t * 1e3, "ms/fwd", f"{b * s / t:,.0f} tokens/s"))

  print(f"{'section':<8} {'measurement':<26} {'value':>10}  {'unit':<8} note")
  for r in rows:
    print(f"{r['section']:<8} {r['name']:<26} {r['value']:>10.4g}  {r['unit']:<8} {r['note']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({**header, "steps": steps, "repeats": reps, "rows": rows}, f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
