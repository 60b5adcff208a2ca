"""Tests run on CPU with 8 fake devices, so sharded code paths run everywhere."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()


@pytest.fixture
def no_compile(monkeypatch):
  """Makes any jax.jit call fail: for checks that bad input is rejected before compiling."""
  import jax

  def fail(*args, **kwargs):
    raise AssertionError("compiled before rejecting bad input")

  monkeypatch.setattr(jax, "jit", fail)
