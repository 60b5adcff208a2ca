"""Pipeline parallelism for the stacked layers: a GPipe schedule over a "stage" mesh axis.

The scanned layer stack ([n_layers, ...] leaves) splits into S stages of k = n_layers / S
contiguous layers: viewed as [S, k, ...], its leading axis sharded over the mesh's "stage"
axis, stage s holds layers s*k .. s*k + k - 1. The batch splits into M microbatches. Each of
the T = M + S - 1 iterations runs every stage once, all stages at the same time (one `vmap`
over the stage axis, `spmd_axis_name="stage"`, so each stage's devices compute their own
slot), then shifts the S slots by one stage (`jnp.roll` over the stage-sharded axis: a
collective permute between neighbouring stages). Stage s works on microbatch t - s at
iteration t, so microbatch m leaves the last stage at iteration m + S - 1 (GPipe: Huang et
al. 2019; the layout as MaxText's). The idle slots (the bubble, a fraction (S - 1) / T of
the stage-iterations) compute on copies of real microbatches and are discarded, so the
loss and its gradients (the backward runs the schedule in reverse, by autodiff) equal the
unpipelined computation.

Microbatch m is the rows m, M + m, 2M + m, ... of the batch: with the batch sharded over
the data axes, each microbatch then holds an equal slice of every data shard's rows and
splitting moves nothing.

Nothing here changes the parameters: their layout is the scanned one whatever the stages,
so a checkpoint restores on any stage count (the leading axis is resharded).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


def bubble_fraction(stages: int, microbatches: int) -> float:
  """The fraction of stage-iterations a GPipe schedule leaves idle: (S - 1) / (M + S - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def _constrain(x, *names):
  """x with its leading axes on the logical names, the rest replicated (a no-op without
  logical axis rules in context)."""
  return nn.with_logical_constraint(x, names + (None,) * (x.ndim - len(names)))


def split_microbatches(x, microbatches: int):
  """[B, ...] -> [M, B / M, ...], microbatch m the rows m, M + m, 2M + m, ..."""
  b = x.shape[0]
  x = jnp.swapaxes(x.reshape(b // microbatches, microbatches, *x.shape[1:]), 0, 1)
  return _constrain(x, None, "batch")


def merge_microbatches(x):
  """The inverse of `split_microbatches` on the two leading axes: [M, B / M, ...] -> [B, ...]."""
  x = jnp.swapaxes(x, 0, 1)
  return _constrain(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), "batch")


def stage_view(tree: PyTree, stages: int) -> PyTree:
  """Stacked layers [n, ...] -> [S, n / S, ...] (stage s: layers s*k .. s*k + k - 1)."""
  return jax.tree.map(lambda x: x.reshape(stages, x.shape[0] // stages, *x.shape[1:]), tree)


def layer_order(per_iteration: PyTree, stages: int, microbatches: int) -> PyTree:
  """Per-layer outputs as the schedule produced them, [T, S, k, B / M, ...] (iteration,
  stage, layer in stage, microbatch row), -> the unpipelined layout [n, B, ...]: stage s
  worked on microbatch m at iteration m + s."""

  def one(x):
    x_SxMxk = jnp.stack([x[s : s + microbatches, s] for s in range(stages)])
    x_SxkxM = jnp.swapaxes(x_SxMxk, 1, 2)
    x_nxM = x_SxkxM.reshape(-1, *x_SxkxM.shape[2:])  # [n, M, B / M, ...]
    return jax.vmap(merge_microbatches)(x_nxM)

  return jax.tree.map(one, per_iteration)


def gpipe(
  stage_fn: Callable,
  stage_vars: PyTree,
  inputs: tuple,
  stages: int,
  microbatches: int,
  rng: jax.Array | None = None,
):
  """Runs `stage_fn(vars_s, inputs_s, rng) -> (x_s, aux_s)` over S stages and M microbatches.

  `stage_vars` leaves are [S, ...] (one slice per stage); `inputs` is a tuple of [B, ...]
  arrays whose first is the residual stream the stages transform and the rest travel with it
  unchanged (masks, positions). Returns (x [B, ...], aux [T, S, ...]): the last stage's
  output for every row, and each stage's aux at each iteration (`layer_order` reorders
  per-layer aux). `rng` (or None): stage s at iteration t gets fold_in(rng, t * S + s).
  """
  if inputs[0].shape[0] % microbatches:
    raise ValueError(
      f"a batch of {inputs[0].shape[0]} rows does not split into {microbatches} pipeline "
      "microbatches (train.microbatches): make the batch a multiple of it."
    )
  mbs = tuple(split_microbatches(x, microbatches) for x in inputs)
  # Every slot starts as a copy of microbatch 0, so the bubble computes on real data (finite).
  slots = tuple(
    _constrain(jnp.broadcast_to(x[0], (stages, *x.shape[1:])), "stage", "batch") for x in mbs
  )
  run = jax.vmap(stage_fn, spmd_axis_name="stage")
  stage_ids = jnp.arange(stages)

  def iteration(slots, t):
    feed = tuple(x[jnp.minimum(t, microbatches - 1)] for x in mbs)
    slots = tuple(s.at[0].set(f) for s, f in zip(slots, feed))
    rngs = None if rng is None else jax.vmap(lambda s: jax.random.fold_in(rng, t * stages + s))
    rngs = None if rng is None else rngs(stage_ids)
    x, aux = run(stage_vars, slots, rngs)
    out = x[stages - 1]
    moved = (x, *slots[1:])
    moved = tuple(_constrain(jnp.roll(s, 1, axis=0), "stage", "batch") for s in moved)
    return moved, (_constrain(out, "batch"), aux)

  n_iter = microbatches + stages - 1
  _, (outs, aux) = jax.lax.scan(iteration, slots, jnp.arange(n_iter))
  return merge_microbatches(outs[stages - 1 :]), aux
