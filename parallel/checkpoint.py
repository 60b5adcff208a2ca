"""Orbax checkpoints of the whole train state, saved and restored where the shards live.

Saves are asynchronous (training continues while the previous state is written) and
atomic: orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint as the latest complete one.
"""

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """A thin CheckpointManager that keeps the last `keep` checkpoints; the caller picks the steps."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores onto `target`: ShapeDtypeStructs whose shardings say where each shard goes."""
    step = self.latest_step() if step is None else step
    logging.info("Restoring checkpoint at step %d from %s", step, self.directory)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(directory: str, target: PyTree, step: int | None = None) -> PyTree:
  """Initializes from another run: its checkpointed params overwrite `target`'s matching subtrees.

  Top-level subtrees present in both with equal shapes (e.g. the embeddings and layers of
  an MLM-pretrained encoder) are restored straight into `target`'s shardings; the rest of
  `target` (e.g. a new classification head) keeps its initialization.
  """
  manager = ocp.CheckpointManager(
    os.path.abspath(directory),
    item_handlers=ocp.PyTreeCheckpointHandler(),
    options=ocp.CheckpointManagerOptions(read_only=True),
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(
      f"No checkpoint to initialize from in {directory}: run that "
      "experiment first, or unset init_from."
    )
  saved = manager.item_metadata(step)["params"]
  shape = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
  common = {k: v for k, v in target.items() if k in saved and shape(saved[k]) == shape(v)}
  if not common:
    raise ValueError(
      f"The checkpoint in {directory} shares no parameters with this model "
      f"(saved: {sorted(saved)}; here: {sorted(target)})."
    )
  item = {
    "params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), common
    )
  }
  restored = manager.restore(
    step,
    args=ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    ),
  )
  skipped = sorted(set(target) - set(common))
  logging.info(
    "Initialized %s from %s step %d; kept fresh: %s", sorted(common), directory, step, skipped
  )
  manager.close()
  return {**target, **restored["params"]}
