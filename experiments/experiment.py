"""An experiment: what a config describes (model, task, mesh, optimizer, the compression
methods), built and checked before anything compiles; and a Run: one experiment in its
workdir, what the methods read and write at its stages, its jitted steps and evaluation.

    exp = experiment.build(config)          # every bad value raises here
    state, shardings = exp.init_state()     # sharded on the config's mesh
    run = experiment.Run(exp, workdir, shardings)
    train_step, eval_step = run.jit_steps()

experiments/train.py runs the loop over it.
"""

import dataclasses
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import parallel
from experiments import checks, methods as methods_lib, optim, tasks
from experiments.configs import common
from experiments.data.tokenizer import get_tokenizer


def model_config(config: ml_collections.ConfigDict, tokenizer) -> models.ModelConfig:
  """The ModelConfig the config describes, checked against the data (its tokenizer's ids, or
  the synthetic language's symbols: tasks.vocab_needed)."""
  fields = dict(config.model)
  preset = fields.pop("preset")
  mc = models.get_preset(preset, **fields, dtype=config.dtype)
  if config.mesh.get("stage", 1) > 1:  # the pipeline's stages and microbatches (models.pipeline)
    stages, microbatches = config.mesh.stage, config.train.microbatches
    mc = dataclasses.replace(mc, pipeline_stages=stages, pipeline_microbatches=microbatches)
  need, what = tasks.vocab_needed(config, tokenizer)
  if mc.vocab_size < need:
    raise ValueError(
      f"model.vocab_size={mc.vocab_size} is smaller than {what}: set "
      f"--config.model.vocab_size to at least {need}."
    )
  if mc.positions == "learned" and config.train.seq_len > mc.max_len:
    raise ValueError(
      f"train.seq_len={config.train.seq_len} exceeds the model's learned positions "
      f"(model.max_len={mc.max_len}): shorten the sequences or raise max_len."
    )
  return mc


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config describes, built and checked before anything compiles."""

  config: ml_collections.ConfigDict
  model_config: models.ModelConfig
  model: nn.Module
  task: tasks.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  methods: tuple = ()  # the active compression methods (experiments/methods), in order
  # train.data_batches > 0: the local train batches, by step % data_batches (per instance:
  # dataclasses.replace, e.g. with the teacher's cached logits, starts an empty one)
  _train_batches: dict = dataclasses.field(
    default_factory=dict, init=False, repr=False, compare=False
  )

  def method(self, name: str):
    """The active method that owns config.<name> (None when it is off)."""
    return next((m for m in self.methods if m.name == name), None)

  @property
  def trains(self):
    """A predicate on param paths (only those train) when a method freezes the rest, or None."""
    return methods_lib.trains(self.methods)

  def inputs(self, batch: dict) -> dict:
    """The model's keyword inputs in a batch (beyond the token ids)."""
    return {k: batch[k] for k in self.task.input_keys}

  def model_in(self, mode: str) -> nn.Module:
    """The same model with its methods' hooks in another mode ("calibrate", "convert",
    "serve": a quantized model's dot_generals)."""
    return models.build(self.model_config, **methods_lib.model_hooks(self.methods, mode))

  @property
  def batch_sharding(self):
    return parallel.batch_sharding(self.mesh, self.rules)

  def batch(self, step: int, split: str = "train") -> dict:
    """The global batch at `step`: this process's NumPy slice -> one jax.Array per key.

    With `train.data_batches` = K > 0, train step s gets batch s % K (a low-data run: K
    distinct batches, kept in host memory, so a TFDS stream is not restarted every K steps);
    eval batches are unaffected. The teacher's logit cache is built through this method, so
    its logits stay those of the batches the student sees.
    """
    k = self.config.train.get("data_batches", 0)
    if split == "train" and k > 0:
      step %= k
      if step not in self._train_batches:
        self._train_batches[step] = self.task.batch(step, split)
      local = self._train_batches[step]
    else:
      local = self.task.batch(step, split)
    checks.check_tokens(local, self.model_config, split, step)
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local
    )

  def init(self, rng: jax.Array) -> dict:
    """The train state {"step", "params", "opt", "rng", "nonfinite"} (+ "collections": the
    model's other variables, e.g. quantization ranges; + "extra": what methods train beside
    the model), with logically partitioned leaves."""
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.task.batch(0, "train"))
    init_rng, train_rng = jax.random.split(rng)
    variables = dict(
      self.model.init({"params": init_rng}, example["inputs"], **self.inputs(example))
    )
    state = {"step": jnp.zeros((), jnp.int32), "params": variables.pop("params")}
    extra = {
      m.name: m.init_extra(jax.random.fold_in(init_rng, i + 1)) for i, m in enumerate(self.methods)
    }
    extra = {k: v for k, v in extra.items() if v}
    if extra:
      state["extra"] = extra
    state["opt"] = self.tx.init(parallel.trainable(state, self.trains))
    state["rng"] = train_rng
    zero = jnp.zeros((), jnp.int32)  # steps skipped for a non-finite loss or gradient
    state["nonfinite"] = {"count": zero, "first": zero, "last": zero}
    return {**state, "collections": variables} if variables else state

  def shard_shapes(self):
    """(abstract state with shardings, shardings): the restore target, no allocation."""
    return parallel.shard_shapes(self.init, self.mesh, self.rules, self.rng)

  def init_state(self):
    return parallel.init_sharded(self.init, self.mesh, self.rules, self.rng)

  @property
  def rng(self):
    return jax.random.PRNGKey(self.config.seed)

  def load_hf(self, path_or_name: str, params: dict, shardings: dict) -> dict:
    """`params` with every tensor a Hugging Face checkpoint holds read into its sharding; a
    head it lacks (a classifier on a pretrained encoder) and leaves of ours alone (quantizer
    steps) keep their init. The checkpoint's architecture must be the config's: a field that
    differs is an error naming the override that fixes it."""
    ckpt = models.hf.Checkpoint(models.hf.resolve(path_or_name))
    mc, keep = self.model_config, ("head", "num_labels", "dtype", "scan_layers", "remat_policy")
    keep += ("attention_impl", "record_attention", "dropout_rate")
    keep += ("pipeline_stages", "pipeline_microbatches")
    theirs = models.hf.config_from_hf(ckpt.config, **{k: getattr(mc, k) for k in keep})
    diff = {
      f.name: getattr(theirs, f.name)
      for f in dataclasses.fields(mc)
      if getattr(theirs, f.name) != getattr(mc, f.name)
    }
    if diff:
      fix = " ".join(f"--config.model.{k}={v}" for k, v in diff.items())
      raise ValueError(f"{path_or_name} is a different model than the config's: set {fix}")
    loaded, kept = models.hf.load_params(ckpt, mc, params, shardings)
    logging.info("Loaded %s; kept their init: %s", path_or_name, kept or "nothing")
    return loaded


@dataclasses.dataclass
class Run:
  """One experiment in its workdir: what the methods read and change at a run's stages."""

  exp: Experiment
  workdir: str
  shardings: dict  # the train state's
  devices: object = None
  loaded: bool = False  # the params came from a trained model (init_from, a teacher's layers)
  init_from: str = ""  # what `init` read them from ("hf:..." or a workdir)
  frozen: dict = dataclasses.field(default_factory=dict)  # {method: inputs of every step}
  frozen_shardings: dict = dataclasses.field(default_factory=dict)
  cache: dict = dataclasses.field(default_factory=dict)  # what methods compute once per run
  eval_step: object = None  # jit_steps makes it, and the eval batches
  eval_batches: list = dataclasses.field(default_factory=list)
  extra_eval_batches: dict = dataclasses.field(default_factory=dict)  # {split: batches}

  def init(self, init_from: str = "") -> dict:
    """A fresh sharded state, its params read from `init_from`: "hf:<dir or Hub name>" or
    a workdir whose latest checkpoint holds the matching parameters."""
    exp, shardings = self.exp, self.shardings
    state, _ = exp.init_state()
    if init_from.startswith("hf:"):
      state["params"] = exp.load_hf(init_from[3:], state["params"], shardings["params"])
    elif init_from:
      state["params"] = parallel.load_params(
        os.path.join(init_from, "checkpoints"), state["params"]
      )
    self.loaded, self.init_from = bool(init_from), init_from
    return state

  def jit_steps(self):
    """The jitted train step `(state, batch, frozen) -> (state, metrics)` (donating its
    state) and eval step `(params, collections, batch) -> sums`, with explicit shardings.
    The loss is the task's, as each method wraps it."""
    exp, shardings = self.exp, self.shardings
    model, task = exp.model, exp.task
    loss = lambda p, e, b, r, c, f: task.loss(model, {"params": p, **c}, b, r, True)  # noqa: E731
    for m in exp.methods:
      loss = m.loss(self, loss)

    def step_loss(t, b, r, c, f):  # the optimizer's tree -> the model's params and the extra
      return loss(*((t["params"], t["extra"]) if "extra" in shardings else (t, {})), b, r, c, f)

    t = exp.config.train  # the non-finite policy's limit: past it, a step changes nothing
    limit = 0 if t.get("nonfinite", "skip") == "stop" else t.get("max_nonfinite", 10)
    # With pipeline stages the model runs the microbatches itself (models.pipeline).
    accumulate = 1 if exp.model_config.pipeline_stages > 1 else t.microbatches
    step = parallel.make_train_step(
      step_loss, exp.tx, accumulate, max_nonfinite=limit, trains=exp.trains
    )
    train_step = parallel.jit_with_mesh(
      step,
      exp.mesh,
      exp.rules,
      in_shardings=(shardings, exp.batch_sharding, self.frozen_shardings),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    self.eval_step = parallel.jit_with_mesh(
      lambda p, c, b: task.eval_outputs(model, {"params": p, **c}, b),
      exp.mesh,
      exp.rules,
      in_shardings=(shardings["params"], shardings.get("collections", {}), exp.batch_sharding),
      out_shardings=None,
    )
    self.eval_batches = [exp.batch(i, "eval") for i in range(tasks.eval_steps(exp.config, task))]
    self.extra_eval_batches = {
      split: [exp.batch(i, split) for i in range(tasks.eval_steps(exp.config, task, split))]
      for split in task.extra_evals
    }
    return train_step, self.eval_step

  def evaluate(self, params, collections) -> dict:
    """The eval row of `params` (placed on the state's shardings) over the eval batches, and
    each extra eval split's metrics under its prefix (MNLI's eval_mm_accuracy)."""
    params = jax.device_put(params, self.shardings["params"])
    return self._rows(lambda b: self.eval_step(params, collections, b))

  def evaluate_model(self, model: nn.Module, variables: dict) -> dict:
    """The eval row of another model (a serving one) on its variables, replicated."""
    variables = jax.device_put(variables, NamedSharding(self.exp.mesh, P()))
    step = jax.jit(lambda v, b: self.exp.task.eval_outputs(model, v, b))
    with jax.set_mesh(self.exp.mesh):
      return self._rows(lambda b: step(variables, b))

  def _rows(self, outputs) -> dict:
    """The eval row of `outputs(batch)` over the eval batches, with the extra splits'."""
    task = self.exp.task
    row = _eval_row(task, [outputs(b) for b in self.eval_batches])
    for split, batches in self.extra_eval_batches.items():
      row.update(tasks.extra_eval_row(split, _eval_row(task, [outputs(b) for b in batches])))
    return row


def _eval_row(task: tasks.Task, outputs: list) -> dict:
  """The eval row from each eval batch's (sums, predictions): the summed metrics, and the task's
  score of the predictions (gathered to every process: the whole eval batches, in order)."""
  row = task.summarize(tasks.sum_eval([sums for sums, _ in outputs]))
  if task.score:
    row.update(task.score([multihost_utils.process_allgather(p, tiled=True) for _, p in outputs]))
  return row


def build(
  config: ml_collections.ConfigDict, workdir: str | None = None, devices=None
) -> Experiment:
  """Checks the config (and the workdir it would use) and builds the experiment; no compiling.

  `devices` (default: all) is what the mesh spans, e.g. `jax.devices()[:1]` for a reference.
  """
  common.check_keys(config)
  checks.check_ranges(config)
  tokenizer = get_tokenizer(config.data.tokenizer)
  mc = model_config(config, tokenizer)
  if workdir:
    checks.check_workdir(workdir, config)
  checks.check_init_from(config)

  def build_model(run_config, record_attention=False):  # another run's model (a teacher)
    run_mc = model_config(run_config, tokenizer)
    if record_attention:
      run_mc = dataclasses.replace(run_mc, record_attention=True)
    return run_mc, models.build(run_mc, **methods_lib.model_hooks(methods_lib.make(run_config)))

  methods = methods_lib.make(config)
  for m in methods:
    mc = m.bind(mc, workdir, build_model)
  mesh = parallel.make_mesh(**config.mesh, devices=devices)
  rules = parallel.get_rules(config.sharding.rules)
  # Each process feeds the batch rows its devices hold (not always block process_index).
  feed = parallel.sharding.process_batch_slice(parallel.batch_sharding(mesh, rules))
  checks.check_batch(config, mesh, feed[1])
  task = tasks.make_task(config, tokenizer, *feed)
  tx, schedule = optim.make_optimizer(config, config.train.steps, methods)
  model = models.build(mc, **methods_lib.model_hooks(methods))
  return Experiment(config, mc, model, task, mesh, rules, tx, schedule, tuple(methods))
