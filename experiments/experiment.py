"""An experiment: what a config describes (model, task, mesh, optimizer, compression, teacher),
built and checked before anything compiles, with its init, jitted steps and calibration.

    exp = experiment.build(config)          # every bad value raises here
    state, shardings = exp.init_state()     # sharded on the config's mesh
    train_step, eval_step = exp.jit_steps(shardings)

experiments/train.py runs the loop over it.
"""

import dataclasses

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from compress import quant
import models
import parallel
from experiments import checks, compression, distillation, optim, tasks
from experiments.configs import common
from experiments.tokenizer import get_tokenizer


def model_config(config: ml_collections.ConfigDict, tokenizer) -> models.ModelConfig:
  """The ModelConfig the config describes, checked against the tokenizer and data."""
  fields = dict(config.model)
  preset = fields.pop("preset")
  mc = models.get_preset(preset, **fields, dtype=config.dtype)
  if mc.vocab_size < tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({tokenizer.vocab_size} ids): set --config.model.vocab_size to at least "
      f"{tokenizer.vocab_size}."
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
  policy: object = None  # compress.quant.Policy when the run quantizes
  teacher: distillation.Teacher | None = None  # when the run distills
  # train.data_batches > 0: the local train batches, by step % data_batches (per instance:
  # dataclasses.replace, e.g. with the teacher's cached logits, starts an empty one)
  _train_batches: dict = dataclasses.field(
    default_factory=dict, init=False, repr=False, compare=False
  )

  def inputs(self, batch: dict) -> dict:
    """The model's keyword inputs in a batch (beyond the token ids)."""
    return {k: batch[k] for k in self.task.input_keys}

  def model_in(self, quant_mode: str) -> nn.Module:
    """The same model with its QuantDots in another mode ("calibrate", "convert", "serve")."""
    dgs = compression.dot_generals(self.config, self.policy, quant_mode)
    return models.build(self.model_config, **dgs)

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
    model's other variables, e.g. quantization ranges), with logically partitioned leaves."""
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.task.batch(0, "train"))
    init_rng, train_rng = jax.random.split(rng)
    variables = dict(
      self.model.init({"params": init_rng}, example["inputs"], **self.inputs(example))
    )
    params = variables.pop("params")
    shape = distillation.projection_shape(self.model_config, self.teacher)
    if shape:  # hidden states matched across widths: a learned projection, trained with the rest
      params = {**params, **distillation.init_projection(shape, jax.random.fold_in(init_rng, 1))}
    opt = self.tx.init(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt, "rng": train_rng}
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

  def jit_steps(self, shardings, teacher_shardings=None):
    """The jitted train step (donating its state) and eval step, with explicit shardings.

    When the run distills from a live teacher, the train step is
    `(state, batch, teacher_variables)`, the teacher's shardings given here.
    """
    model, task = self.model, self.task
    if self.teacher is not None:
      loss = distillation.make_loss(task, model, self.model_config, self.teacher)
    else:
      loss = lambda p, b, r, c: task.loss(model, {"params": p, **c}, b, r, True)  # noqa: E731
    step = parallel.make_train_step(loss, self.tx, self.config.train.microbatches)
    frozen = (teacher_shardings,) if self.teacher is not None and self.teacher.live else ()
    train_step = parallel.jit_with_mesh(
      step,
      self.mesh,
      self.rules,
      in_shardings=(shardings, self.batch_sharding, *frozen),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    eval_step = parallel.jit_with_mesh(
      lambda p, c, b: task.loss(model, {"params": p, **c}, b, None, False)[1],
      self.mesh,
      self.rules,
      in_shardings=(
        distillation.model_params(shardings["params"]),  # the model's own: no projection
        shardings.get("collections", {}),
        self.batch_sharding,
      ),
      out_shardings=None,
    )
    return train_step, eval_step

  def reinit_steps(self, state: dict, shardings: dict) -> dict:
    """LSQ step sizes re-initialized from the current weights (after init_from) and a batch."""
    model = self.model

    def fn(p, c, b, rng):
      kwargs = self.inputs(b)
      kept = quant.without_steps(p)
      _, new = model.apply(
        {"params": kept, **c}, b["inputs"], mutable=["params"], rngs={"params": rng}, **kwargs
      )
      return new["params"]

    jitted = parallel.jit_with_mesh(
      fn,
      self.mesh,
      self.rules,
      in_shardings=(
        shardings["params"],
        shardings.get("collections", {}),
        self.batch_sharding,
        None,
      ),
      out_shardings=shardings["params"],
    )
    return jitted(state["params"], state.get("collections", {}), self.batch(0), self.rng)

  def load_teacher(self):
    """(the teacher's variables, their shardings), from its run's checkpoint onto this mesh."""
    example = self.task.batch(0, "train")
    args = (self.teacher, example, self.task.input_keys, self.mesh, self.rules)
    _, shardings = distillation.teacher_shapes(*args)
    variables = distillation.load_teacher(*args)
    return variables, {"params": shardings["params"], **shardings["collections"]}

  def load_hf(self, path_or_name: str, params: dict, shardings: dict) -> dict:
    """`params` with every tensor a Hugging Face checkpoint holds read into its sharding; a
    head it lacks (a classifier on a pretrained encoder) and leaves of ours alone (quantizer
    steps, a distillation projection) keep their init. The checkpoint's architecture must be
    the config's: a field that differs is an error naming the override that fixes it."""
    ckpt = models.hf.Checkpoint(models.hf.resolve(path_or_name))
    mc, keep = self.model_config, ("head", "num_labels", "dtype", "scan_layers", "remat_policy")
    keep += ("attention_impl", "record_attention", "dropout_rate")
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

  def init_from_teacher(self, state: dict, shardings: dict, teacher_vars: dict) -> dict:
    """The student's params with the layers `distill.init` maps copied from the teacher."""
    jitted = parallel.jit_with_mesh(
      lambda p, t: distillation.init_student(p, t, self.teacher),
      self.mesh,
      self.rules,
      in_shardings=(shardings["params"], None),
      out_shardings=shardings["params"],
    )
    return jitted(state["params"], teacher_vars["params"])

  def calibrate(self, state: dict, shardings: dict) -> dict:
    """Static activation ranges from `quant.calib_batches` train batches (QuantDot's
    "calibrate" mode: a float forward recording each quantized input's range)."""
    model = self.model_in("calibrate")

    def step(p, c, b):
      variables = {"params": p, **c}
      kwargs = self.inputs(b)
      _, updated = model.apply(variables, b["inputs"], mutable=["quant"], **kwargs)
      return {**c, **updated}

    c_shardings = shardings["collections"]
    jitted = parallel.jit_with_mesh(
      step,
      self.mesh,
      self.rules,
      in_shardings=(shardings["params"], c_shardings, self.batch_sharding),
      out_shardings=c_shardings,
    )
    batches = (self.batch(i) for i in range(self.config.quant.calib_batches))
    calib = lambda st, b: {**st, "collections": jitted(st["params"], st["collections"], b)}  # noqa: E731
    return quant.calibrate_model(calib, state, batches)


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

  def build_model(run_config, record_attention=False):
    run_mc = model_config(run_config, tokenizer)
    if record_attention:  # attention transfer reads the probabilities the model sows
      run_mc = dataclasses.replace(run_mc, record_attention=True)
    dgs = compression.dot_generals(run_config, compression.quant_policy(run_config))
    return run_mc, models.build(run_mc, **dgs)

  teacher = distillation.make_teacher(config, mc, workdir, build_model)
  if teacher is not None and config.distill.attention_weight > 0:
    mc = dataclasses.replace(mc, record_attention=True)
  mesh = parallel.make_mesh(**config.mesh, devices=devices)
  rules = parallel.get_rules(config.sharding.rules)
  # Each process feeds the batch rows its devices hold (not always block process_index).
  feed = parallel.sharding.process_batch_slice(parallel.batch_sharding(mesh, rules))
  checks.check_batch(config, mesh, feed[1])
  task = tasks.make_task(config, tokenizer, *feed)
  policy = compression.quant_policy(config)
  tx, schedule = optim.make_optimizer(config, config.train.steps)
  model = models.build(mc, **compression.dot_generals(config, policy))
  return Experiment(config, mc, model, task, mesh, rules, tx, schedule, policy, teacher)
