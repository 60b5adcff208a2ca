"""Checkpoint digests (parallel/digest.py): the same under any sharding, changed by any one
flipped bit, and checked on restore: a flipped bit on disk that still decodes is caught."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel import checkpoint, digest


def _state():
  k = jax.random.split(jax.random.key(0), 3)
  return {
    "params": {
      "w": jax.random.normal(k[0], (16, 24)),
      "emb": jax.random.normal(k[1], (8, 16)).astype(jnp.bfloat16),
    },
    "mask": jax.random.uniform(k[2], (16, 24)) > 0.5,
    "step": jnp.int32(7),
    "rng": jax.random.key(3),
  }


def test_digest_is_the_same_under_any_sharding():
  state = _state()
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  w = state["params"]["w"]
  for spec in (P("a", "b"), P("b", None), P(None, ("a", "b"))):
    sharded = {
      **state,
      "params": {**state["params"], "w": jax.device_put(w, NamedSharding(mesh, spec))},
    }
    assert digest.digest(sharded) == digest.digest(state)


@pytest.mark.parametrize("leaf", ["params/w", "params/emb", "mask"])
def test_one_flipped_bit_changes_the_leaf_digest_alone(leaf):
  state = _state()
  before = digest.digest(state)
  keys = leaf.split("/")
  x = np.array(state[keys[0]] if len(keys) == 1 else state[keys[0]][keys[1]])
  if x.dtype == bool:
    x.reshape(-1)[5] ^= True
  else:
    u = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)
    u.reshape(-1)[5] ^= 1 << 3
  flipped = jax.tree.map(lambda a: a, state)
  if len(keys) == 1:
    flipped[keys[0]] = jnp.asarray(x)
  else:
    flipped[keys[0]] = {**state[keys[0]], keys[1]: jnp.asarray(x)}
  assert digest.mismatches(before, digest.digest(flipped)) == [leaf]
  # Two equal elements swapped would cancel in a plain sum: the position is hashed in too.
  assert digest.digest({"a": jnp.array([1.0, 2.0])}) != digest.digest({"a": jnp.array([2.0, 1.0])})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _flip_a_byte(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/default/**/d/*", recursive=True)]
  big = max(files, key=os.path.getsize)
  data = bytearray(open(big, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(big, "wb").write(bytes(data))


def test_a_flipped_bit_on_disk_falls_back_to_the_checkpoint_before(tmp_path):
  state, later = _state(), {**_state(), "step": jnp.int32(8)}
  d = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(d) as c:
    c.save(1, state)
    c.wait()
    c.save(2, later)
  _flip_a_byte(f"{d}/2")
  with checkpoint.Checkpointer(d) as c:
    restored, step = c.restore_latest(_abstract(state))
  assert step == 1 and os.listdir(d + ".unreadable") == ["2"]
  assert digest.digest(restored) == digest.digest(state)


def test_without_a_digest_the_flip_goes_unnoticed_and_old_checkpoints_restore(tmp_path):
  """What the digest buys: the same damage restores silently as a different state. And a
  checkpoint written before digests existed (one "default" item) still restores."""
  state = _state()
  d = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(d, digest=False) as c:
    c.save(1, state)
  _flip_a_byte(f"{d}/1")
  with checkpoint.Checkpointer(d) as c:
    restored, step = c.restore_latest(_abstract(state))
  assert step == 1 and digest.digest(restored) != digest.digest(state)

  old = str(tmp_path / "old")
  with ocp.CheckpointManager(old) as manager:  # the layout before digests
    manager.save(4, args=ocp.args.StandardSave(state))
  with checkpoint.Checkpointer(old) as c:
    restored, step = c.restore_latest(_abstract(state))
  assert step == 4 and digest.digest(restored) == digest.digest(state)
