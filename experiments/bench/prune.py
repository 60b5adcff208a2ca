"""Benchmarks pruning: step-time overhead of the masks over dense training, cost of mask updates.

    python -m experiments.bench.prune                          # CPU: about 2.5 minutes (2 cores)
    python -m experiments.bench.prune --preset gpt2-small --seq_len 1024 --every 50

It measures, on the first device, at 90% sparsity (magnitude scores) and 2:4:
  steady  ms per train step (mean next-token cross-entropy of the decoder preset,
          value_and_grad, optax.adamw with weight decay, state donated, jitted) of dense adamw,
          of `prune.pruning(..., prune.one_shot(0), inner=adamw)` (unstructured uniform; 2:4)
          and of adamw chained before `prune.pruning(0.9, one_shot(0))`, on steps where the
          masks do not change: step 0 (the selection) is the compile call, so every timed step
          takes the `lax.cond` branch that keeps the masks and pays only for masking (the
          gradients masked before adamw when it is wrapped, `where(mask, u, -w)` on the
          updates, the cond). Each one's overhead over dense, for the whole step and for the
          optimizer alone (its `optim` row's difference from dense adamw, over a dense step).
  update  ms per train step of the same transforms with `prune.periodic(every=1)`, whose
          `is_update` is true at every step, so every timed step recomputes the masks on top of
          the masking: uniform (a 32-step bisection per parameter), global (one bisection
          over all of them together), 2:4 (ranks within each group of 4). Timed steps
          re-select at the target, which takes the bisection's no-tie branch as a real update
          does. As a multiple of a dense step, and amortized over `--every` steps (Zhu &
          Gupta's dt): (update - steady) / every / dense step, the difference taken between
          `optim` rows (the forward and backward are the same program: they only add noise).
  optim   ms per optimizer update alone (tx.update + optax.apply_updates on fixed gradients,
          state donated, jitted) of dense adamw and each transform above, global's steady one
          too (its steady train step is uniform's but for the branch not taken; not timed).
  memory  bytes of the bool masks in the pruning state vs the float32 parameters they select
          (every kernel of rank >= 2) and all parameters: arithmetic on shapes.
Timing: every variant is compiled and called once more (warm-up) first; then the variants'
calls are interleaved one by one, `--repeats` x `--steps` calls each (optimizer updates: 10x as
many), each timed to `jax.block_until_ready`, so that load from other jobs on a shared machine
falls on all variants alike. Reported: the median per-call time (value) and the fastest call
(min, the one least disturbed by other jobs). The "control" rows time the dense adamw step again
(same program, a state of its own) mid-rotation: their difference from dense is the noise floor
of the others. All variants start from one dense init.
"""

import functools
import json
import math
import statistics
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import models
from compress import prune

_PRESET = flags.DEFINE_string("preset", "tiny", "A decoder preset of models.config.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per round (optimizer updates: 10x).")
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Rounds of --steps calls; the median call is reported."
)
_EVERY = flags.DEFINE_integer("every", 100, "Steps between mask updates, for the amortized cost.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows (and the header) to this path.")

SPARSITY = 0.9
OPTIM_CALLS = 10  # optimizer-only calls per train step timed: they are ~100x shorter on CPU
# Masks: name -> pruning keyword arguments (2:4 sets its own sparsity, 1 - 2/4).
_S = models.structure()  # the model's kernels, their input axes, its layers
WHERE = dict(select=_S.weights, stacked=f"^{_S.layers}/")
MASKS = {
  "uniform 90%": dict(sparsity=SPARSITY, **WHERE),
  "global 90%": dict(sparsity=SPARSITY, distribution="global", **WHERE),
  "2:4": dict(granularity=prune.parse_granularity("2:4", nm_axes=_S.contracting), **WHERE),
}


def _time_all(runs: dict, calls: int, repeats: int) -> dict:
  """(median, min) seconds per call of each variant; `run(n)` makes n calls and blocks on the
  last. The variants' calls are interleaved one by one."""
  for run in runs.values():
    run(1)  # compile
    run(1)  # warm up (allocation)
  times = {name: [] for name in runs}
  for _ in range(repeats * calls):
    for name, run in runs.items():
      start = time.perf_counter()
      run(1)
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-3, weight_decay=0.1)


def _steady(**kw) -> optax.GradientTransformation:
  return prune.pruning(schedule=prune.one_shot(0), inner=_adamw(), **kw)


def _updating(**kw) -> optax.GradientTransformation:
  return prune.pruning(schedule=prune.periodic(every=1), inner=_adamw(), **kw)


def _step(tx, loss_fn=None):
  """A jitted, state-donating train step (`loss_fn(params, batch)`), or with no `loss_fn` an
  optimizer update with `batch` as the gradients."""

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, batch):
    params, opt_state = state
    if loss_fn is None:
      loss, grads = jnp.zeros(()), batch
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def _runner(tx, step, params, batch):
  """run(n): n calls of `step` (for `tx`) on a state of its own, blocking on the last."""
  params = jax.tree.map(jnp.copy, params)  # the step donates its state
  state = [(params, tx.init(params))]

  def run(n):
    for _ in range(n):
      state[0], loss = step(state[0], batch)
    jax.block_until_ready((state[0], loss))

  return run


def _row(section, name, value, unit, note="", fastest=None) -> dict:
  return dict(section=section, name=name, value=value, fastest=fastest, unit=unit, note=note)


def _memory_rows(params) -> list[dict]:
  """Bytes of the masks a pruning state holds vs the float32 parameters (shapes only)."""
  masks = jax.tree.leaves(jax.eval_shape(prune.pruning(SPARSITY, **WHERE).init, params).masks)
  mask_bytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in masks)  # bool: 1 byte
  selected = sum(math.prod(m.shape) for m in masks)
  total = sum(x.size for x in jax.tree.leaves(params))
  sel_bytes, all_bytes, mib = 4 * selected, 4 * total, 2.0**20
  return [
    _row(
      "memory",
      "masks (bool)",
      mask_bytes / mib,
      "MiB",
      f"{len(masks)} masks: {100 * mask_bytes / sel_bytes:.0f}% of the params they select, "
      f"{100 * mask_bytes / all_bytes:.1f}% of all",
    ),
    _row(
      "memory",
      "selected params (f32)",
      sel_bytes / mib,
      "MiB",
      f"{selected:,} of {total:,} params ({100 * selected / total:.1f}%)",
    ),
    _row("memory", "all params (f32)", all_bytes / mib, "MiB", "adamw moments: 2x this"),
  ]


def main(argv):
  del argv
  device = jax.devices()[0]
  mc = models.get_preset(_PRESET.value)
  if mc.kind != "decoder":
    raise ValueError(f"--preset={_PRESET.value!r} is an encoder: choose a decoder preset.")
  b, s, steps, reps = _BATCH.value, _SEQ_LEN.value, _STEPS.value, _REPEATS.value
  every = _EVERY.value
  if s > mc.max_len:
    mc = models.get_preset(_PRESET.value, max_len=s)

  ids = jax.random.randint(jax.random.key(2), (b, s), 0, mc.vocab_size)
  model = models.build(mc)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids))["params"]
  header = dict(jax=jax.__version__, backend=jax.default_backend(), device=device.device_kind)
  header.update(preset=_PRESET.value, params=sum(x.size for x in jax.tree.leaves(params)))
  header.update(d_model=mc.d_model, n_layers=mc.n_layers, dtype=mc.dtype, batch=b, seq_len=s)
  print("bench_prune  " + "  ".join(f"{k}={v}" for k, v in header.items()))

  def loss_fn(params, ids):
    logits = model.apply({"params": params}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

  chained = lambda: optax.chain(_adamw(), prune.pruning(SPARSITY, prune.one_shot(0), **WHERE))  # noqa: E731
  steady = {f"wraps adamw, {k}": _steady(**kw) for k, kw in MASKS.items()}
  steady["chained last, uniform 90%"] = chained()
  updating = {f"update, {k}": _updating(**kw) for k, kw in MASKS.items()}
  step_tx = {k: tx for k, tx in steady.items() if "global" not in k}  # its steady step: uniform's
  step_tx.update(updating)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-2), params)  # fixed, dense gradients

  def timed(txs: dict, batch, loss_fn, calls: int) -> dict:
    dense_tx = _adamw()
    dense_step = _step(dense_tx, loss_fn)
    runs = {k: _runner(tx, _step(tx, loss_fn), params, batch) for k, tx in txs.items()}
    runs = {"dense adamw": _runner(dense_tx, dense_step, params, batch), **runs}
    # Dense again, its compiled step on a state of its own, mid-rotation: like every variant,
    # it follows and precedes other programs.
    names = list(runs)
    names.insert(len(names) // 2, "control")
    runs["control"] = _runner(dense_tx, dense_step, params, batch)
    return _time_all({k: runs[k] for k in names}, calls, reps)

  t_step = timed(step_tx, ids, loss_fn, steps)
  t_opt = timed({**steady, **updating}, grads, None, OPTIM_CALLS * steps)
  (dense, dense_min), dense_opt = t_step["dense adamw"], t_opt["dense adamw"][0]

  def pct(t, t_min):  # over dense, median and fastest calls
    return f"{100 * (t / dense - 1):+.1f}% vs dense (min {100 * (t_min / dense_min - 1):+.1f}%)"

  rows = [_row("steady", "dense adamw", dense * 1e3, "ms/step", "", dense_min * 1e3)]
  for name in ("control", *(k for k in steady if k in step_tx)):
    (t, t_min), note = t_step[name], pct(*t_step[name])
    if name != "control":
      note += f"; optimizer only {100 * (t_opt[name][0] - dense_opt) / dense:+.2f}%"
    rows.append(_row("steady", name, t * 1e3, "ms/step", note, t_min * 1e3))
  for k in MASKS:
    (t, t_min), upd = t_step[f"update, {k}"], t_opt[f"update, {k}"][0]
    amortized = (upd - t_opt[f"wraps adamw, {k}"][0]) / every / dense
    note = f"{t / dense:.2f}x dense (min {t_min / dense_min:.2f}x, optimizer only "
    note += f"{1 + (upd - dense_opt) / dense:.2f}x); {100 * amortized:+.3f}%/step at every {every}"
    rows.append(_row("update", f"wraps adamw, {k}", t * 1e3, "ms/step", note, t_min * 1e3))
  for name in ("dense adamw", "control", *steady, *updating):
    t, t_min = t_opt[name]
    note = "" if name == "dense adamw" else f"{1e3 * (t - dense_opt):+.3f} ms vs dense"
    rows.append(_row("optim", name, t * 1e3, "ms/call", note, t_min * 1e3))
  rows += _memory_rows(params)

  print(f"{'section':<8} {'measurement':<27} {'value':>8} {'min':>8}  {'unit':<8} note")
  for r in rows:
    fastest = "" if r["fastest"] is None else f"{r['fastest']:.4g}"
    value, unit = f"{r['value']:.4g}", r["unit"]
    print(f"{r['section']:<8} {r['name']:<27} {value:>8} {fastest:>8}  {unit:<8} {r['note']}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      meta = dict(sparsity=SPARSITY, every=every, steps=steps, repeats=reps)
      json.dump({**header, **meta, "rows": rows}, f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)
