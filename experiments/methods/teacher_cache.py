"""The teacher's top-k logits, cached on disk once before training (`distill.cache=True`),
so the distillation step reads them from the batch instead of running the teacher.

    part = teacher_cache.cache_top_k(exp, teacher, teacher_variables, "<workdir>/teacher_top_k")
    task = teacher_cache.with_cache(exp.task, part)  # train batches + "teacher_values/indices"
"""

import dataclasses
import json
import os
import shutil
import time

from absl import logging
import jax
import numpy as np

from compress import distill
import parallel


def cache_top_k(exp, teacher, teacher_vars, directory: str) -> str:
  """Runs the teacher once over the run's train batches and stores its top-k logits
  ([steps, rows, L, k] float32 values and int32 indices, this process's rows) in
  `directory`; reuses a complete cache written for the same teacher and batches. Written
  to a temporary directory and renamed when complete. Returns the part's directory."""
  config = exp.config
  index, count = parallel.sharding.process_batch_slice(exp.batch_sharding)
  t = config.train
  ckpt_step = parallel.checkpoint.latest_step(os.path.join(teacher.workdir, "checkpoints"))
  meta = dict(
    teacher=os.path.abspath(teacher.workdir),
    teacher_step=ckpt_step,
    top_k=config.distill.top_k,
    steps=t.steps,
    batch_size=t.batch_size,
    seq_len=t.seq_len,
    seed=config.seed,
    data=config.data.to_dict(),
    part=[index, count],
  )
  part = os.path.join(directory, f"part{index}of{count}")
  meta_path = os.path.join(part, "meta.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      if json.load(f) == meta:
        logging.info("Teacher top-%d logits: reusing the cache in %s", meta["top_k"], part)
        return part
    logging.info("The cache in %s is for another teacher or other batches: rebuilding it.", part)
  k, model, task = meta["top_k"], teacher.model, exp.task
  sharding = exp.batch_sharding

  def top(v, b):
    logits, _ = task.forward(model, v, b, None, False)
    return distill.teacher_top_k(logits, k)

  fn = parallel.jit_with_mesh(
    top, exp.mesh, exp.rules, in_shardings=(None, sharding), out_shardings=(sharding, sharding)
  )
  tmp = part + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  rows = t.batch_size // count
  length = 1 if config.task == "classify" else t.seq_len
  shape = (t.steps, rows, length, k)
  values = np.lib.format.open_memmap(os.path.join(tmp, "values.npy"), "w+", np.float32, shape)
  indices = np.lib.format.open_memmap(os.path.join(tmp, "indices.npy"), "w+", np.int32, shape)
  lo, start = index * rows, time.perf_counter()
  for step in range(t.steps):
    v, i = fn(teacher_vars, exp.batch(step))
    values[step], indices[step] = _local_rows(v, lo, rows), _local_rows(i, lo, rows)
    if (step + 1) % max(t.steps // 10, 1) == 0 or step + 1 == t.steps:
      logging.info(
        "Teacher top-%d cache: %d/%d steps (%.0f steps/s)",
        k,
        step + 1,
        t.steps,
        (step + 1) / (time.perf_counter() - start),
      )
  values.flush(), indices.flush()
  del values, indices
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f)
  if os.path.exists(part):  # a stale cache: replaced only once the new one is complete
    shutil.rmtree(part)
  os.replace(tmp, part)
  return part


def _local_rows(x: jax.Array, lo: int, rows: int) -> np.ndarray:
  """Rows [lo, lo + rows) of a batch-sharded global array, from this process's shards."""
  out = np.empty((rows, *x.shape[1:]), x.dtype)
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    stop = x.shape[0] if shard.index[0].stop is None else shard.index[0].stop
    a, b = max(start, lo), min(stop, lo + rows)
    if a < b:
      out[a - lo : b - lo] = np.asarray(shard.data)[a - start : b - start]
  return out


def with_cache(task, part: str):
  """`task` whose train batches also carry the cached "teacher_values" / "teacher_indices"."""
  values = np.load(os.path.join(part, "values.npy"), mmap_mode="r")
  indices = np.load(os.path.join(part, "indices.npy"), mmap_mode="r")

  def batch(step, split):
    b = task.batch(step, split)
    if split != "train":
      return b
    return {**b, "teacher_values": np.asarray(values[step]), "teacher_indices": indices[step]}

  return dataclasses.replace(task, batch=batch)
