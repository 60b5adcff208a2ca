"""Hugging Face checkpoint files: safetensors (memory-mapped) and pytorch_model.bin, single or
sharded (`*.index.json`), read one tensor at a time; safetensors written; a directory or a Hub
name resolved. The format side of models/hf.py, which maps the tensors onto our models.
"""

import glob
import json
import math
import os

import jax
import ml_dtypes
import numpy as np

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class _Safetensors:
  """One .safetensors file, memory-mapped: an 8-byte header size, a JSON header, raw data."""

  def __init__(self, path):
    with open(path, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    self.path, self.start, self.header = path, 8 + size, header

  def shape(self, key):
    return tuple(self.header[key]["shape"])

  def get(self, key):
    info = self.header[key]
    begin, _ = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    return np.memmap(self.path, dtype, "r", self.start + begin, tuple(info["shape"]))


class _TorchBin:
  """One pytorch_model.bin, memory-mapped by torch (needs torch: pip install -e '.[hf]')."""

  def __init__(self, path):
    import torch  # only here: safetensors need no torch

    self.tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    self.header = self.tensors

  def shape(self, key):
    return tuple(self.tensors[key].shape)

  def get(self, key):
    t = self.tensors[key]
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def read_config(directory: str) -> dict:
  """An HF checkpoint directory's config.json; a damaged one is an error naming the file."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}): re-save or re-download it.") from None


class Checkpoint:
  """The config and tensors of an HF checkpoint directory; tensors are read on demand."""

  def __init__(self, directory: str):
    self.config = read_config(directory)
    self.directory, self.files = directory, {}
    for single, index, reader in (
      ("model.safetensors", "model.safetensors.index.json", _Safetensors),
      ("pytorch_model.bin", "pytorch_model.bin.index.json", _TorchBin),
    ):
      if os.path.exists(os.path.join(directory, index)):
        with open(os.path.join(directory, index)) as f:
          names = sorted(set(json.load(f)["weight_map"].values()))
      elif os.path.exists(os.path.join(directory, single)):
        names = [single]
      else:
        continue
      readers = [reader(os.path.join(directory, n)) for n in names]
      self.files = {k: r for r in readers for k in r.header}
      return
    raise FileNotFoundError(
      f"{directory} has config.json but no model.safetensors, pytorch_model.bin or their "
      "*.index.json: save the model with save_pretrained, or point at the directory that has them."
    )

  def keys(self):
    return self.files.keys()

  def shape(self, key):
    return self.files[key].shape(key)

  def get(self, key) -> np.ndarray:
    return np.asarray(self.files[key].get(key), np.float32)


def _write_safetensors(tensors: dict, path: str):
  """{name: (shape, fetch)} as float32 to a .safetensors file, fetching one tensor at a time.
  Every process fetches (a sharded array gathers collectively); the first one writes."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, (shape, _) in tensors.items():
    nbytes = math.prod(shape) * 4
    header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  writer = jax.process_index() == 0
  with open(path, "wb") if writer else open(os.devnull, "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for shape, fetch in tensors.values():
      x = fetch()
      assert x.shape == tuple(shape), (x.shape, shape)
      f.write(np.ascontiguousarray(x, np.float32).tobytes())


def resolve(path_or_name: str) -> str:
  """A local checkpoint directory, or a Hub name downloaded (weights and configs only)."""
  if os.path.isdir(path_or_name):
    return path_or_name
  if os.path.sep in path_or_name.strip("/").split("/", 1)[-1] or path_or_name.startswith("."):
    raise FileNotFoundError(f"no checkpoint directory {path_or_name!r}")
  try:
    from huggingface_hub import snapshot_download

    for weights in ("*.safetensors*", "*.bin*"):
      directory = snapshot_download(path_or_name, allow_patterns=["*.json", weights])
      if glob.glob(os.path.join(directory, weights)):
        return directory
    return directory
  except Exception as e:  # offline, unknown repo, no huggingface_hub
    raise OSError(
      f"{path_or_name!r} is not a local directory and could not be fetched from the Hugging "
      f"Face Hub ({type(e).__name__}: {e}). Offline, pass a directory holding config.json and "
      "model.safetensors (e.g. written by save_pretrained)."
    ) from e
