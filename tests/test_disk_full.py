"""A full disk: the save that cannot fit is refused before it writes, naming the step, the path
and the space; a save that fails mid-write is reported once, by its own step."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from parallel import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_save_without_room_is_refused_before_writing(tmp_path, monkeypatch):
  state = {"w": jnp.ones((256, 256))}  # 256 KiB
  d = str(tmp_path / "ckpt")
  with checkpoint.Checkpointer(d) as c:
    c.save(1, state)
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda _: 100_000)
    with pytest.raises(checkpoint.CheckpointError) as e:
      c.save(2, state)
  message = str(e.value)
  assert "step 2" in message and d in message and "0.1 MB are free" in message
  assert "latest complete checkpoint is step 1" in message
  assert sorted(os.listdir(d)) == ["1"]


@pytest.fixture
def small_disk(tmp_path):
  """A 12 MB tmpfs (root only; skipped where mounting is not allowed)."""
  mount = tmp_path / "small"
  mount.mkdir()
  cmd = ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)]
  if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
    pytest.skip("cannot mount a small tmpfs here")
  yield mount
  subprocess.run(["umount", str(mount)], capture_output=True)


# The tiny LM's state is about 5.3 MB: two checkpoints fit on 12 MB, the third does not.
_TRAIN = [
  "--config=experiments/configs/lm.py:tiny",
  "--config.train.steps=40",
  "--config.train.checkpoint_every=10",
  "--config.eval.every=40",
  "--config.eval.steps=1",
]


def _train(workdir, *pre):
  cmd = [sys.executable, *pre, "-m", "experiments.train", f"--workdir={workdir}", *_TRAIN]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_full_disk_is_reported_once_at_the_save_that_does_not_fit(small_disk):
  proc = _train(small_disk / "run")
  assert proc.returncode == 1, proc.stderr[-2000:]
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and "No room for the checkpoint of step 30" in fatal[0], fatal
  assert "latest complete checkpoint is step 20" in fatal[0]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(small_disk / "run" / "checkpoints")) == ["10", "20"]
