"""LoRA and QLoRA from config (`config.lora`): adapters on the selected layers through the
dot_general hook (on top of quantization's, when `config.quant` is on), only the adapters
train, QLoRA's frozen NF4 base, the merged model's eval and the PEFT adapter files at the end.

    --config.init_from=hf:gpt2 --config.lora.method=lora --config.lora.rank=8
    --config.init_from=/runs/base --config.lora.method=lora --config.lora.base=nf4   # QLoRA
    --config.lora.method=lora --config.quant.method=qat --config.quant.bits=4        # int4 QAT base

The base is frozen: no gradient is computed for it, the optimizer state holds the adapters
only (its bytes are in every eval row), and after training the base is bitwise what was
loaded (for `base=nf4|int4`: loaded, then rounded once, as QLoRA stores it).
"""

import os
import re

from absl import logging
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from compress import lora
from compress.tree import disk_bytes, nested_items
import models
from experiments.methods import Method, register

BASES = ("float", "nf4", "int4")


def n_in(path: str, ndim: int) -> int:
  """A kernel's number of input axes (models.structure: attention's out [H, D, E] has two)."""
  return next(n for pattern, n in models.structure().inputs if re.search(pattern, path))


@register
class Lora(Method):
  name = "lora"
  order = 40  # wraps the dot_generals the others made (quantization's)

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.lora` (method "none": no adapters)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "lora"
        rank=8,
        alpha=16.0,  # the adapters' scale is alpha / rank
        dropout=0.0,  # on the adapters' input, in training
        # layers (re.search on "layers_0/attn/query"): every linear layer of the blocks, QLoRA's
        select=r"attn/(query|key|value|out)$|mlp/(wi|wg|wo)$",
        base="float",  # the frozen base: "float" | "nf4" (QLoRA) | "int4", rounded once
        block=64,  # the base's quantization blocks, along each kernel's input
        export=True,  # evaluate the merged model; PEFT adapter files for an HF architecture
      )
    )

  def __init__(self, config):
    super().__init__(config)
    c = self.c
    if c.method != "lora":
      raise ValueError(f"lora.method={c.method!r}: choose 'none' or 'lora'.")
    lora.check(c.rank, c.alpha, c.dropout)
    if c.base not in BASES:
      raise ValueError(f"lora.base={c.base!r}: choose one of {BASES}.")
    if c.base != "float" and (isinstance(c.block, bool) or c.block <= 0):
      raise ValueError(f"lora.block={c.block!r}: a block size is a positive integer (64).")
    if config.get("prune", {}).get("method", "none") != "none":
      raise ValueError(
        "lora.method='lora' with prune.method set: the pruning masks act on the frozen base, "
        "which does not train; prune first (one run), then add adapters (init_from it)."
      )

  def bind(self, mc, workdir, build_model):
    """Checks the selection against the model's layers before anything compiles: a rank
    above a layer's min(in, out), a selector matching no layer, a block size that does not
    divide a selected kernel's input."""
    model = models.build(mc, dot_general_cls=self._factory(None))
    ids = jnp.zeros((1, min(8, mc.max_len)), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))["params"]
    shapes = nn.meta.unbox(shapes)
    adapted = list(lora.adapted_kernels(shapes))
    if not adapted:
      layers = sorted({"/".join(k[:-1]) for k, _ in nested_items(shapes) if k[-1] == "kernel"})
      raise ValueError(
        f"lora.select={self.c.select!r} matched no layer: the layers are {layers[:8]}..."
      )
    if self.c.base != "float":
      for path, w in adapted:
        stacked = mc.scan_layers and path.startswith("layers/")
        shape = w.shape[1:] if stacked else w.shape
        lora.check_block(shape, n_in(path, len(shape)), self.c.block, path)
    self.mc = mc
    return mc

  def _factory(self, inner):
    c = self.c
    return lora.lora_dot(c.select, c.rank, c.alpha, c.dropout, inner=inner)

  def wrap_hooks(self, hooks, mode="train"):
    return {**hooks, "dot_general_cls": self._factory(hooks.get("dot_general_cls"))}

  def trains(self):
    return lora.trains

  def prepare(self, run, state, fresh):
    if not run.loaded and fresh:
      logging.warning("lora: the base is a fresh init, not a trained model: set init_from.")
    stacked = r"^layers/" if self.mc.scan_layers else None
    if fresh and self.c.base == "nf4" and run.workdir and jax.process_count() == 1:
      # QLoRA's storage of the frozen base: 4-bit codes and double-quantized scales, made from
      # the loaded weights once (the base never changes); the export reads it back.
      lora.save_nf4_base(self._nf4_dir(run), state["params"], self.c.block, n_in, stacked)
    if fresh and self.c.base != "float":
      rounded = jax.jit(
        lambda p: lora.quantize_base(p, self.c.base, self.c.block, n_in, stacked),
        out_shardings=run.shardings["params"],
      )
      state["params"] = rounded(state["params"])
      logging.info("lora: the frozen base rounded to %s (blocks of %d)", self.c.base, self.c.block)
    adapters = lora.adapters(state["params"])
    n_all = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_train = sum(x.size for x in jax.tree.leaves(adapters))
    self.fields = {
      "trainable_params": n_train,
      "trainable_fraction": n_train / n_all,
      "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state["opt"])),
    }
    logging.info("lora: %s", self.fields)
    return state

  def eval_fields(self, run, state):
    return self.fields

  def export(self, run, state):
    """The merged model (W + alpha / r A B, adapters folded in) evaluated; for a model with
    an HF architecture the adapters as PEFT files under <workdir>/adapter."""
    if not self.c.export:
      return {}
    exp, params = run.exp, state["params"]
    plain = models.build(exp.model_config)
    merged = jax.jit(lambda p: lora.merge(p, self.c.alpha))(params)
    row = {f"merged_{k}": v for k, v in run.evaluate_model(plain, {"params": merged}).items()}
    if self.c.base == "nf4" and os.path.isdir(self._nf4_dir(run)):
      row.update(self._served_from_nf4(run, params, state.get("collections", {})))
    if jax.process_index() == 0 and _peft_family(exp.model_config):
      from models import peft

      directory = os.path.join(run.workdir, "adapter")
      adapters = jax.tree.map(jax.device_get, lora.adapters(params))
      peft.save_adapter(
        exp.model_config,
        adapters,
        directory,
        rank=self.c.rank,
        alpha=self.c.alpha,
        dropout=self.c.dropout,
      )
      row["adapter_bytes"] = sum(
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
      )
      logging.info("lora: PEFT adapter written to %s", directory)
    return row

  def _nf4_dir(self, run):
    return os.path.join(run.workdir, "base_nf4")

  def _served_from_nf4(self, run, params, collections) -> dict:
    """The adapted model on the base read back from its NF4 storage (equal to the base it
    trained on), evaluated; the storage's size against the float32 kernels'."""
    directory = self._nf4_dir(run)
    host = jax.tree.map(jax.device_get, params)
    loaded = lora.load_nf4_base(directory, host)
    kernels = [k for k, _ in lora.adapted_kernels(host)]
    flat_a = traverse_util.flatten_dict(loaded, sep="/")
    flat_b = traverse_util.flatten_dict(host, sep="/")
    if any(not np.array_equal(flat_a[k], flat_b[k]) for k in kernels):
      raise ValueError(f"{directory} does not hold the base this run trained on.")
    row = {f"nf4_{k}": v for k, v in run.evaluate(loaded, collections).items()}
    row["nf4_base_bytes"] = disk_bytes(directory)
    row["nf4_base_float32_bytes"] = 4 * sum(flat_b[k].size for k in kernels)
    return row


def _peft_family(mc) -> bool:
  try:
    return models.hf.family_of(mc) in ("gpt2", "llama", "bert")
  except ValueError:
    return False
