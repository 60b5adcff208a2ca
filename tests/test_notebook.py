"""experiments/notebooks/trimformer_tour.ipynb: a valid notebook whose code cells, run in order
as plain Python with its parameters shrunk, train every model of the tour and report on them."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

NOTEBOOK = os.path.join(
  os.path.dirname(__file__), "..", "experiments", "notebooks", "trimformer_tour.ipynb"
)

# The tour at test size: 12 steps of 8 x 32 tokens a run (mask updates at steps 2 to 8), one eval
# batch of 8 sequences, one device. Most of the time goes to compiling each run's programs.
SMALL = dict(STEPS=12, BATCH_SIZE=8, SEQ_LEN=32, EVAL_STEPS=1, EVAL_BATCH_SIZE=8)


def load():
  with open(NOTEBOOK) as f:
    return json.load(f)


def source(cell) -> str:
  return "".join(cell["source"])


def run_cell(cell, namespace, index):
  exec(compile(source(cell), f"<notebook cell {index}>", "exec"), namespace)


def test_notebook_is_valid_nbformat_4():
  nb = load()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict)
  ids = set()
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code"), cell
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
    if nb["nbformat_minor"] >= 5:  # 4.5 gives every cell a unique id
      assert cell["id"] not in ids
      ids.add(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, "outputs not cleared"
      assert not any(line.lstrip().startswith(("!", "%")) for line in cell["source"]), cell
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
  assert len(tagged) == 1, "exactly one code cell tagged 'parameters'"
  assert code[0] is not tagged[0]  # the install cell comes first


def test_install_cell_asks_for_a_source(monkeypatch, tmp_path):
  """Outside a clone, with trimformer not importable and TRIMFORMER_SOURCE empty, the first cell
  says what to set and installs nothing."""
  install = next(c for c in load()["cells"] if c["cell_type"] == "code")
  monkeypatch.setitem(sys.modules, "experiments", None)  # `import experiments` fails
  monkeypatch.chdir(tmp_path)
  calls = []
  monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append(a))
  with pytest.raises(RuntimeError, match="TRIMFORMER_SOURCE"):
    run_cell(install, {"__name__": "__main__"}, 0)
  assert calls == []


def test_install_cell_installs_the_clone(monkeypatch, tmp_path):
  """Inside a clone (../../pyproject.toml of trimformer), the first cell pip-installs it."""
  install = next(c for c in load()["cells"] if c["cell_type"] == "code")
  (tmp_path / "pyproject.toml").write_text('[project]\nname = "trimformer"\n')
  notebooks = tmp_path / "experiments" / "notebooks"
  notebooks.mkdir(parents=True)
  monkeypatch.setitem(sys.modules, "experiments", None)
  monkeypatch.chdir(notebooks)
  monkeypatch.setattr(sys, "path", list(sys.path))
  calls = []
  monkeypatch.setattr(subprocess, "check_call", lambda args, **k: calls.append(args))
  with pytest.raises(RuntimeError, match="restart the runtime"):  # still blocked by the patch
    run_cell(install, {"__name__": "__main__"}, 0)
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(tmp_path)]]


def test_notebook_runs(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("MPLBACKEND", "Agg")
  import matplotlib

  matplotlib.use("Agg")  # in case pyplot was imported before the variable was set
  namespace = {"__name__": "__main__"}
  params_seen = False
  for i, cell in enumerate(load()["cells"]):
    if cell["cell_type"] != "code":
      continue
    run_cell(cell, namespace, i)
    if "parameters" in cell["metadata"].get("tags", []):
      overrides = dict(SMALL, WORKDIR=str(tmp_path), DEVICES=jax.devices()[:1])
      missing = set(overrides) - set(namespace)
      assert not missing, f"the parameters cell does not define {missing}"
      namespace.update(overrides)
      params_seen = True
  assert params_seen
  ns = namespace
  print(capsys.readouterr().out)  # with -s: the notebook's table

  rows = {k: ns[k] for k in ("float_row", "qat_row", "ptq_row", "prune_row", "kd_row", "all_row")}
  for name, row in rows.items():
    losses = {k: v for k, v in row.items() if k.endswith("loss")}
    assert "excess_loss" in losses, (name, row)
    assert all(math.isfinite(v) for v in losses.values()), (name, losses)
  for name in ("qat_row", "ptq_row", "all_row"):
    row = rows[name]
    assert math.isfinite(row["serve_excess_loss"]), name
    assert 0 < row["export_bytes"] < row["float32_bytes"], (name, row)
  # 4-bit weights take less room than 8-bit ones
  assert ns["ptq_row"]["export_bytes"] < ns["qat_row"]["export_bytes"]
  assert ns["prune_row"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
  assert ns["prune_row"]["sparse_bytes"] < ns["prune_row"]["float32_bytes"]
  assert ns["all_row"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
  # the notebook's float32 sizes are those the runs report
  assert ns["float32_bytes"](ns["float_config"]) == ns["qat_row"]["float32_bytes"]
  assert ns["float32_bytes"](ns["kd_config"]) == ns["all_row"]["float32_bytes"]
  # the students distilled from the float model's run, not a teacher trained anew
  assert not os.path.exists(tmp_path / "distilled" / "teacher")

  assert len(ns["results"]) == 6
  assert all(math.isfinite(e) and b > 0 for _, e, b in ns["results"])
  table = ns["table"]
  assert table.count("\n") == 7 and "% of float32" in table
  assert os.path.getsize(tmp_path / "tour.png") > 0
