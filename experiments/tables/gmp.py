"""Gradual vs one-shot magnitude pruning, and large-sparse vs small-dense at equal non-zeros
(Zhu & Gupta 2017, "To prune, or not to prune").

Rows, at 50/75/90/95% of every kernel pruned (embeddings, norms and biases stay dense):
- one-shot: the trained dense model pruned once, evaluated as it is;
- one-shot + fine-tune: the same, then trained on with the masks fixed;
- gradual: pruned during training on Zhu & Gupta's cubic schedule, from scratch, with as many
  steps as dense training + fine-tuning;
- small dense: a dense model as deep, narrower (d_model a multiple of 2 x heads), with about
  as many parameters as the sparse model has non-zeros, trained as long as the gradual run.

- tiny: the tiny LM (experiments/configs/lm.py:tiny); dense 200 steps, fine-tune 100,
  gradual 300 (cubic from step 25 to 200, dt 25); about 12 minutes on 2 CPU cores, 3 seeds.
- full: GPT-2 small on lm1b (lm_tfds.py:lm1b) from scratch: dense 20k steps, fine-tune 5k,
  gradual and small dense 25k (cubic from 2k to 15k, dt 1k): about 45 min per 25k-step run
  on a TPU v4-8, some 10 hours per seed.
"""

import dataclasses
import functools

import numpy as np

import models
from experiments.tables import Arm, Check, Report, copy, finetune, lm, loss_key, model_config

TITLE = "Gradual vs one-shot magnitude pruning; large-sparse vs small-dense (Zhu & Gupta 2017)"
PAPER = """
Zhu & Gupta: gradual pruning s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 beats one-shot,
and large-sparse models beat small-dense ones with the same number of non-zeros, by more at
higher compression. Distiller's reproduction (WikiText-2, 2-layer LSTM, test perplexity):

| model | non-zeros | perplexity |
|---|---:|---:|
| small dense | 7.1M | 96.29 |
| medium dense | 28.4M | 84.21 |
| large dense | 85.9M | 83.85 |
| large 80.4% sparse | 16.8M | 83.64 |
| large 90% sparse | 8.6M | 85.67 |
| large 95% sparse | 4.3M | 92.79 |
"""

SPARSITIES = (0.5, 0.75, 0.9, 0.95)
# (dense steps, fine-tune steps, cubic start, cubic end, dt)
STEPS = {
  "tiny": (200, 100, 25, 200, 25),
  "test": (6, 4, 1, 5, 2),
  "full": (20000, 5000, 2000, 15000, 1000),
}


def _pct(s: float) -> str:
  return f"{round(100 * s)}"


@functools.lru_cache(maxsize=None)
def _count(model) -> int:
  return models.count_params(model)


def nonzeros(config, sparsity: float) -> int:
  """Non-zero parameters of `config`'s model with `sparsity` of its kernels pruned."""
  model = model_config(config)
  return _count(model) - round(sparsity * _kernel_params(model))


@functools.lru_cache(maxsize=None)
def _kernel_params(model) -> int:
  """Parameters in the pruned kernels (every `kernel` of rank >= 2), from shapes only."""
  import jax
  import jax.numpy as jnp

  from flax.linen import meta

  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = meta.unbox(jax.eval_shape(models.build(model).init, jax.random.key(0), ids))
  leaves = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  return sum(
    x.size for path, x in leaves if getattr(path[-1], "key", "") == "kernel" and len(x.shape) >= 2
  )


def small_dense(config, nnz: int) -> tuple[int, int]:
  """(d_model, parameters) of the narrower model (d_ff = 4 d_model) closest to `nnz`.

  With d_ff = 4 d_model the count is a quadratic in d_model: three counts give all of them.
  """
  model = model_config(config)
  step = 2 * model.n_heads
  at = lambda d: _count(dataclasses.replace(model, d_model=d, d_ff=4 * d, head_dim=None))  # noqa: E731
  xs = [step, 2 * step, 3 * step]
  coef = np.polyfit(xs, [at(x) for x in xs], 2)
  best = min(range(step, model.d_model, step), key=lambda d: abs(np.polyval(coef, d) - nnz))
  return best, at(best)


def arms(scale: str) -> list[Arm]:
  dense_steps, ft, start, end, every = STEPS[scale]
  dense = lm(scale, dense_steps)
  out = [Arm("dense", dense)]
  for s in SPARSITIES:
    p = _pct(s)
    prune = {"prune.sparsity": s, "init_from": ""}
    oneshot = copy(dense, **prune, **{"prune.method": "oneshot", "prune.start": 0})
    out.append(Arm(f"oneshot-{p}", finetune(copy(oneshot), 0), "dense"))
    out.append(Arm(f"oneshot-ft-{p}", finetune(oneshot, ft), "dense"))
    gradual = copy(dense, **prune, **{"prune.method": "gradual"})
    gradual.prune.update(start=start, end=end, every=every)
    out.append(Arm(f"gradual-{p}", finetune(gradual, dense_steps + ft, dense.optim.warmup_steps)))
    d, _ = small_dense(dense, nonzeros(dense, s))
    small = copy(dense, **{"model.d_model": d, "model.d_ff": 4 * d, "init_from": ""})
    out.append(Arm(f"small-dense-{p}", finetune(small, dense_steps + ft, dense.optim.warmup_steps)))
  return out


def report(res) -> Report:
  key = loss_key(res, "dense")
  n_dense = _count(model_config(res.rows["dense"][0]["config"]))
  rows = [["0 (dense)", f"{n_dense:,}", res.fmt("dense", key), "", "", "", ""]]
  nnz = {}
  for s in SPARSITIES:
    p = _pct(s)
    small_cfg = model_config(res.rows[f"small-dense-{p}"][0]["config"])
    n_sparse = res.rows[f"gradual-{p}"][0]["row"]
    nnz[p] = round((1 - n_sparse["sparsity_all"]) * n_sparse["float32_bytes"] / 4)
    rows.append(
      [
        f"{s:g}",
        f"{nnz[p]:,}",
        res.fmt(f"oneshot-{p}", key),
        res.fmt(f"oneshot-ft-{p}", key),
        res.fmt(f"gradual-{p}", key),
        res.fmt(f"small-dense-{p}", key),
        f"d_model {small_cfg.d_model}: {_count(small_cfg):,}",
      ]
    )
  checks = [
    res.less("oneshot-ft-90", "oneshot-90", key, "90%: one-shot + fine-tune beats one-shot alone"),
    res.less(
      "gradual-90", "oneshot-ft-90", key, "90%: gradual beats (or matches) one-shot + fine-tune"
    ),
  ]
  checks += [
    res.less(
      f"gradual-{_pct(s)}",
      f"small-dense-{_pct(s)}",
      key,
      f"{_pct(s)}%: large-sparse beats small-dense at equal non-zeros",
    )
    for s in SPARSITIES
  ]
  gaps = {
    p: res.mean_std(f"small-dense-{p}", key)[0] - res.mean_std(f"gradual-{p}", key)[0] for p in nnz
  }
  lo, hi = _pct(SPARSITIES[0]), _pct(SPARSITIES[-1])
  checks.append(
    Check(
      "the large-sparse advantage widens with compression",
      bool(gaps[hi] > gaps[lo]),
      "small-dense minus large-sparse: " + ", ".join(f"{p}%: {g:+.4f}" for p, g in gaps.items()),
    )
  )

  def plot(fig, res):
    ax = fig.add_subplot(1, 2, 1)
    xs = list(SPARSITIES)
    for name, label in (
      ("oneshot", "one-shot"),
      ("oneshot-ft", "one-shot + fine-tune"),
      ("gradual", "gradual (cubic)"),
    ):
      stats = [res.mean_std(f"{name}-{_pct(s)}", key) for s in xs]
      ax.errorbar(
        xs, [m for m, _ in stats], [e for _, e in stats], marker="o", capsize=3, label=label
      )
    ax.axhline(
      res.mean_std("dense", key)[0], color="gray", ls="--", label="dense (before fine-tuning)"
    )
    ax.set_xlabel("sparsity of the kernels")
    ax.set_ylabel(f"{key} (nats/token)")
    ax.set_title("Gradual vs one-shot")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    n = [nnz[_pct(s)] for s in xs]
    for name, label in (("gradual", "large-sparse (gradual)"), ("small-dense", "small-dense")):
      stats = [res.mean_std(f"{name}-{_pct(s)}", key) for s in xs]
      ax.errorbar(
        n, [m for m, _ in stats], [e for _, e in stats], marker="o", capsize=3, label=label
      )
    ax.set_xscale("log")
    ax.set_xlabel("non-zero parameters")
    ax.set_ylabel(f"{key} (nats/token)")
    ax.set_title("Equal non-zeros")
    ax.legend()

  cols = [
    "sparsity",
    "non-zeros",
    "one-shot",
    "one-shot + fine-tune",
    "gradual",
    "small dense",
    "small dense: parameters",
  ]
  return Report(cols, rows, checks, plot)
