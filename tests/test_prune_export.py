"""compress.prune's sparse export (bitmask and N:M checkpoints) and its sparsity report."""

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from compress import prune

from prune_helpers import (
  SELECT,
  TABLES,
  draw,
  f32,
  leaves,
  n_m,
  numpy_tree,
  pruner,
  selected,
  tiny_shapes,
)


# Sparse export.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("sparse")
  model, shapes = tiny_shapes(n_layers=1)  # the tiny decoder with one layer
  params = draw(shapes, seed=12, std=0.02)
  pruned = pruner(select=TABLES)(params, 0.9)  # prune.one_shot_prune(params, 0.9, select=TABLES)
  prune.save(root / "sparse", pruned)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(root / "dense", params)
  return model, params, pruned, root


def test_sparse_checkpoint_is_small_and_loads_back_exactly(exported):
  model, params, pruned, root = exported
  sparse, dense = prune.disk_bytes(root / "sparse"), prune.disk_bytes(root / "dense")
  assert sparse <= 0.25 * dense, sparse / dense  # bitmask + values: 13.1% of float32
  rep = prune.report(pruned, select=r"kernel$|embedding$")
  assert abs(rep["selected"]["sparsity"] - 0.9) < 1e-4
  loaded = prune.load(root / "sparse")
  assert jax.tree.structure(loaded) == jax.tree.structure(pruned)
  for name, x in leaves(numpy_tree(pruned)).items():
    y = leaves(loaded)[name]
    assert y.dtype == x.dtype and y.shape == x.shape, name
    np.testing.assert_array_equal(y, x, err_msg=name)
  with open(root / "sparse" / "sparse.json") as f:
    formats = {name: info["format"] for name, info in json.load(f).items()}
  assert set(formats.values()) == {"bitmask"} and len(formats) == 8  # biases and norms: dense
  apply = jax.jit(model.apply)
  ids = jax.device_put(np.random.RandomState(0).randint(0, 264, (2, 16)).astype(np.int32))
  logits, loaded_logits = apply({"params": pruned}, ids), apply({"params": loaded}, ids)
  np.testing.assert_array_equal(loaded_logits, logits)
  assert np.abs(logits).max() > 0


def payload(directory):
  """Bytes of the arrays a checkpoint holds (on disk, orbax adds metadata and compresses)."""
  with ocp.StandardCheckpointer() as ckpt:
    arrays = ckpt.restore(directory / "arrays")
  return sum(np.asarray(x).nbytes for x in arrays.values())


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8)])
def test_n_m_checkpoint_round_trips_and_is_no_larger_than_the_bitmask(exported, n, m, tmp_path):
  _, params, _, _ = exported
  pruned = numpy_tree(pruner(granularity=n_m(f"{n}:{m}"), **SELECT)(params, None))
  prune.save(tmp_path / "nm", pruned, nm=n_m(f"{n}:{m}"))
  prune.save(tmp_path / "bitmask", pruned)
  loaded = prune.load(tmp_path / "nm")
  assert jax.tree.structure(loaded) == jax.tree.structure(pruned)
  for name, x in leaves(pruned).items():
    np.testing.assert_array_equal(leaves(loaded)[name], x, err_msg=name)
  with open(tmp_path / "nm" / "sparse.json") as f:
    formats = {name: info["format"] for name, info in json.load(f).items()}
  kernels = selected(pruned)
  assert sorted(formats) == sorted(kernels)  # the rest (tables, biases, norms) is dense
  # Bitmask: n values + m bits per group; N:M: n values + the number of the group's
  # n-of-m pattern in ceil(log2 C(m, n)) bits (2:4: 3 bits, 2:8: 5 bits).
  bits = (math.comb(m, n) - 1).bit_length()
  saving = sum(x.size // 8 - math.ceil(x.size // m * bits / 8) for x in kernels.values())
  assert payload(tmp_path / "bitmask") - payload(tmp_path / "nm") == saving
  assert saving > 0 and set(formats.values()) == {"nm"}


# The report.


def test_report_counts_match_numpy():
  rng = np.random.RandomState(13)
  tree = {
    "a": {"kernel": rng.normal(size=(6, 5)) * (rng.rand(6, 5) < 0.3), "bias": np.zeros(5)},
    "b": {"kernel": rng.normal(size=(4, 2, 3)) * (rng.rand(4, 2, 3) < 0.8)},
    "c": {"embedding": np.where(rng.rand(7, 2) < 0.5, 0.0, 1.0), "scale": np.ones(2)},
  }
  tree = jax.tree.map(f32, tree)
  flat = leaves(numpy_tree(tree))
  assert list(prune.report(tree)["layers"]) == ["a/kernel", "b/kernel", "c/embedding"]  # matrices
  rep = prune.report(tree, select=r"kernel$")
  assert list(rep["layers"]) == ["a/kernel", "b/kernel"]
  for name, r in rep["layers"].items():
    x = flat[name]
    assert r["shape"] == list(x.shape) and r["size"] == x.size, name
    assert r["nonzero"] == np.count_nonzero(x) and r["sparsity"] == pytest.approx(np.mean(x == 0))
  sel = [flat["a/kernel"], flat["b/kernel"]]
  assert rep["selected"]["nonzero"] == sum(np.count_nonzero(x) for x in sel)
  assert rep["selected"]["size"] == 30 + 24
  assert rep["selected"]["sparsity"] == pytest.approx(sum(np.sum(x == 0) for x in sel) / 54)
  assert rep["all"]["size"] == sum(x.size for x in flat.values())
  assert rep["all"]["nonzero"] == sum(np.count_nonzero(x) for x in flat.values())
  assert rep["all"]["sparsity"] == pytest.approx(
    sum(np.sum(x == 0) for x in flat.values()) / rep["all"]["size"]
  )
  rep = prune.report(tree, select=r"kernel$|embedding$", exclude=r"^b/")
  assert list(rep["layers"]) == ["a/kernel", "c/embedding"]
  text = prune.format_report(rep)
  assert "c/embedding" in text and f"{rep['selected']['sparsity']:.4f}" in text
