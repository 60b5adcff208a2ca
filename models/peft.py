"""LoRA adapters to and from PEFT's adapter files (adapter_config.json and
adapter_model.safetensors), for GPT-2, Llama (Mistral, Qwen2) and BERT.

    models.peft.save_adapter(cfg, adapters, "/tmp/adapter", rank=8, alpha=16)
    # torch: peft.PeftModel.from_pretrained(<the model models.hf.save_pretrained exports>, dir)
    adapters, rank, alpha = models.peft.load_adapter(cfg, "/tmp/adapter")

Our adapters: `<layer>/lora/a` [*in, r] and `<layer>/lora/b` [r, *out] beside the layer's
kernel [*in, *out], the kernel's update (alpha / r) * tensordot(a, b, 1), r read from a's last
axis (compress.lora's convention). The tree nests as the params do and holds only the `lora`
dicts; scanned layers (`layers/...`, a leading layer axis) or not. Nothing here needs torch.

The mapping is models/hf.py's: an adapted layer's HF module is its kernel's tensor (minus
".weight"), and a LoRA update is a kernel update, so the factors follow the kernel's layout
rule. PEFT's lora_A [r, in] and lora_B [out, r] are torch Linear weights whatever the base
layer (GPT-2's Conv1D [in, out] too: `fan_in_fan_out` only transposes their product), so both
factors take the "linear" rule: A = a flattened to [in, r] and transposed, B = b flattened to
[r, out] and transposed (query [E, H, D], GQA key/value [E, KV, D], out [H, D, E]: the same
head-major flattening as their kernels).

GPT-2's c_attn holds query, key and value side by side: adapters on them (ranks r_q, r_k, r_v)
are written as one c_attn adapter of rank r_q + r_k + r_v, A the A's stacked and B block
diagonal, its `rank_pattern` / `alpha_pattern` entries keeping each part's scale alpha / r. A
c_attn adapter read back is cut where it can be exactly: when the parts' rows of B use
disjoint columns (as written here), each part gets its own columns of A and B; otherwise (one
rank-r A shared by all three, as PEFT trains it) each part gets the whole A and its rows of B,
rank r each: exact, not a low-rank split.

What `save_adapter` writes: `target_modules` names each adapted module by its shortest dotted
suffix that matches no other module under PEFT's matching (the name, or a ".name" suffix), so
they select exactly the adapted modules: ["c_attn", "c_fc", "c_proj"] for all of GPT-2's
layers, BERT's ["intermediate.dense", "key", "output.dense", "query", "value"] (not "dense":
the MLM head has one), ["1.mlp.up_proj"] for Llama's layer 1 up projection alone. Any
selection (some layers, only the MLP) loads as it was, without `layers_to_transform`, which
selects only a product of layers and module names. Adapters whose rank differs from `rank`
get `rank_pattern` entries (same suffix rule, regex-escaped), their scale alpha / their rank.
A layer whose a and b are both all zero carries nothing and is left out (a scanned tree's
zero-filled layers). task_type: "CAUSAL_LM" for decoders, "FEATURE_EXTRACTION" for BERT
(PeftModel.from_pretrained then wraps any Bert* class; its forward passes input_ids and
attention_mask through). The keys follow the class `models.hf.save_pretrained` exports for
cfg.head ("transformer.h.0.attn.c_attn" under GPT2LMHeadModel); reading, a file made on the
bare body class (GPT2Model, LlamaModel, BertModel) is accepted too.

Ranks read back: one rank for the whole tree, as compress.lora's `lora_dot` builds; a file
whose modules differ in rank (`rank_pattern`, or a c_attn cut into unequal parts) is an error
unless `pad=True`, which zero-pads every adapter to the largest rank (exact: the padded
directions add nothing). Per-module scales that differ (alpha_pattern, rsLoRA) are multiplied
into b, so one (rank, alpha) holds for every module.

Not supported (an error naming the config key): DoRA, LoRA biases, modules_to_save,
embedding adapters, layer_replication, target_parameters, trainable tokens; adapters on tied
or absent modules.
"""

import collections
import dataclasses
import json
import math
import os
import re

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from models import hf
from models.config import ModelConfig
from models.hf_files import _Safetensors, _TorchBin, _write_safetensors
from models.transformer import build

CONFIG, WEIGHTS, WEIGHTS_BIN = (
  "adapter_config.json",
  "adapter_model.safetensors",
  "adapter_model.bin",
)
PREFIX = "base_model.model."  # PeftModel's prefix of the wrapped model's names
ADAPTER = "lora"  # the adapters' subtree under each adapted layer
FACTORS = (".lora_A.weight", ".lora_B.weight")
# adapter_config.json keys whose non-default values we cannot represent, and the fix.
REFUSED = {
  "use_dora": (False, "DoRA's magnitude vectors have no place in our adapters"),
  "bias": ("none", "LoRA bias terms have no place in our adapters"),
  "lora_bias": (False, "LoRA bias terms have no place in our adapters"),
  "modules_to_save": (None, "fully trained modules are not adapters: merge them first"),
  "layer_replication": (None, "replicated layers change the model"),
  "target_parameters": (None, "adapters on bare parameters (MoE experts) are not dense layers"),
  "trainable_token_indices": (None, "trainable token embeddings are not adapters"),
  "alora_invocation_tokens": (None, "activated LoRA acts only after its invocation tokens"),
  "use_qalora": (False, "QALoRA pools its inputs: it is not a plain low-rank update"),
}


# ---- the mapping ----------------------------------------------------------------------------


def _unscanned(cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(cfg, scan_layers=False)


def _kernels(cfg: ModelConfig) -> dict:
  """Our layer path (a tuple, unscanned) -> its kernel's shape, from the model's abstract init."""
  ids = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: build(_unscanned(cfg)).init(jax.random.key(0), ids))
  flat = traverse_util.flatten_dict(shapes["params"])
  return {p[:-1]: getattr(v, "value", v).shape for p, v in flat.items() if p[-1] == "kernel"}


def _modules(cfg: ModelConfig, family: str, base: str) -> dict:
  """HF module name -> the kernel Tensors it holds (GPT-2's c_attn: query, key and value, in
  the order of their parts)."""
  out = {}
  for t in hf.tensors(_unscanned(cfg), family, base):
    if t.path[-1] == "kernel" and t.kind in ("linear", "conv1d"):
      out.setdefault(t.key.removesuffix(".weight"), []).append(t)
  return out


def _factors(t: hf.Tensor) -> tuple:
  """The Tensors of lora_A and lora_B for kernel `t`: torch Linear layouts, whatever t's."""
  return dataclasses.replace(t, kind="linear", part=None), dataclasses.replace(
    t, kind="linear", n_in=1, part=None
  )


def _base(cfg: ModelConfig, family: str) -> str:
  """The body prefix of the class models.hf.save_pretrained exports (none for a bare body)."""
  return "" if cfg.head == "none" else hf.FAMILIES[family].prefix


def _universe(cfg: ModelConfig, family: str, base: str) -> set:
  """Every module name of the HF model we know of: each tensor's module and its parents, and
  the family's other heads (BertModel's pooler.dense beside our head "none")."""
  keys = [t.key.rsplit(".", 1)[0] for t in hf.tensors(_unscanned(cfg), family, base)]
  keys += hf._head_keys(family, base)[1]
  return {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)}


def _matches(name: str, module: str) -> bool:
  """PEFT's list matching of target_modules (and, escaped, of its pattern keys)."""
  return module == name or module.endswith("." + name)


def _names(selected: set, universe: set) -> list:
  """Each module of `selected` by its shortest dotted suffix that matches no module of
  `universe` outside `selected`: together they match exactly `selected`."""
  others = universe - selected
  names = set()
  for module in selected:
    parts = module.split(".")
    names.add(
      next(
        n
        for n in (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        if not any(_matches(n, u) for u in others)
      )
    )
  return sorted(names)


def _pattern(patterns: dict, module: str):
  """The value PEFT's get_pattern_key picks for `module` from rank_pattern / alpha_pattern."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return None


# ---- save -----------------------------------------------------------------------------------


def _pairs(adapters: dict, kernels: dict) -> dict:
  """Our layer path (unscanned) -> (a, b) on the host, a scanned stack cut into its layers;
  pairs that are all zero are left out. Misplaced or misshapen adapters are errors."""
  flat = traverse_util.flatten_dict(adapters)
  layers = sorted({p[:-2] for p in flat if len(p) > 2 and p[-2] == ADAPTER})
  stray = [p for p in flat if len(p) < 3 or p[-2] != ADAPTER or p[-1] not in ("a", "b")]
  if stray:
    raise ValueError(
      f"adapters have leaves that are not <layer>/{ADAPTER}/a or b: "
      f"{['/'.join(p) for p in stray][:8]}: pass only the adapters' subtree."
    )
  out = {}
  for layer in layers:
    name = "/".join(layer)
    if (*layer, ADAPTER, "a") not in flat or (*layer, ADAPTER, "b") not in flat:
      raise ValueError(f"{name}/{ADAPTER} needs both a and b")
    a, b = (hf._host(flat[(*layer, ADAPTER, k)]) for k in ("a", "b"))
    scanned = layer[0] == "layers"
    per_layer = (
      [((f"layers_{i}", *layer[1:]), a[i], b[i]) for i in range(a.shape[0])]
      if scanned
      else [(layer, a, b)]
    )
    for path, a_, b_ in per_layer:
      shape = kernels.get(path)
      if shape is None:
        raise ValueError(f"{name}/{ADAPTER}: this model has no kernel at {'/'.join(path)}")
      n_in = a_.ndim - 1
      if a_.shape[:-1] != shape[:n_in] or b_.shape != (a_.shape[-1], *shape[n_in:]):
        raise ValueError(
          f"{name}/{ADAPTER} a {a_.shape}, b {b_.shape} do not fit the kernel {shape}: "
          "a must be kernel.shape[:n_in] + (r,), b (r,) + kernel.shape[n_in:]"
        )
      if a_.any() or b_.any():
        out[path] = (a_, b_)
  return out


def save_adapter(
  cfg: ModelConfig,
  adapters: dict,
  directory: str,
  *,
  rank: int,
  alpha: float,
  dropout: float = 0.0,
  base_model: str | None = None,
):
  """Writes adapter_config.json and adapter_model.safetensors (float32) that
  peft.PeftModel.from_pretrained loads onto the model models.hf.save_pretrained exports for
  cfg. `adapters`: our adapters' tree (scanned or not); `rank` is the config's r (adapters of
  another rank get rank_pattern entries), `alpha` our scale's numerator (alpha / r each),
  `base_model` the base_model_name_or_path to record. Multi-host: every process calls it,
  the first writes."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"rank={rank!r}: the rank must be a positive integer")
  family = hf.family_of(cfg)
  base = _base(cfg, family)
  modules = _modules(cfg, family, base)
  kernels = _kernels(cfg)
  pairs = _pairs(adapters, kernels)
  placed = {t.path[:-1] for ts in modules.values() for t in ts}
  homeless = sorted("/".join(p) for p in pairs if p not in placed)
  if homeless:
    raise ValueError(
      f"a {family} checkpoint has no module for the adapters on {homeless}: adapt only layers "
      "HF has (an untied output layer, not a tied one)"
    )
  tensors, ranks, alphas = {}, {}, {}
  for name, ts in modules.items():
    present = [t for t in ts if t.path[:-1] in pairs]
    if not present:
      continue
    a_hf = np.concatenate([_factors(t)[0].to_hf(pairs[t.path[:-1]][0]) for t in present])
    total = a_hf.shape[0]
    if len(ts) == 1:
      b_hf = _factors(ts[0])[1].to_hf(pairs[ts[0].path[:-1]][1])
      scale_alpha = alpha
    else:  # GPT-2's c_attn: B block diagonal, each part's scale alpha / r_j kept
      outs = [math.prod(kernels[t.path[:-1]][t.n_in :]) for t in ts]
      b_hf, col = np.zeros((sum(outs), total), np.float32), 0
      for j, t in enumerate(ts):
        if t in present:
          a, b = pairs[t.path[:-1]]
          r = a.shape[-1]
          row = sum(outs[:j])
          b_hf[row : row + outs[j], col : col + r] = _factors(t)[1].to_hf(b) * (rank / r)
          col += r
      scale_alpha = alpha * total / rank  # the module's scale alpha / rank
    if total != rank:
      ranks[name] = total
    if scale_alpha != alpha:
      alphas[name] = scale_alpha
    for factor, x in zip(FACTORS, (a_hf, b_hf)):
      tensors[PREFIX + name + factor] = (x.shape, lambda x=x: x)
  if not tensors:
    raise ValueError("no adapters to save: the tree holds no <layer>/lora/a and b (or all zero)")
  selected = {k[len(PREFIX) : -len(FACTORS[0])] for k in tensors if k.endswith(FACTORS[0])}
  universe = _universe(cfg, family, base)

  def patterns(values):  # {module: value} -> {escaped suffix: value}, exact within `selected`
    groups = collections.defaultdict(set)
    for module, value in values.items():
      groups[value].add(module)
    return {re.escape(n): v for v, ms in groups.items() for n in _names(ms, selected)}

  config = dict(
    peft_type="LORA",
    task_type="CAUSAL_LM" if cfg.kind == "decoder" else "FEATURE_EXTRACTION",
    base_model_name_or_path=base_model,
    r=rank,
    lora_alpha=alpha,
    lora_dropout=dropout,
    target_modules=_names(selected, universe),
    rank_pattern=patterns(ranks),
    alpha_pattern=patterns(alphas),
    fan_in_fan_out=family == "gpt2",  # its Conv1D weights are [in, out]
    bias="none",
    use_rslora=False,
    use_dora=False,
    modules_to_save=None,
    layers_to_transform=None,
    init_lora_weights=True,
    inference_mode=True,
  )
  os.makedirs(directory, exist_ok=True)
  paths = [os.path.join(directory, n) for n in (WEIGHTS, CONFIG)]
  _write_safetensors(tensors, paths[0] + ".tmp")
  if jax.process_index() == 0:
    with open(paths[1] + ".tmp", "w") as f:
      json.dump(config, f, indent=2)
    for path in paths:
      os.replace(path + ".tmp", path)


# ---- load -----------------------------------------------------------------------------------


def _read(directory: str) -> tuple[dict, dict]:
  """(adapter_config.json, {key: float32 array}) of an adapter directory."""
  path = os.path.join(directory, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{directory} has no {CONFIG}: point at the directory PeftModel.save_pretrained wrote"
    )
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from None
  for name, reader in ((WEIGHTS, _Safetensors), (WEIGHTS_BIN, _TorchBin)):
    if os.path.exists(os.path.join(directory, name)):
      r = reader(os.path.join(directory, name))
      return config, {k: np.asarray(r.get(k), np.float32) for k in r.header}
  raise FileNotFoundError(f"{directory} has {CONFIG} but neither {WEIGHTS} nor {WEIGHTS_BIN}")


def _check_config(config: dict, directory: str, family: str):
  if config.get("peft_type") != "LORA":
    raise ValueError(
      f"{directory} holds a {config.get('peft_type')!r} adapter: only LoRA adapters load here"
    )
  for key, (ok, why) in REFUSED.items():
    value = config.get(key, ok)
    if value not in (ok, None, [], {}, "none", False):
      raise ValueError(
        f"{directory}/{CONFIG} has {key}={value!r}, which load_adapter does not support: {why}."
      )
  arch = (config.get("auto_mapping") or {}).get("base_model_class")
  other = hf.FAMILIES[hf.ARCHITECTURES[arch][0]] if arch in hf.ARCHITECTURES else None
  ours = hf.FAMILIES[family]
  if other and (other.prefix, other.layer, other.block) != (ours.prefix, ours.layer, ours.block):
    raise ValueError(
      f"{directory} is an adapter for a {arch} ({other.name}) model, but the "
      f"config is a {family} model: load it with the config of the model it was trained on "
      "(models.hf.config_from_hf of that model's config.json)"
    )


def _split(ts: list, a_hf: np.ndarray, b_hf: np.ndarray) -> list:
  """[(Tensor, A, B)] of a module: GPT-2's c_attn cut into its parts (see the module doc)."""
  if len(ts) == 1:
    return [(ts[0], a_hf, b_hf)]
  rows = np.split(b_hf, len(ts))
  cols = [np.flatnonzero(np.any(r != 0, axis=0)) for r in rows]
  used = np.concatenate(cols)
  if used.size and len(np.unique(used)) == used.size:  # disjoint: a block-diagonal B
    return [(t, a_hf[c], r[:, c]) for t, r, c in zip(ts, rows, cols) if c.size]
  return [(t, a_hf, r) for t, r in zip(ts, rows)]


def load_adapter(cfg: ModelConfig, directory: str, *, pad: bool = False) -> tuple[dict, int, float]:
  """(adapters, rank, alpha) from a PEFT LoRA adapter directory (as save_adapter or PEFT's
  save_pretrained writes it) for a model of `cfg` (scanned or not, as cfg.scan_layers): the
  adapters' tree (jax arrays) whose merged kernels W + alpha / rank * tensordot(a, b, 1) give
  the PEFT model's outputs. Modules of differing rank are an error unless `pad` (zero-pads
  them all to the largest rank). An adapter for another architecture or other sizes is an
  error naming the mismatch."""
  family = hf.family_of(cfg)
  config, weights = _read(directory)
  _check_config(config, directory, family)
  known = {}
  for base in ("", hf.FAMILIES[family].prefix):  # the bare body's names, the head class's
    known.update(_modules(cfg, family, base))
  factors, stray, foreign = {}, [], []
  for key, x in weights.items():
    name = key.removeprefix(PREFIX)
    factor = next((i for i, f in enumerate(FACTORS) if name.endswith(f)), None)
    if factor is None:
      stray.append(key)
      continue
    module = name[: -len(FACTORS[factor])]
    factors.setdefault(module, [None, None])[factor] = x
    foreign.append(module)
  if stray:
    raise ValueError(
      f"{directory}/{WEIGHTS} has tensors that are not lora_A / lora_B weights: {stray[:8]} "
      "(embedding adapters, DoRA magnitudes, biases or saved modules): only LoRA on dense "
      "layers loads here"
    )
  foreign = sorted({m for m in foreign if m not in known})
  if foreign:
    raise ValueError(
      f"{directory} adapts modules a {family} model of {cfg.n_layers} layers (head "
      f"{cfg.head!r}) does not have: {foreign[:8]}{' ...' if len(foreign) > 8 else ''} "
      f"(target_modules {config.get('target_modules')}): it is an adapter for another "
      "architecture or depth; load it with the config of the model it was trained on "
      "(models.hf.config_from_hf of that model's config.json)"
    )
  kernels = _kernels(cfg)
  pieces, problems = {}, []
  rslora = bool(config.get("use_rslora"))
  for module, (a_hf, b_hf) in sorted(factors.items()):
    ts = known[module]
    if a_hf is None or b_hf is None:
      problems.append(f"{module} lacks lora_{'A' if a_hf is None else 'B'}")
      continue
    fan_in = math.prod(kernels[ts[0].path[:-1]][: ts[0].n_in])
    fan_out = sum(math.prod(kernels[t.path[:-1]][t.n_in :]) for t in ts)
    r = a_hf.shape[0]
    if a_hf.shape != (r, fan_in) or b_hf.shape != (fan_out, r):
      problems.append(
        f"{module} has lora_A {a_hf.shape}, lora_B {b_hf.shape}, but this model needs "
        f"({r}, {fan_in}) and ({fan_out}, {r})"
      )
      continue
    alpha_m = _pattern(config.get("alpha_pattern"), module)
    alpha_m = config.get("lora_alpha", 8) if alpha_m is None else alpha_m
    scale = alpha_m / (math.sqrt(r) if rslora else r)
    for t, a_, b_ in _split(ts, a_hf, b_hf):
      pieces[t.path[:-1]] = (t, a_, b_, scale)
  if problems:
    raise ValueError(
      f"{directory} does not fit a {family} model of d_model {cfg.d_model}, {cfg.n_layers} "
      f"layers: {'; '.join(problems[:8])}. It is an adapter for a model of other sizes: load "
      "it with the config of the model it was trained on."
    )
  ranks = {p: x[1].shape[0] for p, x in pieces.items()}
  if len(set(ranks.values())) > 1 and not pad:
    by_rank = collections.defaultdict(list)
    for p, r in ranks.items():
      by_rank[r].append("/".join(p))
    raise ValueError(
      f"{directory}'s adapters differ in rank ({ {r: ps[:3] for r, ps in by_rank.items()} }): "
      "our adapters have one rank; pass pad=True to zero-pad them all to the largest (exact)"
    )
  rank = max(ranks.values())
  # one alpha for all: alpha / rank * a b = scale * A B; the rest multiplied into b
  wants = [scale * rank for *_, scale in pieces.values()]
  alpha = collections.Counter(wants).most_common(1)[0][0]
  out = {}
  for path, (t, a_hf, b_hf, scale) in pieces.items():
    shape = kernels[path]
    fa, fb = _factors(t)
    r = a_hf.shape[0]
    a = fa.to_ours(a_hf, (*shape[: t.n_in], r))
    b = fb.to_ours(b_hf, (r, *shape[t.n_in :]))
    factor = scale * rank / alpha
    if not math.isclose(factor, 1.0, rel_tol=1e-12):
      b = (b.astype(np.float64) * factor).astype(np.float32)
    if r < rank:
      a = np.concatenate([a, np.zeros((*a.shape[:-1], rank - r), a.dtype)], axis=-1)
      b = np.concatenate([b, np.zeros((rank - r, *b.shape[1:]), b.dtype)], axis=0)
    out[path] = (a, b)
  if cfg.scan_layers:
    out = _stack(out, cfg.n_layers)
  tree = {(*p, ADAPTER, k): jnp.asarray(x) for p, ab in out.items() for k, x in zip("ab", ab)}
  return traverse_util.unflatten_dict(tree), rank, float(alpha)


def _stack(pairs: dict, n_layers: int) -> dict:
  """Per-layer pairs stacked under `layers` (a layer without an adapter: zeros, which add
  nothing); pairs outside the layers as they are."""
  out, stacked = {}, collections.defaultdict(dict)
  for path, ab in pairs.items():
    if path[0].startswith("layers_"):
      stacked[path[1:]][int(path[0][len("layers_") :])] = ab
    else:
      out[path] = ab
  for sub, layers in stacked.items():
    a0, b0 = next(iter(layers.values()))
    zero = (np.zeros_like(a0), np.zeros_like(b0))
    out[("layers", *sub)] = tuple(
      np.stack([layers.get(i, zero)[k] for i in range(n_layers)]) for k in range(2)
    )
  return out
