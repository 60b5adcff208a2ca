"""compress.quant's integer export: int8 / int4 checkpoints are really smaller on disk and
load back to the converted model."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import models
from compress import quant
from compress.quant import Policy, QuantConfig, QuantDot
from compress.quant import quantizers as qz

from quant_helpers import draw, leaves, param_shapes, random_ids

_S = models.structure()
MATRICES = f"{_S.weights}|{_S.embeddings}"  # the float matrices stored at storage_bits


# Conversion to disk: int8 / int4 checkpoints are really smaller, and load back.

# One head, d_ff = d_model and 256-entry tables: every matrix holds 256 x 256 entries, so save and
# load (eager: one compile per op and shape) stay fast.
CHECKPOINT = dict(d_model=256, d_ff=256, n_heads=1, vocab_size=256, max_len=256, n_layers=1)
TABLES = {"params/embed/embedding", "params/pos_embed/embedding"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Per bit width: serving variables, their saved size, what loads back and both logits."""
  root = tmp_path_factory.mktemp("checkpoints")
  cfg = models.get_preset("tiny", **CHECKPOINT)
  ids = random_ids(cfg.vocab_size)
  out = {}
  for bits in (8, 4):
    policy = Policy.of((".*", QuantConfig(bits=bits)))  # every dense layer and the tied head

    def build(mode):
      return models.build(cfg, dot_general_cls=functools.partial(QuantDot, policy, mode))

    if not out:
      params = draw(param_shapes(build("train"), ids), std=0.02)
    serving = jax.jit(lambda p, i: quant.convert(build("convert").apply, {"params": p}, i))(
      params, ids[:1, :1]
    )
    quant.save(root / f"int{bits}", serving, storage_bits=bits, matrices=MATRICES)
    loaded = quant.load(root / f"int{bits}")
    serve = jax.jit(build("serve").apply)
    with open(root / f"int{bits}" / "format.json") as f:
      stored = set(json.load(f)["stored"])
    out[bits] = dict(
      serving=serving,
      loaded=loaded,
      stored=stored,
      size=quant.disk_bytes(root / f"int{bits}"),
      logits=np.asarray(serve(serving, ids)),
      loaded_logits=np.asarray(serve(loaded, ids)),
    )
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(root / "float32", params)
  out["float32"] = quant.disk_bytes(root / "float32")
  return out


@pytest.mark.parametrize("bits,limit,tolerance", [(8, 0.30, 0.06), (4, 0.17, 0.2)])
def test_quantized_checkpoint_is_small_and_loads_back(checkpoints, bits, limit, tolerance):
  c = checkpoints[bits]
  assert c["size"] <= limit * checkpoints["float32"], c["size"] / checkpoints["float32"]
  assert c["size"] >= 0.3 * limit * checkpoints["float32"]  # observed: 27.7% and 13.5%
  assert TABLES <= c["stored"]
  serving, loaded = leaves(c["serving"]), leaves(c["loaded"])
  assert serving.keys() == loaded.keys()
  n_int = 0
  for name, x in serving.items():
    y = loaded[name]
    assert (y.dtype, y.shape) == (x.dtype, x.shape), name
    if jnp.issubdtype(x.dtype, jnp.integer):
      n_int += x.dtype == qz.storage_dtype(bits)
      x, y = np.asarray(x).astype(np.int8), np.asarray(y).astype(np.int8)  # int4 as int8
    x, y = np.asarray(x), np.asarray(y)
    if name in c["stored"]:  # per-row codes: within half a step of the row's grid
      half = np.max(np.abs(x), axis=-1, keepdims=True) / (2 * qz.int_range(bits, True)[1])
      assert np.all(np.abs(y - x) <= half * (1 + 1e-5) + 1e-12), name
      assert not np.array_equal(y, x), name
    else:
      np.testing.assert_array_equal(y, x, err_msg=name)
  assert n_int == 6  # query, key, value, out, wi, wo
  logits, loaded_logits = c["logits"], c["loaded_logits"]
  assert np.isfinite(loaded_logits).all()
  # The tables serve rounded to `bits` per row: relative RMS change of the logits, observed
  # 0.030 (int8) and 0.115 (int4).
  change = np.sqrt(np.mean(np.square(loaded_logits - logits)) / np.mean(np.square(logits)))
  assert 0 < change <= tolerance, change


@pytest.mark.parametrize("bits", [8, 4])
def test_storage_bits_rounds_only_the_float_tables(checkpoints, bits):
  """Weight scales, biases and norms load back exact: the tables are the one difference."""
  c = checkpoints[bits]
  assert c["stored"] == TABLES  # every kernel is already integer
  serving, loaded = leaves(c["serving"]), leaves(c["loaded"])
  exact = [name for name in serving if name.rsplit("/", 1)[-1] in ("w_scale", "bias", "scale")]
  assert len([name for name in exact if name.endswith("w_scale")]) == 7  # + the tied head's
  for name in exact:
    np.testing.assert_array_equal(loaded[name], serving[name], err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int4])
def test_sparse_codes_are_stored_as_bitmask_and_load_exactly(tmp_path, dtype):
  """A pruned model's codes (90% zeros): bitmask + non-zero codes, smaller, identical back."""
  rng = np.random.default_rng(0)
  hi = 127 if dtype == jnp.int8 else 7
  codes = rng.integers(-hi, hi + 1, (256, 256)) * (rng.random((256, 256)) < 0.1)
  serving = {"params": {"dense": {"kernel": jnp.asarray(codes, dtype)}, "b": jnp.ones(4)}}
  quant.save(tmp_path / "dense", serving)
  quant.save(tmp_path / "sparse", serving, sparse=True)
  loaded = quant.load(tmp_path / "sparse")
  kernel = loaded["params"]["dense"]["kernel"]
  assert kernel.dtype == dtype
  np.testing.assert_array_equal(np.asarray(kernel, np.int8), codes)
  np.testing.assert_array_equal(loaded["params"]["b"], 1.0)
  with open(tmp_path / "sparse" / "format.json") as f:
    assert json.load(f)["sparse"]["params/dense/kernel"]["nnz"] == np.count_nonzero(codes)
  # orbax compresses (zstd) what it writes, zeros included: the bitmask still saves bytes
  assert quant.disk_bytes(tmp_path / "sparse") < quant.disk_bytes(tmp_path / "dense")
