"""Tests run on CPU with 8 fake devices, so sharded code paths run everywhere.

Compiled programs are shared within a test session (each xdist worker has its own) through
JAX's persistent compilation cache in a temporary directory: a program that another test (or
another run in the same test, e.g. a resumed run) already compiled is loaded, not recompiled.
It is the same executable either way; subprocesses (tests/test_launch.py, the bench CLI)
compile on their own.

`tiny_lm_run`: one run of the tiny LM, trained once per session and read by the tests that need
a trained model (test_train, test_quant_train, test_prune_train).
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

_COMPILE_CACHE = tempfile.mkdtemp(prefix="trimformer-test-jit-")


def pytest_configure(config):
  import jax

  if not jax.config.jax_compilation_cache_dir:  # unless JAX_COMPILATION_CACHE_DIR names one
    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
  # Only programs worth reloading: small ones compile faster than they serialize.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
  shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture
def no_compile(monkeypatch):
  """Makes any jax.jit call fail: for checks that bad input is rejected before compiling."""
  import jax

  from experiments import methods

  methods.registry()  # imports every method's module (some jit at import) before the patch

  def fail(*args, **kwargs):
    raise AssertionError("compiled before rejecting bad input")

  monkeypatch.setattr(jax, "jit", fail)


TINY_LM_STEPS = 150


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory):
  """experiments/configs/lm.py:tiny trained TINY_LM_STEPS steps on one device, evaluated (2
  eval batches) and checkpointed every 50: (its workdir, the config, the last eval row).

  Shared by the tests that need a trained float model (to learn, to quantize, to prune): they
  read the workdir and must not write to it. Observed: eval_loss 3.505 (the source's unigram
  loss is 4.13, its bigram loss 3.41).
  """
  import jax

  from experiments import train
  from experiments.configs import lm

  c = lm.get_config("tiny")
  c.train.update(steps=TINY_LM_STEPS, checkpoint_every=50, log_every=25)
  c.eval.update(every=50, steps=2)
  workdir = tmp_path_factory.mktemp("tiny_lm")
  final = train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
  return workdir, c, final
