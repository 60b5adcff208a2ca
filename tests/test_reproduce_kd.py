"""The low-data setting of the `kd` table (train.data_batches) and its arms; no training."""

import numpy as np
import pytest

from experiments import experiment, reproduce
from experiments.configs import lm
from experiments.tables import kd


def _batches(config, steps, split):
  exp = experiment.build(config)
  return [{k: np.asarray(v) for k, v in exp.batch(s, split).items()} for s in steps]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_data_batches_repeats_train_batches_only():
  k = 3
  base = lm.get_config("tiny")
  low = lm.get_config("tiny")
  low.train.data_batches = k
  train = _batches(low, range(2 * k + 1), "train")
  for s in range(k + 1):
    assert _equal(train[s], train[s + k]), s
  assert not _equal(train[0], train[1])
  fresh = _batches(base, range(k + 1), "train")
  assert all(_equal(train[s], fresh[s]) for s in range(k))  # the first K are the usual ones
  assert not _equal(train[k], fresh[k])
  assert all(
    _equal(a, b) for a, b in zip(_batches(low, range(4), "eval"), _batches(base, range(4), "eval"))
  )


def test_negative_data_batches_is_refused():
  c = lm.get_config("tiny")
  c.train.data_batches = -1
  with pytest.raises(ValueError, match="data_batches"):
    experiment.build(c)


@pytest.mark.parametrize("scale", reproduce.SCALES)
def test_kd_arms_build(scale, tmp_path):
  arms = kd.arms(scale)
  names = [a.name for a in arms]
  assert len(set(names)) == len(names)
  jobs = reproduce._jobs("kd", arms, str(tmp_path), seeds=2)  # every teacher is an arm
  low = [j for j in jobs if j["config"].train.data_batches]
  assert low and all(j["config"].task == "lm" for j in low)
