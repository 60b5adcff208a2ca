"""Meshes, logical-axis rules, sharded init, the jitted train step, checkpoints and preemption.

`parallel` takes plain values: a loss function, pytrees, axis rules. It never imports
`models`, `compress` or `experiments`.
"""

from parallel import flops
from parallel.checkpoint import CheckpointError, Checkpointer, load_params, load_variables
from parallel.preemption import Preempted, Preemption
from parallel.mesh import MESH_AXES, RULES, get_rules, make_mesh, resolve_mesh_shape
from parallel.sharding import (
  abstract_with_shardings,
  batch_sharding,
  init_sharded,
  logical_to_shardings,
  shard_shapes,
)
from parallel.step import jit_with_mesh, make_train_step, trainable

__all__ = [
  "flops",
  "CheckpointError",
  "Checkpointer",
  "load_params",
  "load_variables",
  "MESH_AXES",
  "RULES",
  "get_rules",
  "make_mesh",
  "resolve_mesh_shape",
  "abstract_with_shardings",
  "batch_sharding",
  "init_sharded",
  "logical_to_shardings",
  "shard_shapes",
  "jit_with_mesh",
  "make_train_step",
  "trainable",
  "Preempted",
  "Preemption",
]
