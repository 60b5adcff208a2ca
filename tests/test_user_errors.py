"""A user's mistake is one message naming the key or file and the fix, raised before anything
compiles; `python -m experiments.train` prints it as one FATAL line and no traceback."""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import train
from experiments.configs import common, lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_dir(tmp_path, text):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text(text)
  return f"hf:{d}"


@pytest.mark.parametrize(
  "override, message",
  [
    (
      {"prune.method": "oneshot", "prune.sparsity": 1.5},
      r"prune\.sparsity=1\.5 must be in \[0, 1\)",
    ),
    ({"quant.method": "qat", "quant.bits": 1}, r"quant\.bits=1 must be 0 \(float\) or an integer"),
    ({"quant.method": "qat", "quant.act_bits": 9}, r"quant\.act_bits=9"),
    (
      {"mesh.data": 16},
      r"uses 16 devices but 8 are available.*xla_force_host_platform_device_count",
    ),
    (
      {"mesh.data": 1, "mesh.tensor": -1, "model.n_heads": 2, "model.d_model": 64},
      r"^params/layers_0/attn/\w+/\w+ has shape .*mesh\.tensor=8",
    ),
    ({"init_from": "BAD_JSON"}, r"hf/config\.json is not valid JSON"),
    ({"init_from": "UNKNOWN_ARCH"}, r"Unsupported architecture 'FooForCausalLM'"),
  ],
)
def test_bad_input_is_a_config_error_naming_the_key(tmp_path, override, message):
  c = lm.get_config("tiny")
  for key, value in override.items():
    if value == "BAD_JSON":
      value = _hf_dir(tmp_path, "{not json")
    elif value == "UNKNOWN_ARCH":
      value = _hf_dir(tmp_path, json.dumps({"architectures": ["FooForCausalLM"]}))
    node = c
    for part in key.split(".")[:-1]:
      node = node[part]
    node[key.split(".")[-1]] = value
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_workdir_that_is_a_file_or_not_writable(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(train.ConfigError, match=r"is a file: give a directory"):
    train.train_and_evaluate(lm.get_config("tiny"), str(tmp_path / "file"))
  if os.geteuid() != 0:  # root may write anywhere
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(train.ConfigError, match=r"is not writable"):
      train.train_and_evaluate(lm.get_config("tiny"), str(ro / "run"))


def test_a_damaged_config_json_in_the_workdir_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"model": ')
  with pytest.raises(train.ConfigError, match=r"config\.json is not valid JSON"):
    train.train_and_evaluate(lm.get_config("tiny"), str(tmp_path))


def test_aliases_find_the_key_meant():
  keys = common.schema()
  assert common.closest("optim.learning_rate", keys) == ["optim.lr"]
  assert common.closest("model.num_layers", keys) == ["model.n_layers"]
  assert common.closest("train.max_steps", keys) == ["train.steps"]
  assert common.closest("optim.lrr", keys) == ["optim.lr"]  # a typo: the closest name


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config=experiments/configs/nope.py"],
      r"no file experiments/configs/nope.py\. Config "
      r"files: .*experiments/configs/lm\.py",
    ),
    (["--config=experiments/configs/lm.py:huge"], r"unknown preset 'huge': choose one of"),
    (
      ["--config=experiments/configs/lm.py:tiny", "--config.optim.learning_rate=1"],
      r"did you mean --config\.optim\.lr\?",
    ),
    (
      [
        "--config=experiments/configs/lm.py:tiny",
        "--config.quant.bits=1",
        "--config.quant.method=qat",
      ],
      r"quant\.bits=1 must be",
    ),
  ],
)
def test_the_command_line_says_it_in_one_line(tmp_path, args, message):
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *args]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("FATAL: "), last
  assert re.search(message, last), last


def test_a_config_without_its_arg_says_which_preset_it_took(capsys):
  from experiments import configs

  configs.check_overrides(["train", "--config=experiments/configs/lm.py"])
  assert "the 'tiny' model preset (experiments/configs/lm.py:tiny)" in capsys.readouterr().err
