"""The train step: one pure function `(state, batch) -> (state, metrics)`.

The state is a plain dict {"step", "params", "opt", "rng"}, plus "collections" when the
model has non-trainable variables (e.g. a quantizer's calibrated ranges): they are passed
to the loss and carried along unchanged; and "extra" when something beside the model is
trained with it (a distillation projection): the loss and the optimizer then see
{"params": ..., "extra": ...} (`trainable`). A step whose loss or gradients are not finite
leaves params and optimizer state as they were (the step count still advances, so the next
step reads the next batch); with a "nonfinite" entry {"count", "first", "last"} (int32) in
the state, the step counts such steps and records the first and last, and the train loop
applies its policy (`train.nonfinite`) to them. With `max_nonfinite`, the policy is exact to
the step without the host looking at every step: once the count exceeds it, every later step
changes nothing at all (not the step, not the count), so the state the loop finds when it
next looks is the one right after the step that crossed the limit. Inputs that are neither trained nor part of the
state (a distillation teacher's variables) follow the batch: `step(state, batch, *frozen)`
passes them to every microbatch's loss, and they are never donated. A loss function returns
*sums* (loss summed over tokens, the token weight, other counts), never means: sums add
up across microbatches and across shards, so the mean taken once at the end is exact
whatever the padding, the microbatching or the mesh.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

PyTree = Any
# loss_fn(params, batch, rng, collections, *frozen) -> (loss_sum, sums); sums holds "weight"
# and any other sums. `collections` is state["collections"] ({} when the state has none).
LossFn = Callable[[PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


def trainable(state: dict, trains: Callable[[str], bool] | None = None) -> PyTree:
  """What the optimizer updates: the params (those whose "/"-joined path `trains` accepts,
  e.g. LoRA's adapters), with the state's "extra" when it has one."""
  params = state["params"]
  if trains is not None:
    flat = traverse_util.flatten_dict(params, sep="/")
    params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if trains(k)}, sep="/")
  if "extra" in state:
    return {"params": params, "extra": state["extra"]}
  return params


def _fill(full: PyTree, part: PyTree) -> PyTree:
  """`full` with the leaves `part` holds (a sub-tree of the same nesting) replaced."""
  flat = traverse_util.flatten_dict(full)
  flat.update(traverse_util.flatten_dict(part))
  return traverse_util.unflatten_dict(flat)


def _with_trainable(state: dict, tree: PyTree) -> dict:
  return dict(state, **tree) if "extra" in state else dict(state, params=tree)


def make_train_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  microbatches: int = 1,
  max_nonfinite: int | None = None,
  trains: Callable[[str], bool] | None = None,
):
  """Builds the step; gradients are accumulated over `microbatches` slices of the batch.
  `max_nonfinite`: the state freezes once more steps than that were non-finite. `trains`: a
  predicate on "/"-joined param paths; the others are frozen: no gradient is computed for
  them, the optimizer (its state made from `trainable(state, trains)`) never sees them, and
  they leave the step bitwise as they came."""

  def step(state: dict, batch: dict, *frozen) -> tuple[dict, dict]:
    full = trainable(state)
    params, collections = trainable(state, trains), state.get("collections", {})
    of_part = (lambda p, *a: loss_fn(_fill(full, p), *a)) if trains is not None else loss_fn
    grad_fn = jax.value_and_grad(of_part, has_aux=True)
    rng = jax.random.fold_in(state["rng"], state["step"])
    if microbatches == 1:
      (_, sums), grads = grad_fn(params, batch, rng, collections, *frozen)
    else:
      # Microbatch i is the rows i, M + i, 2M + i, ...: with the batch sharded over the data
      # axes each microbatch holds an equal part of every shard's rows, so splitting moves
      # nothing (and the split is models.pipeline's, whose schedule runs the same microbatches).
      mbs = jax.tree.map(
        lambda x: jnp.swapaxes(
          x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1
        ),
        batch,
      )

      def accumulate(carry, i_mb):
        i, mb = i_mb
        (_, s), g = grad_fn(params, mb, jax.random.fold_in(rng, i), collections, *frozen)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      mb0 = jax.tree.map(lambda x: x[0], mbs)
      (_, sums0), grads0 = jax.eval_shape(grad_fn, params, mb0, rng, collections, *frozen)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, sums0))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), mbs))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt = tx.update(grads, state["opt"], params)
    # A step whose loss or gradients are not finite changes nothing but the step count; once
    # the count is over max_nonfinite, a step changes nothing (`live` is false).
    finite = jnp.isfinite(grad_norm) & jnp.all(
      jnp.array([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(sums)])
    )
    live = jnp.bool_(True)
    if max_nonfinite is not None and "nonfinite" in state:
      live = state["nonfinite"]["count"] <= max_nonfinite
    apply = finite & live
    new_params = optax.apply_updates(params, updates)
    new_params = jax.tree.map(lambda n, o: jnp.where(apply, n, o), new_params, params)
    new_state = _with_trainable(
      state, _fill(full, new_params) if trains is not None else new_params
    )
    new_state["step"] = state["step"] + live.astype(state["step"].dtype)
    new_state["opt"] = jax.tree.map(lambda n, o: jnp.where(apply, n, o), opt, state["opt"])
    metrics = {k: v / weight for k, v in sums.items() if k != "weight"}
    metrics["weight"] = sums["weight"]
    metrics["grad_norm"] = grad_norm
    if "nonfinite" in state:  # {"count", "first", "last"}: the skipped steps, for the loop's policy
      n = state["nonfinite"]
      counted = ~finite & live
      bad = jnp.where(counted, 1, 0).astype(n["count"].dtype)
      done = state["step"] + 1  # numbered as metrics.jsonl numbers steps
      at = jnp.where(counted, done, n["last"])
      first = jnp.where((n["count"] == 0) & ~finite, done, n["first"])
      new_state["nonfinite"] = {"count": n["count"] + bad, "first": first, "last": at}
      metrics["nonfinite_steps"] = new_state["nonfinite"]["count"]
    return new_state, metrics

  return step


def jit_with_mesh(
  fn: Callable, mesh: jax.sharding.Mesh, rules, *, in_shardings, out_shardings, donate_argnums=()
) -> Callable:
  """`jax.jit` with explicit shardings, traced and run with the mesh and rules in context.

  The context is what turns the model's `nn.with_logical_constraint` calls into real
  sharding constraints; outside it they are no-ops.
  """
  jitted = jax.jit(
    fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums
  )

  def run(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args)

  run.lower = lambda *args: _lower(jitted, mesh, rules, *args)
  return run


def _lower(jitted, mesh, rules, *args):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jitted.lower(*args)
