"""experiments.compare: claims of two runs of a table side by side."""

import json

import pytest

from experiments import compare


def _table(path, marks, jax_version):
  checks = [
    dict(
      claim="a beats b",
      holds=marks[0] != "no",
      detail="1 vs 2; t=4.0",
      beyond_noise=marks[0] == "yes",
    ),
    dict(claim="c is small", holds=marks[1] != "no", detail="0.5%", beyond_noise=None),
  ]
  versions = [dict(jax=jax_version, flax="0.12.0", numpy="2.2.6")]
  path.mkdir()
  (path / "qat.json").write_text(
    json.dumps(dict(scale="small", seeds=5, versions=versions, checks=checks))
  )


def test_side_by_side(tmp_path, capsys):
  _table(tmp_path / "one", ["yes", "yes"], "0.10.2")
  _table(tmp_path / "two", ["yes, within noise", "no"], "0.8.3")
  compare.main([str(tmp_path / "one"), str(tmp_path / "two"), "--tables", "qat"])
  out = capsys.readouterr().out
  assert "| a beats b | yes (t=4.0) | yes, within noise (t=4.0) |" in out
  assert "| c is small | yes | no |" in out
  assert "jax 0.10.2" in out and "jax 0.8.3" in out
  assert "beyond noise: 2 of 2, 0 of 2" in out
  with pytest.raises(SystemExit, match="FATAL: .*kd.json: no such table"):
    compare.main([str(tmp_path / "one"), "--tables", "kd"])
