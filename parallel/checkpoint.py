"""Orbax checkpoints of the whole train state, saved and restored where the shards live.

Saves are asynchronous (training continues while the previous state is written) and
atomic: orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint as the latest complete one (the
temporary directory is logged and removed). A complete checkpoint that does not read back
(a disk fault, files deleted by hand) is moved to `<directory>.unreadable/` and the one
before it is restored, loudly; when none reads back the run stops with the error, never
restarting from step 0. With `digest=True` each checkpoint also holds a digest of every
array (parallel/digest.py), compared after the restore: a bit flipped on disk that still
decodes makes the checkpoint unreadable too, instead of a silently different state.
"""

import contextlib
import os
import shutil
from typing import Any

from absl import logging
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from parallel import digest as digest_lib

PyTree = Any


class CheckpointError(OSError):
  """A save that cannot complete (the disk is full): names the step, the path and the space."""


def _free_bytes(directory: str) -> int:
  while not os.path.exists(directory):  # the checkpoint directory is made by the first save
    directory = os.path.dirname(directory)
  return shutil.disk_usage(directory).free


def _mb(n: int) -> str:
  return f"{n / 2**20:,.1f} MB"


def _items():
  """A checkpoint's items: the state, and (optionally) the digest of its arrays. A checkpoint
  written before digests existed holds "default" alone and restores unverified."""
  return {"default": ocp.StandardCheckpointHandler(), "digest": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """A thin CheckpointManager that keeps the last `keep` checkpoints; the caller picks the steps."""

  def __init__(
    self, directory: str, *, keep: int = 3, async_save: bool = True, digest: bool = True
  ):
    self.directory, self.digest = os.path.abspath(directory), digest
    self._in_flight = None  # the step of the save started last, until it is known complete
    if jax.process_index() == 0 and (partial := incomplete(self.directory)):
      logging.warning(
        "Ignoring (and removing) %d checkpoint(s) whose save was interrupted in %s: %s",
        len(partial),
        self.directory,
        ", ".join(partial),
      )
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers=_items(),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree) -> bool:
    """Starts saving `state` as `step` (asynchronously), once the disk has room for it: a
    save that cannot fit is refused before it writes anything, naming the space it needs."""
    needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    free = _free_bytes(self.directory)
    if free < needed * 1.05 + 2**20:  # the arrays, plus metadata and the digest
      self.wait()  # the save in flight, if any, completes (or reports its own failure)
      raise CheckpointError(
        f"No room for the checkpoint of step {step} in {self.directory}: it needs about "
        f"{_mb(needed)}, {_mb(free)} are free. The latest complete checkpoint is step "
        f"{self.latest_step()}. Free space or point --workdir at a larger disk, then rerun."
      )
    items = {"default": ocp.args.StandardSave(state)}
    if self.digest:
      items["digest"] = ocp.args.JsonSave(digest_lib.digest(state))
    with self._reporting():  # an earlier asynchronous save's failure surfaces here
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._in_flight = step
    return saved

  @contextlib.contextmanager
  def _reporting(self):
    """Turns the failure of the save in flight (orbax reports it at the next call) into one
    CheckpointError naming that save's step, the path and the free space."""
    try:
      yield
    except Exception as error:
      if self._in_flight is None:
        raise
      step, self._in_flight = self._in_flight, None
      reason = (str(error).strip().splitlines() or [""])[0][:400]
      raise CheckpointError(
        f"The checkpoint save of step {step} in {self.directory} failed "
        f"({type(error).__name__}: {reason}); {_mb(_free_bytes(self.directory))} are free. "
        f"The latest complete checkpoint is step {self.manager.latest_step()}."
      ) from None

  def _read(self, step: int, target: PyTree) -> tuple[PyTree, dict | None]:
    """(the state at `step`, its saved digest or None): this process's reads only."""
    has_digest = "digest" in (self.manager.item_metadata(step) or {})
    items = {"default": ocp.args.StandardRestore(target)}
    if has_digest:
      items["digest"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["default"], restored["digest"] if has_digest else None

  @staticmethod
  def _verify(step: int, state: PyTree, saved: dict | None):
    """Raises when `state` differs from its saved digest (computing it is a collective: every
    process calls this, or none does)."""
    if saved is None:
      return
    bad = digest_lib.mismatches(saved, digest_lib.digest(state))
    if bad:
      raise ValueError(
        f"step {step} does not match its digest in {len(bad)} array(s) ({', '.join(bad[:3])}"
        f"{' ...' if len(bad) > 3 else ''}): the files changed after the save"
      )

  def _restore(self, step: int, target: PyTree) -> PyTree:
    """The state at `step`, verified against its digest when it has one; with several
    processes, an error on any one is an error on all (they go on from the same step)."""
    try:
      state, saved = self._read(step, target)
    except Exception as e:
      _agree(False, step, "read")
      raise e
    _agree(True, step, "read")
    try:
      self._verify(step, state, saved)
    except Exception as e:
      _agree(False, step, "verify")
      raise e
    _agree(True, step, "verify")
    return state

  def restore_latest(self, target: PyTree) -> tuple[PyTree, int]:
    """(state, step) from the newest checkpoint that reads back onto `target`.

    Newer ones that fail to read while an older one reads are moved aside to
    `<directory>.unreadable/<step>` (kept for inspection; the run continues from the older
    one). When none reads, the newest's error is raised and nothing is moved: a checkpoint
    that does not fit `target` (another model or optimizer) is not a damaged one.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"No complete checkpoint in {self.directory}.")
    failed = []
    for step in steps:
      error = None
      try:
        state = self._restore(step, target)
      except Exception as e:  # any failure to read: try the one before, then say so
        error = e
      if error is not None:
        logging.error(
          "Checkpoint %d in %s does not read back: %s: %s",
          step,
          self.directory,
          type(error).__name__,
          error,
        )
        failed.append((step, error))
        continue
      if failed:
        self._set_aside([f for f, _ in failed])
        logging.warning(
          "Resumed from step %d, the newest checkpoint that reads back; the unreadable "
          "one(s) at step(s) %s were moved to %s.unreadable/",
          step,
          [f for f, _ in failed],
          self.directory,
        )
      else:
        logging.info("Restored the checkpoint at step %d from %s", step, self.directory)
      return state, step
    step, error = failed[0]
    raise RuntimeError(
      f"No checkpoint in {self.directory} reads back (steps {steps}); the newest, step {step}, "
      f"failed with {type(error).__name__}: {error}. If the model or optimizer config changed, "
      "restore it; if the files are damaged, move the directory away to start over."
    ) from error

  def _set_aside(self, steps: list[int]):
    if jax.process_index() == 0:
      aside = self.directory + ".unreadable"
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        dest, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dest):
          dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
        os.replace(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("trimformer: unreadable checkpoints set aside")
    self.manager.reload()

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """Restores onto `target`: ShapeDtypeStructs whose shardings say where each shard goes."""
    step = self.latest_step() if step is None else step
    logging.info("Restoring checkpoint at step %d from %s", step, self.directory)
    return self._restore(step, target)

  def wait(self):
    with self._reporting():
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    """Closes, waiting for a save in flight, also when the caller failed: then a failure to
    close is logged, not raised, so the caller's error arrives alone."""
    if kind is None:
      self.close()
      return False
    try:
      self.close()
    except Exception as e:  # e.g. the disk filled up: the save in flight is not complete
      if not isinstance(error, CheckpointError):  # else that save's failure was the error
        logging.error("The checkpoint save in flight did not complete: %s", e)
    return False


def _agree(ok: bool, step: int, what: str):
  """With several processes: raises on every process unless `ok` on all of them, so they go
  on from the same step (and the collectives that follow match)."""
  if jax.process_count() > 1 and not multihost_utils.process_allgather(np.array(ok)).all() and ok:
    raise RuntimeError(f"another process could not {what} step {step}")


def incomplete(directory: str) -> list[str]:
  """The checkpoints in `directory` whose save never finished: orbax's temporary directories."""
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n)


def _reader(directory: str):
  """A read-only manager; `metadata` and `read` below take the state item from it."""
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    item_handlers={"default": ocp.PyTreeCheckpointHandler(), "digest": ocp.JsonCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(read_only=True),
  )


def latest_step(directory: str) -> int | None:
  """The step of the latest complete checkpoint in `directory` (None: none, or no directory)."""
  if not os.path.isdir(directory):
    return None
  manager = _reader(directory)
  step = manager.latest_step()
  manager.close()
  return step


def _open(directory: str, step: int | None, hint: str):
  """(read-only manager, step) of the run saved in `directory`; a clear error when empty."""
  manager = _reader(directory)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {directory}: {hint}")
  return manager, step


def metadata(manager, step: int):
  """The saved state's tree of array metadata (shapes, dtypes) at `step`."""
  return manager.item_metadata(step)["default"]


def read(manager, step: int, args) -> dict:
  """The saved state at `step`, as `args` (an ocp.args.PyTreeRestore) asks."""
  return manager.restore(step, args=ocp.args.Composite(default=args))["default"]


def _restore(manager, step: int, abstract: dict) -> dict:
  """The items of `abstract` ({"params": {...}, ...}: ShapeDtypeStructs with shardings),
  restored straight into their shardings; the rest of the checkpoint is not read."""
  return read(
    manager,
    step,
    ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True,
    ),
  )


def _abstract(flat: dict) -> dict:
  return _nest(
    {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in flat.items()}
  )


def load_params(directory: str, target: PyTree, step: int | None = None) -> PyTree:
  """Initializes from another run: its checkpointed params overwrite `target`'s matching leaves.

  Leaves present in both, at the same path with the same shape (e.g. the embeddings and
  layers of an MLM-pretrained encoder, or a float model's weights under QAT), are restored
  straight into `target`'s shardings; the rest of `target` (a new classification head,
  learned quantization step sizes) keeps its initialization.
  """
  manager, step = _open(directory, step, "run that experiment first, or unset init_from.")
  saved = _leaves(metadata(manager, step)["params"])
  wanted = _leaves(target)
  common = {
    k: v for k, v in wanted.items() if k in saved and tuple(saved[k].shape) == tuple(v.shape)
  }
  if not common:
    raise ValueError(
      f"The checkpoint in {directory} shares no parameters with this model "
      f"(saved: {sorted(saved)[:8]}...; here: {sorted(wanted)[:8]}...)."
    )
  loaded = _leaves(_restore(manager, step, {"params": _abstract(common)})["params"])
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


def load_variables(directory: str, target: dict, step: int | None = None) -> dict:
  """Items of a saved train state, e.g. {"params", "collections"} of a distillation teacher,
  restored exactly: every leaf of `target` (arrays or ShapeDtypeStructs with shardings)
  must be in the checkpoint with the same shape. The optimizer state is never read."""
  manager, step = _open(directory, step, "run that experiment first.")
  meta = metadata(manager, step)
  saved = {k: _leaves(meta[k]) if k in meta else {} for k in target}
  wanted = {k: _leaves(v) for k, v in target.items()}
  bad = [
    f"{k}/{p}: here {tuple(v.shape)}, saved {tuple(saved[k][p].shape) if p in saved[k] else None}"
    for k in target
    for p, v in wanted[k].items()
    if p not in saved[k] or tuple(saved[k][p].shape) != tuple(v.shape)
  ]
  if bad:
    raise ValueError(
      f"The checkpoint in {directory} (step {step}) does not hold this model: "
      f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Check the model config "
      "that describes it."
    )
  restored = _restore(manager, step, {k: _abstract(v) for k, v in wanted.items() if v})
  manager.close()
  logging.info("Loaded %s from %s step %d", sorted(target), directory, step)
  return {k: restored.get(k, {}) for k in target}


def _leaves(tree) -> dict:
  """{"a/b/c": leaf} of a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = leaf
  return out


def _nest(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")
