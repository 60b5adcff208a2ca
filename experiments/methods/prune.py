"""Pruning from config (`config.prune`): the pruning transform around the optimizer (its
masks live in the optimizer state), a one-shot prune of a trained model, the sparsity of
every eval row, and the sparse export.

    --config.prune.method=gradual --config.prune.sparsity=0.9 --config.prune.end=400
    --config.prune.method=oneshot --config.prune.granularity=2:4
    --config.prune.method=oneshot --config.train.steps=0 --config.init_from=/runs/dense
"""

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from compress import prune
import models
import parallel
from experiments.methods import Method, register, export_row, greedy_agreement

METHODS = ("none", "gradual", "oneshot", "periodic")


@register
class Prune(Method):
  name = "prune"
  order = 20

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.prune` (method "none": no pruning)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "gradual" (Zhu & Gupta cubic) | "oneshot" | "periodic"
        sparsity=0.9,  # final fraction of the selected weights pruned (N:M: implied, ignored)
        granularity="unstructured",  # "unstructured" | "N:M" ("2:4") | "RxC" | "heads" | "neurons"
        distribution="uniform",  # "uniform" | "erk" | "global"
        score="magnitude",  # "magnitude" | "random" | "saliency" | "movement"
        select=r"kernel$",  # regex on the parameter path; rank >= 2 only
        exclude="",
        start=0,  # gradual: t0; oneshot: the step; periodic: first update
        end=0,  # gradual: the step the final sparsity is reached (t0 + n * dt)
        every=100,  # gradual / periodic: dt
        calib_batches=8,  # oneshot, train.steps=0, a gradient score: train batches averaged
        export=True,  # write <workdir>/sparse (bitmask + values, N:M values + indices)
      )
    )

  def __init__(self, config):
    super().__init__(config)
    p = self.c
    if p.method not in METHODS:
      raise ValueError(f"prune.method={p.method!r}: choose one of {METHODS}.")
    s = self.structure = models.structure()  # where heads, neurons and layers are
    self.granularity = prune.parse_granularity(
      p.granularity, heads=s.heads, neurons=s.neurons, nm_axes=s.contracting
    )
    if p.method == "gradual":
      self.schedule = prune.cubic(p.start, p.end, p.every)
    elif p.method == "oneshot":
      self.schedule = prune.one_shot(p.start)
    else:
      self.schedule = prune.periodic(p.every, p.start, p.end or None)
    steps = config.train.steps
    if not steps:
      if p.method != "oneshot":
        raise ValueError(
          f"prune.method={p.method!r} prunes during training but train.steps=0: use "
          "prune.method='oneshot' to prune a trained model (init_from) without training."
        )
      if not (config.get("init_from") or config.get("pretrain")):
        raise ValueError("Pruning without training needs a trained model: set --config.init_from.")
      if self.needs_grads and p.calib_batches < 1:
        raise ValueError(
          f"prune.score={p.score!r} reads gradients; without training they come from "
          f"prune.calib_batches={p.calib_batches} train batches: set it to at least 1."
        )
    last = self.schedule.end if self.schedule.end is not None else self.schedule.start
    if steps and last >= steps:
      raise ValueError(
        f"prune: the schedule's last mask update (step {last}) is not before train.steps="
        f"{steps}; end it earlier (prune.end / prune.start) or train longer."
      )
    prune.pruning(self.sparsity, self.schedule, optax.identity(), **self.kwargs)  # its checks

  @property
  def sparsity(self):
    return None if isinstance(self.granularity, prune.NM) else self.c.sparsity

  @property
  def kwargs(self) -> dict:
    p = self.c
    return dict(
      granularity=self.granularity,
      distribution=p.distribution,
      select=p.select,
      exclude=p.exclude or None,
      score=p.score,
      seed=self.config.seed,
      stacked=f"^{self.structure.layers}/",  # scanned: axis 0 stacks the layers
    )

  @property
  def needs_grads(self) -> bool:
    score = prune.SCORES.get(self.c.score)
    return score is not None and score.needs_grads

  def wrap_optimizer(self, tx):
    """Wraps the whole optimizer: clipping and Adam see the masked gradients."""
    return prune.pruning(self.sparsity, self.schedule, tx, **self.kwargs)

  def prepare(self, run, state, fresh):
    if fresh and not self.config.train.steps:  # one-shot, no training: prune now
      state["params"] = self.prune_now(run, state)
    return state

  def prune_now(self, run, state: dict) -> dict:
    """`state`'s params pruned at the final sparsity, now; a gradient score (saliency,
    movement) reads the mean gradient of the task loss over `prune.calib_batches` batches."""
    exp, shardings = run.exp, run.shardings
    p_shard, c_shard = shardings["params"], shardings.get("collections", {})
    grads = None
    if self.needs_grads:

      def grad(p, c, b):
        def loss(p):
          total, sums = exp.task.loss(exp.model, {"params": p, **c}, b, None, False)
          return total, sums["weight"]

        return jax.grad(loss, has_aux=True)(p)

      jitted = parallel.jit_with_mesh(
        grad,
        exp.mesh,
        exp.rules,
        in_shardings=(p_shard, c_shard, exp.batch_sharding),
        out_shardings=(p_shard, None),
      )
      total, weight = None, 0.0
      for i in range(self.c.calib_batches):
        g, w = jitted(state["params"], state.get("collections", {}), exp.batch(i))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        weight += float(w)
      grads = jax.tree.map(lambda g: g / max(weight, 1.0), total)
      logging.info("prune.score=%s: gradients of %d batches", self.c.score, self.c.calib_batches)
    return parallel.jit_with_mesh(
      lambda p, g: prune.one_shot_prune(p, self.sparsity, g, **self.kwargs),
      exp.mesh,
      exp.rules,
      in_shardings=(p_shard, p_shard if grads is not None else None),
      out_shardings=p_shard,
    )(state["params"], grads)

  def eval_fields(self, run, state):
    rep = prune.report(state["params"], self.masks(state))
    return {"sparsity": rep["selected"]["sparsity"]}

  @staticmethod
  def masks(state: dict):
    """The model's masks from the optimizer state (None when it holds none)."""
    masks = prune.masks_of(state["opt"])
    if not masks:
      return None
    return masks[0]["params"] if "extra" in state else masks[0]

  def export(self, run, state):
    """Saves the pruned params in sparse form to <workdir>/sparse, the per-layer report to
    <workdir>/sparsity.json, reloads and evaluates the loaded params."""
    if not self.c.export:
      return {}
    if jax.process_count() > 1:
      logging.info("prune.export is single-process for now: skipped.")
      return {}
    params = state["params"]
    rep = prune.report(params, self.masks(state))
    logging.info("Sparsity:\n%s", prune.format_report(rep))
    with open(os.path.join(run.workdir, "sparsity.json"), "w") as f:
      json.dump(rep, f, indent=1)
    directory = os.path.join(run.workdir, "sparse")
    g = self.granularity
    prune.save(directory, params, nm=g if isinstance(g, prune.NM) else None)
    loaded, collections = prune.load(directory), state.get("collections", {})
    row = run.evaluate(loaded, collections)
    row.update(greedy_agreement(run, run.exp.model, {"params": loaded, **collections}, params))
    sparsity = dict(sparsity=rep["selected"]["sparsity"], sparsity_all=rep["all"]["sparsity"])
    return export_row(
      "sparse", row, directory, params, "sparse_bytes", prune.disk_bytes, **sparsity
    )
