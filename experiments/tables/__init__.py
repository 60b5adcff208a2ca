"""The tables `python -m experiments.reproduce TABLE` reproduces, one module each.

A table module has `TITLE`, `PAPER` (the published rows, markdown), `arms(scale) -> [Arm]` and
`report(results) -> Report`. The helpers below build the arms' run configs from
experiments/configs; an arm changes only what its row is about.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from experiments.configs import common, lm_tfds
from experiments.configs import lm as lm_config


@dataclasses.dataclass
class Arm:
  """One row's run: `config` trained once per seed (once in all when `shared`).

  `init_from` / `teacher` / `reference` name arms of the same table whose run (same seed;
  seed 0 when that arm is shared) initializes this one, is its distillation teacher, or is the
  model its export's greedy continuations are compared with (`eval.agreement_with`). `run`
  replaces the train loop for measurements that are not a training run (the parallel table's
  benchmarks).
  """

  name: str
  config: ml_collections.ConfigDict
  init_from: str = ""
  teacher: str = ""
  reference: str = ""
  shared: bool = False
  run: str = ""  # "module:function"(config, workdir) -> row; "" -> train.train_and_evaluate


@dataclasses.dataclass
class Check:
  claim: str
  holds: bool
  detail: str = ""
  beyond_noise: bool | None = None  # None: not a comparison over seeds

  @property
  def mark(self) -> str:
    if not self.holds:
      return "no"
    return "yes" if self.beyond_noise in (True, None) else "yes, within noise"


class Results:
  """The finished runs of a table: `res.values(arm, key)` over seeds, `res.mean_std(...)`."""

  def __init__(self, rows: dict[str, list[dict]]):
    self.rows = rows  # arm -> [result.json of each seed, in seed order]

  def values(self, arm: str, key: str) -> np.ndarray:
    return np.array([r["row"][key] for r in self.rows[arm]], np.float64)

  def mean_std(self, arm: str, key: str) -> tuple[float, float]:
    v = self.values(arm, key)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

  def fmt(self, arm: str, key: str, digits: int = 3) -> str:
    mean, std = self.mean_std(arm, key)
    if len(self.rows[arm]) == 1:
      return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"

  def less(self, a: str, b: str, key: str, claim: str) -> Check:
    """Claim: arm `a`'s `key` < arm `b`'s, paired over seeds."""
    return paired_less(self.values(a, key), self.values(b, key), claim)


def paired_less(va: np.ndarray, vb: np.ndarray, claim: str) -> Check:
  """Claim: va < vb (per-seed values, paired by seed), with a one-sided paired t-test."""
  n = min(va.size, vb.size)
  d = vb[:n] - va[:n]
  holds = bool(d.mean() > 0)
  if n < 2:
    return Check(claim, holds, f"{va.mean():.4f} vs {vb.mean():.4f} (one seed)", False)
  se = d.std(ddof=1) / math.sqrt(n)
  t = d.mean() / se if se > 0 else math.copysign(math.inf, d.mean())
  detail = f"{va.mean():.4f} vs {vb.mean():.4f}; paired difference {d.mean():.4f}, t={t:.1f}"
  return Check(claim, holds, detail, bool(t > _t95(n - 1)))


def _t95(df: int) -> float:
  """One-sided 95% quantile of Student's t with `df` degrees of freedom."""
  table = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860}
  return table.get(df, 1.833 if df < 10 else 1.7)


@dataclasses.dataclass
class Report:
  """What a table's `report(results)` returns: the markdown table, the checks, a plot."""

  columns: list[str]
  rows: list[list[str]]
  checks: list[Check]
  plot: object  # fn(matplotlib Figure) -> None
  notes: str = ""


def lm(scale: str, steps: int) -> ml_collections.ConfigDict:
  """The decoder LM run of `scale`, `steps` long, evaluated and checkpointed at its end only.

  tiny / small / test: the tiny LM on the synthetic source (experiments/configs/lm.py:tiny);
  test also evaluates on a single batch. full: GPT-2 small on lm1b (lm_tfds.py:lm1b).
  """
  if scale == "full":
    c = lm_tfds.get_config("lm1b")
  else:
    c = lm_config.get_config("tiny")
    if scale == "test":
      c.eval.update(steps=1, batch_size=16)
  return finetune(c, steps, warmup=c.optim.warmup_steps)


def dense_lm(scale: str, steps: int) -> ml_collections.ConfigDict:
  """The dense model a compression table starts from: at full scale GPT-2 as released
  (`hf:gpt2`, evaluated on lm1b without training, lm_tfds.py:lm1b,hf); else lm(scale, steps)."""
  if scale == "full":
    return finetune(lm_tfds.get_config("lm1b,hf"), 0)
  return lm(scale, steps)


def finetune(c: ml_collections.ConfigDict, steps: int, warmup: int | None = None):
  """`c` set to train `steps` (the schedule spans them; warmup default: a tenth)."""
  c.train.update(steps=steps, checkpoint_every=max(steps, 1), keep_checkpoints=1)
  c.train.log_every = max(1, min(c.train.log_every, steps))
  c.eval.every = max(steps, 1)
  c.optim.warmup_steps = min(steps // 10 if warmup is None else warmup, max(steps - 1, 0))
  return c


def copy(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  """A copy of `c` with `changes` ("section.field": value)."""
  out = ml_collections.ConfigDict(c.to_dict())
  for key, value in changes.items():
    *path, field = key.split(".")
    node = out
    for p in path:
      node = node[p]
    node[field] = value
  return out


def model_config(config):
  """The ModelConfig a run config (a ConfigDict or its dict) describes."""
  import models

  m = dict(config["model"])
  base = models.get_preset(m.pop("preset"))
  fields = {f.name for f in dataclasses.fields(base)}
  return dataclasses.replace(base, **{k: v for k, v in m.items() if k in fields})


def agreement(res, arm: str) -> str:
  """The mean ± std of an arm's greedy agreement with its reference (the export's
  `*_greedy_agreement`; the integer one where a run has both), "" when its runs have none."""
  row = res.rows[arm][0]["row"]
  key = next((k for k in ("serve_greedy_agreement", "sparse_greedy_agreement") if k in row), None)
  if key is None or not all(key in r["row"] for r in res.rows[arm]):
    return ""
  return res.fmt(arm, key, 2)


def loss_key(res, arm: str) -> str:
  """ "excess_loss" where the data's optimum is known (the synthetic source), else "eval_loss"."""
  return "excess_loss" if "excess_loss" in res.rows[arm][0]["row"] else "eval_loss"


__all__ = [
  "agreement",
  "Arm",
  "Check",
  "paired_less",
  "Report",
  "Results",
  "common",
  "copy",
  "finetune",
  "lm",
  "loss_key",
  "model_config",
]
