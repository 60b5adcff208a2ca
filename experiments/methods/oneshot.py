"""Post-training compression with calibration (`config.oneshot`): GPTQ, AWQ, SmoothQuant,
SparseGPT and Wanda, one layer (block) at a time, on a trained model.

    --config.init_from=/runs/dense --config.train.steps=0 --config.oneshot.method=gptq
        --config.quant.method=ptq --config.quant.bits=4 --config.quant.act_bits=0
        --config.quant.calibrator=stored
    --config.init_from=/runs/dense --config.train.steps=0 --config.oneshot.method=sparsegpt
        --config.prune.method=oneshot --config.prune.granularity=2:4 --config.prune.select=^layers

The targets come from the sibling sections, so the baselines are the plain methods and every
result is evaluated and exported by them: bits, tile and the weight grid from `config.quant`
(round-to-nearest is quant.method=ptq alone), the sparsity or N:M pattern from `config.prune`
(magnitude is prune.method=oneshot alone). Pruning keeps the masks during any fine-tuning that
follows (train.steps > 0); GPTQ's grids are stored (quant.calibrator="stored") so QAT, the
integer export and serving use exactly the scales GPTQ quantized to.

The pass (`compress_layers`), as in the papers' reference code: the calibration batches'
residual stream entering the first layer; then for each layer: run it with `StatsDot` on every
batch, summing each linear layer's input statistics (compress/oneshot/stats.py; the batch is
sharded over the data axes and XLA reduces the sums across devices), compress the layer's
kernels from them, and run the compressed layer to make the next layer's inputs. Only one
layer's statistics exist at a time; `block_stats_bytes` says how large they are. Inside a
layer every kernel sees its inputs under the dense layer (the reference's default, not its
`true-sequential` option).

AWQ and SmoothQuant move a per-input-channel scale from the norm before q/k/v (and before the
MLP's input kernels) into those kernels (`models.structure().feeds`): exact in float, pre-LN
decoders only. AWQ's search measures the kernels' own output error (from the Hessian), not the
whole attention block's; its weight clipping search is not done.
"""

import dataclasses
import functools
import math
import re

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from compress import oneshot, quant
from compress.oneshot.stats import COLLECTION, StatsDot
from compress.quant import quantizers as qz
from compress.tree import nested_items, set_new
import models
from experiments.methods import Method, register

ALGORITHMS = ("none", "gptq", "awq", "smoothquant", "sparsegpt", "wanda")
SIBLING = dict(gptq="quant", awq="quant", smoothquant="quant", sparsegpt="prune", wanda="prune")


def _active(config, name) -> bool:
  return config.get(name, {}).get("method", "none") != "none"


@register
class OneShot(Method):
  name = "oneshot"
  order = 18  # before pruning (its masks are the zeros left here) and quantization

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.oneshot` (method "none": no post-training method)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "gptq" | "awq" | "smoothquant" | "sparsegpt" | "wanda"
        calib_batches=8,  # train batches of calibration data (the papers: 128 x 2048 tokens)
        damp=0.01,  # GPTQ / SparseGPT: damp * mean(diag H) added to H's diagonal
        block=128,  # GPTQ / SparseGPT: lazy-update block of inputs
        act_order=False,  # GPTQ: inputs in order of decreasing H_ii
        alpha=0.5,  # SmoothQuant's migration strength
        grid=20,  # AWQ: scale exponents 0, 1/grid, ..., (grid - 1)/grid
      )
    )

  def __init__(self, config):
    super().__init__(config)
    c = self.c
    if c.method not in ALGORITHMS:
      raise ValueError(f"oneshot.method={c.method!r}: choose one of {ALGORITHMS}.")
    if c.calib_batches < 1:
      raise ValueError(
        f"oneshot.calib_batches={c.calib_batches}: oneshot.method={c.method!r} reads statistics "
        "of calibration data; set it to at least 1 (the papers use 128 sequences)."
      )
    if not (config.get("init_from") or config.get("pretrain")):
      raise ValueError(
        f"oneshot.method={c.method!r} compresses a trained model: set --config.init_from=WORKDIR."
      )
    for key, ok, fix in (
      ("damp", c.damp >= 0, "a fraction of mean(diag H), e.g. 0.01"),
      ("block", c.block >= 1, "a positive number of inputs, e.g. 128"),
      ("alpha", 0 <= c.alpha <= 1, "a value in [0, 1], e.g. 0.5"),
      ("grid", c.grid >= 1, "a positive number of scale exponents, e.g. 20"),
    ):
      if not ok:
        raise ValueError(f"oneshot.{key}={c[key]!r}: use {fix}.")
    for other in ("lora", "lowrank"):
      if _active(config, other):
        raise ValueError(
          f"oneshot.method={c.method!r} with {other}.method set: compress the dense model "
          f"first (one run), then {other} (init_from it)."
        )
    sibling = SIBLING[c.method]
    if not _active(config, sibling):
      raise ValueError(
        f"oneshot.method={c.method!r} takes its target from config.{sibling}: set "
        f"--config.{sibling}.method={'ptq' if sibling == 'quant' else 'oneshot'} and its "
        f"{'bits' if sibling == 'quant' else 'sparsity or granularity'}."
      )
    self.policy = None
    if _active(config, "quant"):
      self.policy = self._check_quant(config.quant, c.method)
    self.nm, self.sparsity = None, 0.0
    if _active(config, "prune"):
      self._check_prune(config.prune, c.method)

  def _check_quant(self, q, method):
    """The weight grid: symmetric integer (the export has no zero point), stored for GPTQ."""
    if q.get("format", "int") != "int" or q.lsq or not q.symmetric or not q.bits:
      raise ValueError(
        f"oneshot.method={method!r} quantizes to a symmetric integer grid: set quant.format="
        "'int', quant.lsq=False, quant.symmetric=True and quant.bits (2..8)."
      )
    quant.check_bits(q.bits, "quant.bits")
    stored = method in ("gptq", "sparsegpt")
    if stored and q.calibrator != "stored":
      raise ValueError(
        f"oneshot.method={method!r} chooses the weights on grids it keeps: set "
        "--config.quant.calibrator=stored (else the grid would be recomputed from its output)."
      )
    if not stored and q.calibrator == "stored":
      raise ValueError(
        f"quant.calibrator='stored' keeps GPTQ's grids; oneshot.method={method!r} sets none: "
        "use quant.calibrator='absmax'."
      )
    if method == "awq" and q.granularity == "tensor" and not q.tile:
      raise ValueError(
        "oneshot.method='awq' searches per-channel (or tiled) grids: set quant.granularity="
        "'channel' or quant.tile."
      )
    if method == "awq" and q.act_bits:
      raise ValueError("oneshot.method='awq' is weight-only quantization: set quant.act_bits=0.")
    if method == "smoothquant" and not q.act_bits:
      raise ValueError(
        "oneshot.method='smoothquant' makes activations easier to quantize: set quant.act_bits "
        "(8 for W8A8)."
      )
    from experiments.methods.quant import policy_of

    return policy_of(self.config)

  def _check_prune(self, p, method):
    if method not in ("sparsegpt", "wanda"):
      raise ValueError(
        f"oneshot.method={method!r} with prune.method set: prune with sparsegpt or wanda."
      )
    if p.method != "oneshot" or p.distribution != "uniform" or p.score != "magnitude":
      raise ValueError(
        f"oneshot.method={method!r} leaves its zeros for prune to keep: set prune.method="
        "'oneshot', prune.distribution='uniform', prune.score='magnitude'."
      )
    if p.granularity == "unstructured":
      self.sparsity = p.sparsity
      if not 0 < p.sparsity < 1:
        raise ValueError(f"prune.sparsity={p.sparsity}: a fraction in (0, 1).")
      return
    m = re.fullmatch(r"(\d+):(\d+)", p.granularity)
    if m is None:
      raise ValueError(
        f"prune.granularity={p.granularity!r}: oneshot.method={method!r} prunes 'unstructured' "
        "or 'N:M' (e.g. '2:4')."
      )
    n, m = int(m.group(1)), int(m.group(2))
    if not 0 < n < m:
      raise ValueError(f"prune.granularity={p.granularity!r}: N:M keeps N of M, 0 < N < M.")
    self.nm = (m - n, m)  # (pruned, of every m)

  def bind(self, mc, workdir, build_model):
    """Checks against the model before anything compiles: pre-LN for the scale-moving
    methods, the tile and N:M group dividing every compressed kernel's input."""
    self.mc = mc
    self.s = dataclasses.replace(models.structure(mc), feeds=models.feeds(mc))
    if self.c.method in ("awq", "smoothquant") and mc.kind != "decoder":
      raise ValueError(
        f"oneshot.method={self.c.method!r} moves scales out of the norm before each layer's "
        "kernels, which only a pre-LN decoder has (the encoder's post-LN norm also feeds the "
        "residual): use gptq for the encoder."
      )
    layer = _block_shapes(mc)
    tile = self.config.quant.tile if self.policy is not None else 0
    for path, shape in layer.items():
      if not self._selected(f"{self.s.layers}_0/{path}"):
        continue
      n_in = _n_in(self.s, path)
      if tile and shape[n_in - 1] % tile:
        raise ValueError(
          f"quant.tile={tile} does not divide {path}'s input axis of {shape[n_in - 1]}: "
          f"choose a group size that divides it."
        )
      if self.nm and shape[n_in - 1] % self.nm[1]:
        raise ValueError(
          f"prune.granularity: M={self.nm[1]} does not divide {path}'s input axis of "
          f"{shape[n_in - 1]}: choose an M that divides it."
        )
    self.stats_bytes = block_stats_bytes(mc)
    return mc

  def _selected(self, path: str) -> bool:
    """Whether the sibling method compresses kernel `path` ("layers_0/attn/query/kernel")."""
    if not re.search(self.s.weights, path):
      return False
    if self.policy is not None:
      layer = path.rsplit("/", 1)[0]
      rule = self.policy.match(layer)[1]
      if rule is None or rule.bits is None:
        return False
    if _active(self.config, "prune"):
      p = self.config.prune
      if not re.search(p.select, path) or (p.exclude and re.search(p.exclude, path)):
        return False
    return True

  def prepare(self, run, state, fresh):
    if not fresh:  # restored: the compressed weights are in the checkpoint
      return state
    exp = run.exp
    collections = state.get("collections", {})
    params, quant_c, self.fields = compress_layers(
      self, exp, state["params"], collections.get("quant")
    )
    state["params"] = jax.tree.map(
      lambda x, old: jax.device_put(x, old.sharding), params, state["params"]
    )
    if quant_c is not None:
      collections = {
        **collections,
        "quant": jax.tree.map(
          lambda x, old: jax.device_put(x, old.sharding), quant_c, collections["quant"]
        ),
      }
      state["collections"] = collections
    return state

  def eval_fields(self, run, state):
    return getattr(self, "fields", {})


def _n_in(s, path: str) -> int:
  return next(n for pattern, n in s.inputs if re.search(pattern, path))


def _block_shapes(mc) -> dict:
  """{"attn/query/kernel": shape, ...} of one layer, from shapes only."""
  p = jax.eval_shape(lambda: nn.meta.unbox(_block_init(mc)))
  return {"/".join(k): v.shape for k, v in nested_items(p["params"])}


def _block_init(mc, dot_general_cls=None):
  x = jnp.zeros((1, 1, mc.d_model), mc.compute_dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  return models.Block(mc, dot_general_cls).init(jax.random.key(0), x, None, pos, True, None)


def block_stats_bytes(mc) -> int:
  """Bytes of one layer's calibration statistics (the most the pass holds at a time)."""
  stats = jax.eval_shape(lambda: _block_init(mc, StatsDot)[COLLECTION])
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(stats))


def _layer_get(params, s, i, scanned):
  if scanned:
    return jax.tree.map(lambda x: x[i], params[s.layers])
  return params[f"{s.layers}_{i}"]


def _layer_set(params, s, i, scanned, new):
  if scanned:
    return {**params, s.layers: jax.tree.map(lambda a, b: a.at[i].set(b), params[s.layers], new)}
  return {**params, f"{s.layers}_{i}": new}


def compress_layers(m: OneShot, exp, params, quant_c):
  """The one-shot pass over the layers (module docstring): (params, the "quant" collection
  with GPTQ's stored scales or None, eval fields)."""
  mc, s, c = m.mc, m.s, m.c
  scanned, mesh, rules = mc.scan_layers, exp.mesh, exp.rules
  float_model = models.build(mc)

  def in_mesh(fn):
    jitted = jax.jit(fn)

    def run(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted(*args)

    return run

  batches = [exp.batch(i) for i in range(c.calib_batches)]
  masks = [exp.inputs(b).get("attention_mask") for b in batches]
  embed = in_mesh(
    lambda p, b: float_model.apply({"params": p}, b["inputs"], layers_input=True, **exp.inputs(b))
  )
  xs = [embed(params, b) for b in batches]
  positions = jnp.broadcast_to(jnp.arange(xs[0].shape[1]), xs[0].shape[:2])
  stats_block, plain_block = models.Block(mc, StatsDot), models.Block(mc)

  @in_mesh
  def add_stats(p, stats, x, mask):
    _, new = stats_block.apply(
      {"params": p, COLLECTION: stats}, x, mask, positions, True, None, mutable=[COLLECTION]
    )
    return new[COLLECTION]

  @in_mesh
  def forward(p, x, mask):
    return plain_block.apply({"params": p}, x, mask, positions, True, None)[0]

  zeros = jax.tree.map(
    jnp.zeros_like, jax.eval_shape(lambda: _block_init(mc, StatsDot))[COLLECTION]
  )
  errors = []
  for i in range(mc.n_layers):
    layer = _layer_get(params, s, i, scanned)
    stats = zeros
    for x, mask in zip(xs, masks):
      stats = add_stats(layer, stats, x, mask)
    layer, scales, errs = compress_layer(m, i, layer, stats)
    errors += errs
    del stats  # one layer's statistics at a time
    params = _layer_set(params, s, i, scanned, layer)
    for path, scale in scales.items():
      quant_c = _put_scale(quant_c, s, i, scanned, path, scale)
    xs = [forward(layer, x, mask) for x, mask in zip(xs, masks)]
    logging.info("oneshot %s: layer %d of %d compressed", c.method, i + 1, mc.n_layers)
  fields = {
    "oneshot_output_error": float(sum(errors) / max(len(errors), 1)),
    "oneshot_calib_tokens": sum(math.prod(b["inputs"].shape) for b in batches),
    "oneshot_stats_bytes": m.stats_bytes,
  }
  logging.info("oneshot %s: %s", c.method, fields)
  stored = c.method in ("gptq", "sparsegpt") and m.policy is not None
  return params, (quant_c if stored else None), fields


def _put_scale(quant_c, s, i, scanned, path, scale):
  """GPTQ's grid into the "quant" collection, where QuantDot (calibrator "stored") reads it."""
  layer_path = path.rsplit("/", 1)[0]
  if scanned:
    keys = (s.layers, *layer_path.split("/"), "QuantDot_0", "w_scale")
    old = _get(quant_c, keys)
    return set_new(quant_c, keys, old.at[i].set(scale.astype(old.dtype)))
  keys = (f"{s.layers}_{i}", *layer_path.split("/"), "QuantDot_0", "w_scale")
  old = _get(quant_c, keys)
  if old.shape != scale.shape:
    raise AssertionError(f"{keys}: scale {scale.shape} vs stored {old.shape}")
  return set_new(quant_c, keys, scale.astype(old.dtype))


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _stats_of(stats, path):
  """The statistics of kernel `path`'s inputs ("attn/query/kernel" -> attn/query/StatsDot_0)."""
  return _get(stats, (*path.split("/")[:-1], "StatsDot_0"))


def grid_of(w, n_in: int, bits: int, tile: int, granularity: str):
  """The absmax grid QuantDot makes for kernel `w` (its `w_scale` layout), and the same as
  (scale [groups, out], group of each flattened input [in]) for the one-shot functions."""
  in_shape, out = w.shape[:n_in], math.prod(w.shape[n_in:])
  k = in_shape[-1]
  if tile:
    wt = qz.tile(w, n_in - 1, tile)
    reduce = tuple(range(n_in - 1)) + (n_in,)
  else:
    wt, reduce = w, tuple(range(n_in))
  if granularity == "tensor":
    reduce = tuple(range(wt.ndim))
  lo, hi = qz.calibrate(wt, reduce, bits=bits, symmetric=True, method="absmax")
  scale = qz.int_grid(lo, hi, bits, True).scale
  n = math.prod(in_shape)
  if tile:
    scale_gxo = jnp.broadcast_to(scale, (k // tile, 1) + w.shape[n_in:]).reshape(k // tile, out)
    group_of = (jnp.arange(n) % k) // tile
  else:
    scale_gxo = jnp.broadcast_to(scale.reshape(-1)[-out:] if scale.size > 1 else scale, (out,))
    scale_gxo, group_of = scale_gxo.reshape(1, out), None
  return scale, scale_gxo, group_of


@functools.cache
def _rtn(shape, n_in, bits, tile, granularity):
  """Round-to-nearest on QuantDot's grid, as a function of a 2D [in, out] view (AWQ's search)."""

  def fn(w2d):
    w = w2d.reshape(shape)
    scale, _, _ = grid_of(w, n_in, bits, tile, granularity)
    wt = qz.tile(w, n_in - 1, tile) if tile else w
    return qz.dequantize(qz.quantize(wt, scale, None, bits, True), scale).reshape(w2d.shape)

  return fn


def compress_layer(m: OneShot, i: int, layer: dict, stats: dict):
  """One layer's kernels compressed from its statistics: (layer, {kernel path: scale to
  store}, relative output errors)."""
  c, s = m.c, m.s
  kernels = {
    "/".join(k): w for k, w in nested_items(layer) if m._selected(f"{s.layers}_{i}/" + "/".join(k))
  }
  if c.method in ("awq", "smoothquant"):
    return _move_scales(m, layer, stats, kernels)
  q = m.config.quant if m.policy is not None else None
  scales, errors = {}, []
  for path, w in kernels.items():
    n_in, st = _n_in(s, path), _stats_of(stats, path)
    h = st["h"]
    oneshot.check_hessian(h, c.damp, f"{s.layers}_{i}/{path}", int(st["tokens"]))
    w2d = w.reshape(math.prod(w.shape[:n_in]), -1)
    args = {}
    if q is not None:
      scale, scale_gxo, group_of = grid_of(w, n_in, q.bits, q.tile, q.granularity)
      args = dict(bits=q.bits, scale_GxO=scale_gxo, group_of_I=group_of)
      scales[path] = scale
    block = min(c.block, w2d.shape[0])
    pn, pm = m.nm or (0, 0)
    if c.method == "gptq":
      new = _jitted("gptq")(
        w2d,
        h,
        args["scale_GxO"],
        q.bits,
        args["group_of_I"],
        damp=c.damp,
        block=block,
        act_order=c.act_order,
      )
    elif c.method == "sparsegpt":
      sparsity = 0.0 if m.nm else m.sparsity
      new, _ = _jitted("sparsegpt")(
        w2d, h, sparsity=sparsity, prune_n=pn, prune_m=pm, damp=c.damp, block=block, **args
      )
    else:  # wanda
      sparsity = 0.0 if m.nm else m.sparsity
      keep = _jitted("wanda")(w2d, jnp.diag(h), sparsity=sparsity, prune_n=pn, prune_m=pm)
      new = jnp.where(keep, w2d, 0.0)
    errors.append(float(oneshot.output_error(w2d, new, h) / oneshot.output_error(w2d, 0 * w2d, h)))
    layer = set_new(layer, tuple(path.split("/")), new.reshape(w.shape).astype(w.dtype))
  return layer, scales, errors


@functools.cache
def _jitted(name: str):
  """The one-shot functions, jitted once each (their settings static)."""
  if name == "gptq":
    return jax.jit(oneshot.gptq, static_argnames=("bits", "damp", "block", "act_order"))
  if name == "sparsegpt":
    static = ("sparsity", "prune_n", "prune_m", "damp", "block", "bits")
    return jax.jit(oneshot.sparsegpt, static_argnames=static)
  if name == "wanda":
    return jax.jit(oneshot.wanda, static_argnames=("sparsity", "prune_n", "prune_m"))
  return jax.jit(oneshot.awq_scales, static_argnames=("quantize", "grid"))


def _move_scales(m: OneShot, layer: dict, stats: dict, kernels: dict):
  """AWQ / SmoothQuant: for each source and the kernels it feeds (`structure().feeds`), a
  per-input-channel scale s; the kernels' rows times s, the source divided by s: a norm's scale
  and bias, or a linear layer's output columns and bias (exact in float). SmoothQuant smooths
  the norms' outputs only, as its reference code does."""
  c, s, q = m.c, m.s, m.config.quant
  errors = []
  for source, pattern in s.feeds:
    is_norm = "kernel" not in _get(layer, source.split("/"))
    group = {p: w for p, w in kernels.items() if re.search(pattern, p)}
    if not group or (c.method == "smoothquant" and not is_norm):
      continue
    st = _stats_of(stats, next(iter(group)))  # they share their input
    n_in = {p: _n_in(s, p) for p in group}
    ws = [w.reshape(math.prod(w.shape[: n_in[p]]), -1) for p, w in group.items()]
    if c.method == "smoothquant":
      scale = oneshot.smoothquant_scales(st["absmax"], oneshot.kernel_absmax(ws), c.alpha)
    else:
      if len(group) == 1:  # its own grid layout (the attention output's tiles span heads)
        (p, w), w_cat = next(iter(group.items())), ws[0]
        rtn = _rtn(w.shape, n_in[p], q.bits, q.tile, q.granularity)
      else:  # [in, out] kernels side by side: per output column grids, as they are apart
        w_cat = jnp.concatenate(ws, axis=1)
        rtn = _rtn(w_cat.shape, 1, q.bits, q.tile, q.granularity)
      mean = st["abssum"] / jnp.maximum(st["tokens"], 1.0)
      scale, errs = _jitted("awq")([w_cat], st["h"], mean, quantize=rtn, grid=c.grid)
      errors.append(float(jnp.min(errs) / oneshot.output_error(w_cat, 0 * w_cat, st["h"])))
    for (p, w), w2d in zip(group.items(), ws):
      layer = set_new(layer, tuple(p.split("/")), (w2d * scale[:, None]).reshape(w.shape))
    for leaf, x in _get(layer, source.split("/")).items():  # norm scale, bias; kernel, bias
      keys = (*source.split("/"), leaf)
      if is_norm or leaf != "kernel":
        new = x / scale.reshape(x.shape)
      else:
        new = (x.reshape(-1, scale.size) / scale).reshape(x.shape)
      layer = set_new(layer, keys, new.astype(x.dtype))
  return layer, {}, errors
