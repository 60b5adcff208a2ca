"""experiments.reproduce: each table's smallest arm end to end, every table's report from
made-up results, skipping finished runs, and the claim arithmetic."""

import json
import math
import os

import jax
import numpy as np
import pytest

from experiments import reproduce
from experiments.tables import Results

# The arm each table runs end to end at --scale test (with the arms it needs).
SMALLEST = {
  "gmp": "dense",
  "qat": "float",
  "kd": None,  # its first arm
  "nm": "2:4-oneshot",  # needs "dense": covers init_from
  "deep-compression": "dense",
  "parallel": None,
  "lora": "qlora-r16",  # needs "pretrained": the NF4 base, adapters, the merged eval
  "lowrank": "svd-25-ft",  # needs "dense": SVD of its checkpoint, the factors fine-tuned
  "oneshot": "sparsegpt-2:4+w4",  # needs "dense": SparseGPT's joint pass, both exports
  "squad": "float",  # needs "pretrain": the span head on the MLM-pretrained encoder
}

# Every key a table's report reads, with made-up values.
ROW_KEYS = (
  "eval_loss excess_loss eval_accuracy sparse_eval_loss sparse_excess_loss serve_eval_loss "
  "serve_excess_loss sparsity sparsity_all accuracy serve_greedy_agreement sparse_greedy_agreement "
  "merged_eval_loss merged_excess_loss trainable_fraction "
  "exact_match f1 serve_exact_match serve_f1 sparse_exact_match sparse_f1"
).split()
SIZE_KEYS = ("export_bytes", "float32_bytes", "sparse_bytes", "trainable_params", "opt_state_bytes")
SIZE_KEYS += (
  "factorized_params",
  "dense_params",
  "factorized_flops_per_token",
  "dense_flops_per_token",
)


def _smallest(table):
  return SMALLEST[table] or reproduce.table_module(table).arms("test")[0].name


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
  """One --scale test directory for the module's end-to-end runs that only read their results:
  a test's arms another already ran are skipped as finished (reproduce.run), not run again."""
  return tmp_path_factory.mktemp("reproduce")


@pytest.mark.parametrize("table", [t for t in reproduce.TABLES if t != "kd"])  # kd: below
def test_smallest_arm_end_to_end(shared_dir, table):
  tmp_path = shared_dir
  arm = _smallest(table)
  out = reproduce.run(table, str(tmp_path), scale="test", seeds=1, workers=1, only=[arm])
  result = json.loads((tmp_path / table / arm / "seed0" / "result.json").read_text())
  numbers = [v for v in result["row"].values() if isinstance(v, float)]
  assert numbers and all(math.isfinite(v) for v in numbers)
  assert arm in out["runs"] and (tmp_path / f"{table}.png").stat().st_size > 0
  md = (tmp_path / f"{table}.md").read_text()
  assert md.startswith("# ") and f"Libraries: jax {jax.__version__}" in md
  if table == "nm":  # the 2:4 export's greedy agreement with the dense run it names
    _check_agreement(tmp_path / table, result)
  if table == "lora":  # adapters only train; the merged model is the adapted one
    row = result["row"]
    assert 0 < row["trainable_params"] < row["trainable_params"] / row["trainable_fraction"]
    assert row["merged_eval_loss"] == pytest.approx(row["eval_loss"], abs=1e-4)


def _check_agreement(table_dir, result):
  """The run's `sparse_greedy_agreement`, recomputed from the dense run's checkpoint and the
  sparse export with models.generate."""
  from compress import prune
  import ml_collections
  import models
  from experiments import experiment
  from experiments.tables import model_config
  import parallel

  dense_dir = str(table_dir / "dense" / "seed0")
  assert result["config"]["eval"]["agreement_with"] == dense_dir
  exp = experiment.build(ml_collections.ConfigDict(result["config"]))
  model = models.build(model_config(result["config"]))
  sparse = prune.load(str(table_dir / "2:4-oneshot" / "seed0" / "sparse"))
  dense = parallel.load_params(os.path.join(dense_dir, "checkpoints"), sparse)
  ids = np.asarray(exp.task.batch(0, "eval")["inputs"])[:8, :16]
  a, _ = models.generate(model, {"params": dense}, ids, max_new_tokens=16)
  b, _ = models.generate(model, {"params": sparse}, ids, max_new_tokens=16)
  want = float(np.mean(np.asarray(a) == np.asarray(b)))
  assert result["row"]["sparse_greedy_agreement"] == pytest.approx(want)


def test_rerun_skips_finished_runs_and_refuses_a_changed_config(tmp_path, capsys):
  reproduce.run("nm", str(tmp_path), scale="test", seeds=1, workers=1, only=["dense"])
  result = tmp_path / "nm" / "dense" / "seed0" / "result.json"
  before = result.stat().st_mtime_ns
  reproduce.run("nm", str(tmp_path), scale="test", seeds=1, workers=1, only=["dense"])
  assert result.stat().st_mtime_ns == before
  assert "1 already finished" in capsys.readouterr().out
  saved = json.loads(result.read_text())
  saved["config"]["train"]["steps"] += 1
  result.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="another config .*train.steps"):
    reproduce.run("nm", str(tmp_path), scale="test", seeds=1, workers=1, only=["dense"])


@pytest.mark.parametrize("table", reproduce.TABLES)
def test_report_from_made_up_results(tmp_path, table):
  """Every table's md / json / png from 3 seeds of made-up numbers: each claim is checked."""
  module = reproduce.table_module(table)
  arms = module.arms("test")
  jobs = reproduce._jobs(table, arms, str(tmp_path), seeds=3)
  rng = np.random.default_rng(0)
  results = {}
  for job in jobs:
    row = {k: float(rng.uniform(0.5, 1.5)) for k in ROW_KEYS}
    row.update({k: int(rng.integers(10_000, 100_000)) for k in SIZE_KEYS})
    if table == "parallel":  # a benchmark row: the mesh it ran on, throughput, memory
      mesh = job["config"].mesh
      row.update(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor, n_devices=8)
      row.update(stage=mesh.stage, pipeline_bubble=0.2 if mesh.stage > 1 else 0.0)
      row.update(rules=job["config"].sharding.rules, device_kind="cpu", mfu=None)
      row.update(train_loss=1.0, eval_loss=1.0, timed_rows=5, peak_bytes_in_use=None)
      for k in ("tokens_per_sec", "tflops_per_device", "step_time_s", "xla_temp_bytes"):
        row[k] = float(rng.uniform(1, 2))
      row["state_bytes_per_device"] = int(8e6 / max(1, mesh.fsdp * mesh.tensor * mesh.stage))
    results[job["path"]] = dict(
      arm=job["arm"], seed=job["seed"], row=row, wall_s=1.0, config=job["config"].to_dict()
    )
  out = reproduce.write(table, module, arms, jobs, results, str(tmp_path), "test", 3, 1.0, 0)
  md = (tmp_path / f"{table}.md").read_text()
  assert md.startswith(f"# {module.TITLE}") and "The paper:" in md
  assert len(out["rows"]) >= 2 and all(len(r) == len(out["columns"]) for r in out["rows"])
  assert out["checks"] and all(c["claim"] in md for c in out["checks"])
  assert os.path.getsize(tmp_path / f"{table}.png") > 0


def test_paired_claims():
  rows = lambda xs: [dict(row={"x": x}) for x in xs]  # noqa: E731
  res = Results({"a": rows([1.0, 2.0, 3.0]), "b": rows([1.5, 2.4, 3.6]), "c": rows([3, 1, 2.1])})
  clear = res.less("a", "b", "x", "a < b")
  assert clear.holds and clear.beyond_noise and clear.mark == "yes"  # t = 0.5 / 0.058 = 8.7
  noisy = res.less("a", "c", "x", "a < c")  # differences 2, -1, -0.9: mean 0.03, t = 0.03
  assert noisy.holds and not noisy.beyond_noise and noisy.mark == "yes, within noise"
  assert res.less("b", "a", "x", "b < a").mark == "no"
  assert res.fmt("a", "x") == "2.000 ± 1.000"


@pytest.mark.parametrize("table", reproduce.TABLES)
def test_full_scale_arms_are_real_data_configs(table):
  """--scale full builds (not runs) configs on real data or real model sizes."""
  arms = reproduce.table_module(table).arms("full")
  assert len({a.name for a in arms}) == len(arms)
  names = {a.name for a in arms}
  assert all(d in names for a in arms for d in (a.init_from, a.teacher) if d)
  assert any(a.config.data.source == "tfds" or a.config.model.preset != "tiny" for a in arms), (
    "full scale should not be the synthetic tiny setting"
  )


def test_kd_smallest_arm(tmp_path):
  """kd's smallest distilling arm: a low-data KD student (train.data_batches) after its teacher."""
  out = reproduce.run("kd", str(tmp_path), scale="test", seeds=1, workers=1, only=["kd-T1-low"])
  assert set(out["runs"]) == {"teacher", "kd-T1-low"}
  result = json.loads((tmp_path / "kd" / "kd-T1-low" / "seed0" / "result.json").read_text())
  assert result["config"]["train"]["data_batches"] > 0
  assert result["config"]["distill"]["teacher_workdir"] == str(
    tmp_path / "kd" / "teacher" / "seed0"
  )
  assert math.isfinite(result["row"]["excess_loss"])
  assert "low data" in (tmp_path / "kd.md").read_text()


@pytest.mark.parametrize("table", reproduce.TABLES)
def test_small_scale_builds_or_is_refused(tmp_path, table):
  """--scale small: valid run configs on the synthetic source for the tables that have it,
  a clear error before any run for the others."""
  module = reproduce.table_module(table)
  if "small" not in module.STEPS:
    with pytest.raises(ValueError, match=f"table {table} has no small scale; choose one of tiny"):
      reproduce.run(table, str(tmp_path), scale="small", seeds=1, workers=1)
    assert not (tmp_path / table).exists()
    return
  jobs = reproduce._jobs(table, module.arms("small"), str(tmp_path), seeds=2)
  for job in jobs:
    reproduce._validate(job)
    assert job["config"].data.source == "markov" and job["config"].model.preset.startswith("tiny")
  assert reproduce.SEEDS["small"] == 5


def test_lowrank_arms_keep_equal_counts(shared_dir, tmp_path):
  """lowrank at --scale test: SVD by global budget (fine-tuned), SVD at the uniform rank and
  one-shot magnitude pruning, each from the dense run, keep the same number of values of the
  same kernels; SVD's FLOPs fall with them, pruning's sparsity is 1 - that fraction. (The
  dense and svd-25-ft runs are test_smallest_arm_end_to_end[lowrank]'s where it ran first.)"""
  from experiments.tables import lowrank

  arms = ["svd-25-ft", "svd-uniform-25", "prune-25"]
  out = reproduce.run("lowrank", str(shared_dir), scale="test", seeds=1, workers=1, only=arms)
  assert set(out["runs"]) == {"dense", *arms}
  row = {a: out["runs"][a][0]["row"] for a in out["runs"]}
  kernels = lowrank._kernels(lowrank.arms("test")[0].config)
  pct, _, frac = lowrank.budgets(lowrank.arms("test")[0].config)[1]
  size, one_rank = sum(r * c for r, c in kernels), max(r + c for r, c in kernels)
  assert pct == 25 and row["svd-25-ft"]["dense_params"] == size
  uniform = row["svd-uniform-25"]["factorized_params"]
  assert uniform == round(frac * size) and row["prune-25"]["sparsity"] == pytest.approx(1 - frac)
  assert uniform - one_rank < row["svd-25-ft"]["factorized_params"] <= uniform
  for a in ("svd-25-ft", "svd-uniform-25"):
    assert row[a]["factorized_flops_per_token"] == 2 * row[a]["factorized_params"]
    assert row[a]["dense_flops_per_token"] == 2 * size
  assert all(math.isfinite(r["excess_loss"]) for r in row.values())
  sparsity = json.loads(
    (shared_dir / "lowrank" / "prune-25" / "seed0" / "sparsity.json").read_text()
  )
  assert sparsity["selected"]["size"] == size  # the kernels SVD factorizes, no others
  made_up = tmp_path / "made-up"  # its report and claims, as the tables listed get above
  made_up.mkdir()
  test_report_from_made_up_results(made_up, "lowrank")
