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
  """Initializes from another run: its checkpointed params overwrite `target`'s matching leaves.

  Leaves present in both, at the same path with the same shape (e.g. the embeddings and
  layers of an MLM-pretrained encoder, or a float model's weights under QAT), are restored
  straight into `target`'s shardings; the rest of `target` (a new classification head,
  learned quantization step sizes) keeps its initialization.
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
  saved = _leaves(manager.item_metadata(step)["params"])
  wanted = _leaves(target)
  common = {
    k: v for k, v in wanted.items() if k in saved and tuple(saved[k].shape) == tuple(v.shape)
  }
  if not common:
    raise ValueError(
      f"The checkpoint in {directory} shares no parameters with this model "
      f"(saved: {sorted(saved)[:8]}...; here: {sorted(wanted)[:8]}...)."
    )
  abstract = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in common.items()
  }
  item = {"params": _nest(abstract)}
  restored = manager.restore(
    step,
    args=ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    ),
  )
  loaded = _leaves(restored["params"])
  fresh = sorted({k.split("/")[0] for k in wanted if k not in common})
  logging.info(
    "Initialized %d of %d parameter arrays from %s step %d; kept fresh (in): %s",
    len(common),
    len(wanted),
    directory,
    step,
    fresh,
  )
  manager.close()
  return _nest({**wanted, **loaded})


def _leaves(tree) -> dict:
  """{"a/b/c": leaf} of a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return out


def _nest(flat: dict) -> dict:
  out = {}
  for key, leaf in flat.items():
    *parents, last = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out
