"""What a run prints (experiments/progress.py): trimformer's own lines, eval rows and progress,
not the libraries' INFO logs (`--verbose` brings them back); the same from Python; and
`--config_help`, every config key with its value and meaning."""

import io
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from experiments import progress, train
from experiments.configs import classify, describe, lm
from experiments.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/lm.py:tiny"
# 4 steps of 8 x 16 tokens, a train row every 2, one eval batch at the end.
SMALL = dict(steps=4, log_every=2, batch_size=8, seq_len=16)
SMALL_EVAL = dict(every=4, steps=1, batch_size=8)
OVERRIDES = [f"--config.train.{k}={v}" for k, v in SMALL.items()] + [
  f"--config.eval.{k}={v}" for k, v in SMALL_EVAL.items()
]
INFO = re.compile(r"^I\d{4} [\d:.]+ +\d+ (\S+):\d+\]")  # absl's INFO prefix: the file that logged
PROGRESS = re.compile(r"step 2/4: loss \d+\.\d+, \d+(\.\d+)?k? tok/s, elapsed \d+:\d\d")


def _train(*args, workdir=None, cache=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  env.update(JAX_PLATFORMS="cpu", **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}))
  cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", *OVERRIDES, *args]
  cmd += [f"--workdir={workdir}"] if workdir else []
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_prints_its_own_lines_not_the_libraries_info(tmp_path):
  """Not a terminal: a line per train row (loss, tokens/s as a plain number, elapsed) and the
  eval row; INFO only from trimformer's files. The same command again with --verbose (the
  finished run restores its checkpoint and evaluates) shows orbax's INFO too."""
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "cache")
  quiet = _train(workdir=workdir, cache=cache)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  lines = quiet.stderr.splitlines()
  assert {INFO.match(s)[1] for s in lines if INFO.match(s)} == {"train.py", "throughput.py"}
  assert any(PROGRESS.search(s) for s in lines), quiet.stderr
  assert any(re.search(r"run: step 4: eval_loss \d+\.\d+, .*excess_loss", s) for s in lines)
  assert "orbax" not in quiet.stderr and "e+0" not in quiet.stderr, quiet.stderr
  assert len(lines) < 15, quiet.stderr
  (row,) = [r for r in read_metrics(workdir) if r["step"] == 2]
  assert isinstance(row["tokens_per_sec"], float)  # the file keeps numbers, not text

  verbose = _train("--verbose", workdir=workdir, cache=cache)
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  assert "Restored the checkpoint at step 4" in verbose.stderr
  assert "checkpoint_manager.py" in verbose.stderr, verbose.stderr[-3000:]


def test_config_help_lists_every_key_and_exits():
  """--config_help without --workdir: each key, its value, its comment; nothing trains."""
  proc = _train("--config_help", "--config.optim.lr=0.01")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "optim.lr = 0.01\n" in out  # the value this command would run with
  assert re.search(r"^train\.nonfinite = 'skip'  # .*\"stop\" stops at the first", out, re.M)
  assert re.search(r"^train\.max_nonfinite = 10  # see train\.nonfinite$", out, re.M)
  assert re.search(r"^quant\.bits = 8  # weights; 0 keeps them float$", out, re.M)
  assert re.search(r"^prune\.sparsity = 0\.9  # final fraction of the selected weights", out, re.M)
  assert re.search(r"^model\.n_kv_heads = None  # None -> n_heads", out, re.M)
  assert re.search(r"^\[mesh\.dcn\]  # Multi-slice TPU", out, re.M)
  assert "First step" not in proc.stderr


def test_config_help_covers_run_sections():
  """A classifier's pretraining run (config.pretrain) is listed key by key, commented too."""
  text = describe.describe(classify.get_config("tiny"))
  assert "\npretrain.train.steps = 300\n" in text
  assert re.search(r"^pretrain\.task = 'mlm'  # \"lm\" \| \"mlm\"", text, re.M)


def test_train_and_evaluate_from_python_prints_progress(tmp_path, capfd):
  c = lm.get_config("tiny")
  c.train.update(**SMALL)
  c.eval.update(**SMALL_EVAL)
  train.train_and_evaluate(c, str(tmp_path / "py"), devices=jax.devices()[:1])
  err = capfd.readouterr().err
  assert re.search(r"py: " + PROGRESS.pattern, err), err
  assert re.search(r"py: step 4: eval_loss \d", err), err


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_terminal_gets_a_bar_with_lines_above_it():
  out = _Terminal()
  p = progress.Progress(10, desc="run", file=out)
  assert p.bar is not None
  for _ in range(10):
    p.update()
  p.status(5, "loss 1.25, 16.2k tok/s")
  p.line("step 5: eval_loss 1.5")
  p.close()
  text = out.getvalue()
  assert "10/10" in text and "loss 1.25, 16.2k tok/s" in text
  assert "run: step 5: eval_loss 1.5\n" in text
  assert progress.Progress(10, file=io.StringIO()).bar is None  # a file: lines


@pytest.mark.parametrize(
  "value, shown",
  [(16234.5, "16.2k"), (1242.0, "1.24k"), (3.2e9, "3.20G"), (4.1953, "4.195"), (1024, "1,024")],
)
def test_numbers_are_plain(value, shown):
  assert progress.number(value) == shown


def test_metrics_rows_stay_numbers(tmp_path):
  from experiments.metrics import MetricWriter

  w = MetricWriter(str(tmp_path), 0, 2)
  w.write(1, {"loss": 1.5, "tokens_per_sec": 16234.5}, train=True)
  w.close()
  (row,) = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert row == {"step": 1, "loss": 1.5, "tokens_per_sec": 16234.5}
