"""A rerun with a changed config: refused on a finished run (it would train nothing), recorded
in config.json's history when training goes on, so config.json never claims what did not train."""

import json

import pytest

from experiments import train
from experiments.configs import lm


def tiny(steps, lr=3e-3):
  c = lm.get_config("tiny")
  c.train.update(steps=steps, checkpoint_every=2, log_every=1, batch_size=8, seq_len=16)
  c.eval.update(every=steps, steps=1, batch_size=8)
  c.optim.lr = lr
  return c


def test_changed_config_is_refused_when_finished_and_recorded_when_continued(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny(2), workdir)

  with pytest.raises(ValueError, match=r"finished at step 2.*optim\.lr: 0\.003 -> 0\.001"):
    train.train_and_evaluate(tiny(2, lr=1e-3), workdir)
  assert json.load(open(tmp_path / "config.json"))["optim"]["lr"] == 3e-3  # untouched

  c = tiny(2)
  c.train.log_every = 5  # how the run is carried out: any rerun may change it
  train.train_and_evaluate(c, workdir)

  train.train_and_evaluate(tiny(4, lr=1e-3), workdir)  # more steps: the change goes on
  written = json.load(open(tmp_path / "config.json"))
  assert written["optim"]["lr"] == 1e-3 and written["train"]["steps"] == 4
  changes = [h for h in written["history"] if "optim.lr" in h["changes"]]
  assert len(changes) == 1 and changes[0]["step"] == 2
  assert changes[0]["changes"]["optim.lr"] == [3e-3, 1e-3]
  assert changes[0]["changes"]["train.steps"] == [2, 4]
