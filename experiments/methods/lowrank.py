"""Low-rank factorization from config (`config.lowrank`): the selected kernels of a trained
model replaced by their truncated-SVD factors (rank fixed, by kept spectral energy, or by a
global parameter budget), then fine-tuned like any model; composes with QAT (both factors
quantized) and distillation (the dense model as the teacher).

    --config.init_from=/runs/dense --config.lowrank.method=svd --config.lowrank.energy=0.9
    --config.init_from=/runs/dense --config.lowrank.method=svd --config.lowrank.budget=0.5
    ... --config.distill.method=kd --config.distill.teacher_dir=/runs/dense   # learn from it

The plan needs the trained weights (a rank by energy or budget depends on their spectra), so
it is made when the experiment is built: the dense kernels are read from `init_from` then.
"""

import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from compress import lowrank
from compress.tree import nested_items
import models
import parallel
from experiments.methods import Method, register


@register
class LowRank(Method):
  name = "lowrank"
  order = 15  # after distillation (its teacher), before pruning and quantization

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.lowrank` (method "none": dense kernels)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "svd"
        # kernels (re.search on "layers_0/mlp/wi/kernel"): the blocks' linear layers
        select=r"attn/(query|key|value|out)/kernel$|mlp/(wi|wg|wo)/kernel$",
        rank=0,  # exactly one of rank, energy, budget is set
        energy=0.0,  # per layer, the least rank keeping this fraction of sum(s^2)
        budget=0.0,  # a fraction of the selected kernels' parameters, shared out globally
      )
    )

  def __init__(self, config):
    super().__init__(config)
    c = self.c
    if c.method != "svd":
      raise ValueError(f"lowrank.method={c.method!r}: choose 'none' or 'svd'.")
    init = config.get("init_from") or ""
    if not init and not config.get("pretrain"):
      raise ValueError(
        "lowrank.method='svd' factorizes a trained model: set --config.init_from=WORKDIR."
      )
    if not init and not c.rank:
      raise ValueError(
        "lowrank.energy and lowrank.budget choose ranks from the trained weights when the "
        "experiment is built, before `pretrain` runs: set init_from to a finished run, or "
        "use lowrank.rank."
      )
    if init.startswith("hf:"):
      raise ValueError(
        f"init_from={init!r}: lowrank reads the dense kernels from a run's checkpoint; "
        "fine-tune or convert the HF model in a run first (init_from=hf:... there)."
      )
    for other in ("lora", "prune"):
      if config.get(other, {}).get("method", "none") != "none":
        raise ValueError(
          f"lowrank.method='svd' with {other}.method set: not supported in one run; "
          f"factorize first (one run), then {other} (init_from it)."
        )

  def bind(self, mc, workdir, build_model):
    """Plans the ranks (every bad value raises here, before any compiling): a fixed rank from
    the shapes alone, energy and budget from the trained kernels of init_from."""
    c = self.c
    s = models.structure(mc)
    self.mc, self.stacked = mc, (f"^{s.layers}/" if mc.scan_layers else None)
    # energy / budget: the trained kernels, kept for `prepare` (one read of the checkpoint)
    source = "" if c.rank else self.config.init_from
    params = self._dense_params(source)
    self.read = (source, params) if source else None
    self.choices = lowrank.plan(
      params,
      c.select,
      rank=c.rank,
      energy=c.energy,
      budget=c.budget,
      n_in=s.inputs,
      stacked=self.stacked,
    )
    (p0, p1), (f0, f1) = lowrank.count_params(self.choices), lowrank.flops_per_token(self.choices)
    self.fields = dict(
      factorized_params=p1, dense_params=p0, factorized_flops_per_token=f1, dense_flops_per_token=f0
    )
    logging.info(
      "lowrank: %d kernels, %s -> %s params, ranks %s",
      len(self.choices),
      f"{p0:,}",
      f"{p1:,}",
      {k: v.rank for k, v in self.choices.items()},
    )
    return mc

  def _dense_params(self, init_from):
    """The dense model's params: zeros (shapes only) without `init_from`, else read from its
    latest checkpoint."""
    dense = models.build(self.mc)
    ids = jnp.zeros((1, min(8, self.mc.max_len)), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(dense.init(jax.random.PRNGKey(0), ids)))
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract["params"])
    if not init_from:
      return zeros
    return parallel.load_params(os.path.join(init_from, "checkpoints"), zeros)

  def wrap_hooks(self, hooks, mode="train"):
    ranks = lowrank.layer_ranks(self.choices)
    return {**hooks, "dot_general_cls": lowrank.FactorizedDot(ranks, hooks.get("dot_general_cls"))}

  def prepare(self, run, state, fresh):
    """A fresh run: the factors in place of their init (the other leaves were read from
    init_from by the loop)."""
    read, self.read = self.read, None
    if not fresh:
      return state
    c = self.c
    dense = read[1] if read and read[0] == run.init_from else self._dense_params(run.init_from)
    if c.rank:  # the same ranks, now with the trained spectra (the energy each keeps)
      self.choices = lowrank.plan(
        dense, c.select, rank=c.rank, n_in=models.structure(self.mc).inputs, stacked=self.stacked
      )
    factored = lowrank.factorize_tree(dense, self.choices)
    factors = {
      "/".join(keys): leaf
      for keys, leaf in nested_items(factored)
      if keys[-1].startswith("kernel_")
    }
    energy = {k: round(v.energy_kept, 4) for k, v in self.choices.items()}
    logging.info("lowrank: the spectral energy each factorized kernel keeps: %s", energy)
    self.fields["energy_kept"] = sum(energy.values()) / len(energy)

    def put(path, leaf):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      if name in factors:
        return jax.device_put(factors[name].astype(leaf.dtype), leaf.sharding)
      return leaf

    state["params"] = jax.tree_util.tree_map_with_path(put, state["params"])
    return state

  def eval_fields(self, run, state):
    return self.fields

  def flops(self, batch, seq_len):
    """Forward and backward of the factors instead of the dense kernels (negative: fewer)."""
    return (
      3
      * batch
      * seq_len
      * (self.fields["factorized_flops_per_token"] - self.fields["dense_flops_per_token"])
    )
