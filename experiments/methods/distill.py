"""Distillation from config (`config.distill`): the teacher (the run `config.teacher`
describes, trained first in its workdir; its variables loaded onto the student's mesh), the
student's loss (task weight x task loss + the weighted KD, hidden-state and attention terms),
the student's init from the teacher's layers, and a learned projection of its own
(`state["extra"]["distill"]`) when hidden states are matched across widths. The teacher's top-k
logits cached on disk: experiments/methods/teacher_cache.py.

    --config.distill.method=kd --config.distill.temperature=2 --config.distill.kd_weight=1
    --config.distill.hidden_weight=1 --config.distill.layer_map=every_other
    --config.distill.top_k=16 --config.distill.cache=True

The teacher's model may be bigger, or quantized; it lives in `distill.teacher_workdir`
(default `<workdir>/teacher`, trained there first if it is not yet).
"""

import dataclasses
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from compress import distill
import models
import parallel
from experiments.methods import Method, register, teacher_cache


@register
class Distill(Method):
  name = "distill"
  order = 10

  @staticmethod
  def section() -> ml_collections.ConfigDict:
    """The defaults of `config.distill` (method "none": no teacher)."""
    return ml_collections.ConfigDict(
      dict(
        method="none",  # "none" | "kd" (a teacher run, config.teacher)
        teacher_workdir="",  # the teacher's run; "" -> <workdir>/teacher
        temperature=2.0,  # soft targets softmax(z / T); the KD term is multiplied by T^2
        kind="forward",  # "forward" KL(teacher || student) | "reverse" | "jsd"
        task_weight=1.0,  # on the task loss (hard labels; DistilBERT's alpha_mlm)
        kd_weight=1.0,  # on the soft-target loss (DistilBERT's alpha_ce)
        top_k=0,  # > 0: the teacher's k largest logits only (renormalized)
        cache=False,  # the top-k logits computed once, before training, in <workdir>/teacher_top_k
        chunk=0,  # KD over the sequence in chunks of this many positions; 0: all at once
        hidden_weight=0.0,  # on the hidden-state loss (DistilBERT's alpha_cos)
        hidden_kind="cosine",  # "cosine" | "mse"
        attention_weight=0.0,  # on the attention-map KL (student and teacher heads must match)
        layer_map="last",  # hidden / attention pairs: "last" | "every_other" | "0:1,1:3"
        init="",  # student layers from the teacher's: "" (own init) | "every_other" | "0:0,1:2"
      )
    )

  def __init__(self, config):
    super().__init__(config)
    d = self.c
    if d.method != "kd":
      raise ValueError(f"distill.method={d.method!r}: choose 'none' or 'kd'.")
    if not config.get("teacher"):
      raise ValueError(
        "distill.method='kd' needs config.teacher: the run config of the teacher "
        "(experiments/configs/distill.py shows one)."
      )
    if not d.temperature > 0:
      raise ValueError(f"distill.temperature={d.temperature} must be > 0 (1: plain soft targets).")
    if d.kind not in distill.KINDS:
      raise ValueError(f"distill.kind={d.kind!r}: choose one of {distill.KINDS}.")
    if d.hidden_kind not in ("cosine", "mse"):
      raise ValueError(f"distill.hidden_kind={d.hidden_kind!r}: choose 'cosine' or 'mse'.")
    if config.teacher.task != config.task:
      raise ValueError(
        f"The teacher's task ({config.teacher.task!r}) is not the student's ({config.task!r}): "
        "a teacher is a model trained on the same task."
      )
    if d.top_k < 0:
      raise ValueError(f"distill.top_k={d.top_k}: 0 (all logits) or more.")
    if d.top_k and d.kind != "forward":
      raise ValueError("distill.top_k gives the forward KL only: set distill.kind='forward'.")
    if d.cache and not d.top_k:
      raise ValueError("distill.cache stores the teacher's top-k logits: set distill.top_k > 0.")
    if d.cache and (d.hidden_weight > 0 or d.attention_weight > 0 or d.init):
      raise ValueError(
        "distill.cache holds the teacher's logits only: hidden-state and attention losses and "
        "distill.init need the live teacher (set distill.cache=False)."
      )
    if d.cache and not config.train.steps:
      raise ValueError("distill.cache caches the teacher over train steps: train.steps is 0.")
    seq = 1 if config.task == "classify" else config.train.seq_len
    if d.chunk < 0 or (d.chunk and d.chunk < seq and seq % d.chunk):
      raise ValueError(f"distill.chunk={d.chunk} does not divide train.seq_len={seq}.")
    if d.init and config.get("init_from"):
      raise ValueError("Set either init_from or distill.init (the student from its teacher).")
    self.teacher = None

  def bind(self, mc, workdir, build_model):
    """Builds the teacher's model and checks it against the student's `mc`."""
    self.teacher = make_teacher(self.config, mc, workdir, build_model)
    if self.c.attention_weight > 0:  # attention transfer reads the probabilities the model sows
      mc = dataclasses.replace(mc, record_attention=True)
    self.student_mc = mc
    return mc

  def init_extra(self, rng):
    """The learned projection [D_student, D_teacher] when hidden states are matched across
    widths (boxed: it shards on "embed")."""
    d_s, d_t = self.student_mc.d_model, self.teacher.model_config.d_model
    if not self.c.hidden_weight or d_s == d_t:
      return None
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None))
    return {"projection": init(rng, (d_s, d_t), jnp.float32)}

  def setup(self, run):
    """Trains the teacher in its workdir (unless finished there), then loads it."""
    teacher = self.teacher
    latest = parallel.checkpoint.latest_step(os.path.join(teacher.workdir, "checkpoints"))
    if latest is None or latest < teacher.config.train.steps:
      from experiments import train  # the same loop runs the teacher

      logging.info("Training the teacher in %s first", teacher.workdir)
      train.train_and_evaluate(teacher.config, teacher.workdir, run.devices)
    run.frozen[self.name], run.frozen_shardings[self.name] = self.load_teacher(run.exp)

  def load_teacher(self, exp):
    """(the teacher's variables, their shardings), from its run's checkpoint onto exp's mesh."""
    args = (self.teacher, exp.task.batch(0, "train"), exp.task.input_keys, exp.mesh, exp.rules)
    _, shardings = teacher_shapes(*args)
    return load_teacher(*args), {"params": shardings["params"], **shardings["collections"]}

  def prepare(self, run, state, fresh):
    teacher, exp = self.teacher, run.exp
    if fresh and teacher.init_map:  # DistilBERT: the student from every other teacher layer
      state["params"] = parallel.jit_with_mesh(
        lambda p, t: distill.init_from_teacher(p, t, teacher.init_map, teacher.layers),
        exp.mesh,
        exp.rules,
        in_shardings=(run.shardings["params"], None),
        out_shardings=run.shardings["params"],
      )(state["params"], run.frozen[self.name]["params"])
      run.loaded = True
    if not teacher.live:  # the step reads cached top-k logits: the teacher leaves the devices
      directory = os.path.join(run.workdir, "teacher_top_k")
      part = teacher_cache.cache_top_k(exp, teacher, run.frozen.pop(self.name), directory)
      run.frozen_shardings.pop(self.name)
      run.exp = dataclasses.replace(exp, task=teacher_cache.with_cache(exp.task, part))
    return state

  def loss(self, run, loss):
    return make_loss(run.exp.task, run.exp.model, self.student_mc, self.teacher)

  def flops(self, batch, seq_len):
    """A live teacher's forward pass: a third of its training step."""
    if not self.teacher.live:
      return 0.0
    from experiments import throughput

    return throughput.step_flops(self.teacher.model_config, batch, seq_len) / 3


def parse_layer_map(spec: str, n_student: int, n_teacher: int, field: str) -> dict:
  """{student layer: teacher layer} from "last", "every_other" or "s:t,s:t"; "" is none."""
  if spec in ("", "none"):
    return {}
  if spec == "last":
    pairs = {n_student - 1: n_teacher - 1}
  elif spec == "every_other":
    pairs = {i: 2 * i for i in range(n_student)}
  else:
    try:
      pairs = dict(tuple(int(x) for x in pair.split(":")) for pair in spec.split(","))
    except ValueError:
      raise ValueError(
        f"distill.{field}={spec!r}: write 'last', 'every_other' or pairs like '0:1,1:3' "
        "(student layer:teacher layer)."
      ) from None
  for s, t in pairs.items():
    if not 0 <= s < n_student or not 0 <= t < n_teacher:
      raise ValueError(
        f"distill.{field}={spec!r}: student layer {s} -> teacher layer {t} points past the "
        f"depth of the student ({n_student} layers) or the teacher ({n_teacher} layers)."
      )
  return pairs


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The teacher run: where it lives, its model, and what the student's loss takes from it."""

  config: ml_collections.ConfigDict  # the teacher run's config
  workdir: str
  model_config: models.ModelConfig
  model: nn.Module
  layer_map: dict  # hidden-state / attention pairs {student layer: teacher layer}
  init_map: dict  # student layers initialized from the teacher's
  d: ml_collections.ConfigDict  # the student's `distill` section
  layers: object  # models.structure(...).layers: where the layers are, named

  @property
  def live(self) -> bool:
    """Whether the train step runs the teacher (False: its top-k logits come from the cache)."""
    return not self.d.cache


def make_teacher(config, student_mc: models.ModelConfig, workdir: str | None, build_model):
  """The Teacher `config.distill` and `config.teacher` describe, checked against the
  student's model config. `build_model(run_config, record_attention)` returns (ModelConfig,
  model) for a run config, built as the student's are."""
  d, tc = config.distill, config.teacher
  needs_maps = d.hidden_weight > 0 or d.attention_weight > 0
  mc, model = build_model(tc, record_attention=d.attention_weight > 0)
  vocab_s, vocab_t = _n_outputs(student_mc), _n_outputs(mc)
  if d.kd_weight and vocab_s != vocab_t:
    raise ValueError(
      f"The student's vocabulary ({vocab_s} outputs) and the teacher's ({vocab_t}) differ: "
      "logit distillation needs the same vocabulary (set model.vocab_size of both), or set "
      "distill.kd_weight=0."
    )
  if vocab_t and d.top_k > vocab_t:
    raise ValueError(f"distill.top_k={d.top_k}: between 0 (all) and the vocabulary ({vocab_t}).")
  if mc.positions == "learned" and config.train.seq_len > mc.max_len:
    raise ValueError(
      f"train.seq_len={config.train.seq_len} exceeds the teacher's learned positions "
      f"(teacher.model.max_len={mc.max_len})."
    )
  if d.attention_weight > 0 and student_mc.n_heads != mc.n_heads:
    raise ValueError(
      f"Attention transfer compares maps head by head: the student has {student_mc.n_heads} "
      f"heads, the teacher {mc.n_heads}."
    )
  n_s, n_t = student_mc.n_layers, mc.n_layers
  layer_map = parse_layer_map(d.layer_map, n_s, n_t, "layer_map") if needs_maps else {}
  init_map = parse_layer_map(d.init, n_s, n_t, "init")
  if init_map:
    for field in ("d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "vocab_size"):
      if getattr(student_mc, field) != getattr(mc, field):
        raise ValueError(
          f"distill.init copies teacher layers into the student, but their model.{field} "
          f"differ ({getattr(student_mc, field)} vs {getattr(mc, field)})."
        )
  teacher_dir = d.teacher_workdir or (os.path.join(workdir, "teacher") if workdir else "")
  layers = models.structure(student_mc).layers
  return Teacher(tc, teacher_dir, mc, model, layer_map, init_map, d, layers)


def _n_outputs(mc: models.ModelConfig) -> int:
  """Classes per output ("classify", "tokens"), the vocabulary (LM, MLM), or 0 for "span",
  whose start / end distributions run over the sequence's positions (as many as the batch's)."""
  if mc.head == "span":
    return 0
  return mc.num_labels if mc.head in ("classify", "tokens") else mc.vocab_size


# -- the teacher's variables ----------------------------------------------------------------


def teacher_shapes(teacher: Teacher, example: dict, input_keys, mesh, rules):
  """(abstract variables {"params", "collections"} with shardings, their shardings)."""

  def init(rng):
    kwargs = {k: jnp.asarray(example[k]) for k in input_keys}
    variables = dict(teacher.model.init({"params": rng}, jnp.asarray(example["inputs"]), **kwargs))
    return {"params": variables.pop("params"), "collections": variables}

  return parallel.shard_shapes(init, mesh, rules, jax.random.key(0))


def load_teacher(teacher: Teacher, example: dict, input_keys, mesh, rules):
  """The teacher's variables ({"params": ..., other collections}), restored from the latest
  checkpoint of its run straight into their shardings on the student's mesh."""
  abstract, _ = teacher_shapes(teacher, example, input_keys, mesh, rules)
  loaded = parallel.load_variables(os.path.join(teacher.workdir, "checkpoints"), abstract)
  return {"params": loaded["params"], **loaded["collections"]}


# -- the student's loss ---------------------------------------------------------------------


def _per_layer(intermediates: dict, n_layers: int, layers: str, *path) -> list:
  """A sown value of every layer (scanned: stacked on axis 0 under `layers`; unscanned:
  under `{layers}_{i}`), in layer order."""

  def get(tree):
    for key in path:
      tree = tree[key]
    return tree[0]  # sow keeps a tuple

  if layers in intermediates:
    stacked = get(intermediates[layers])
    return [stacked[i] for i in range(n_layers)]
  return [get(intermediates[f"{layers}_{i}"]) for i in range(n_layers)]


def make_loss(task, student: nn.Module, student_mc, teacher: Teacher):
  """loss(params, extra, batch, rng, collections, frozen) -> (summed objective, sums).

  The objective is task_weight x task loss + the weighted distillation terms. Each term is
  per token of the task (the KD term over the task's target tokens; the hidden-state and
  attention terms over every real token, rescaled to the task's token count), so the train
  step's single division by the task's weight gives each term's mean. Metrics: "loss" (the
  objective), "task_loss", and "kd_loss" / "hidden_loss" / "attention_loss" as used.
  """
  d = teacher.d
  capture = bool(teacher.layer_map)
  n_s, n_t = student_mc.n_layers, teacher.model_config.n_layers

  def loss(params, extra, batch, rng, collections, frozen):
    variables = {"params": params, **collections}
    s_logits, s_inter = task.forward(student, variables, batch, rng, True, capture)
    sums = task.sums(s_logits, batch, accuracy=False)  # a train step's
    out = {**sums, "task_loss": sums["loss"]}
    total = d.task_weight * sums["loss"]
    if teacher.live:
      t_vars = frozen["distill"]
      t_logits, t_inter = task.forward(teacher.model, t_vars, batch, None, False, capture)
      t_logits, t_inter = jax.lax.stop_gradient((t_logits, t_inter))
      if d.top_k:
        t_logits = distill.teacher_top_k(t_logits, d.top_k)
    else:
      t_logits = (batch["teacher_values"], batch["teacher_indices"])

    def add(name, weight, term):  # term: (sum, its token weight) -> per task token
      nonlocal total
      scale = jax.lax.stop_gradient(sums["weight"] / jnp.maximum(term[1], 1.0))
      out[name] = term[0] * scale
      total = total + weight * out[name]

    if d.kd_weight:
      kd = distill.kd_loss(
        s_logits,
        t_logits,
        task.targets(batch)[1],
        temperature=d.temperature,
        kind=d.kind,
        chunk=d.chunk or None,
      )
      add("kd_loss", d.kd_weight, kd)
    mask = task.token_mask(batch)
    if d.hidden_weight:
      hs = _per_layer(s_inter, n_s, teacher.layers, "hidden_states")
      ht = _per_layer(t_inter, n_t, teacher.layers, "hidden_states")
      proj = extra.get("distill", {}).get("projection")
      add(
        "hidden_loss",
        d.hidden_weight,
        distill.hidden_loss(hs, ht, teacher.layer_map, mask, d.hidden_kind, proj),
      )
    if d.attention_weight:
      ps = _per_layer(s_inter, n_s, teacher.layers, "attn", "attention_probs")
      pt = _per_layer(t_inter, n_t, teacher.layers, "attn", "attention_probs")
      terms = [distill.attention_loss(ps[s], pt[t], mask) for s, t in teacher.layer_map.items()]
      add("attention_loss", d.attention_weight, (sum(a for a, _ in terms), terms[0][1]))
    out["loss"] = total
    return total, out

  return loss
