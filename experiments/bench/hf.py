"""Loading an HF checkpoint onto a mesh: time and the host memory it takes.

    python -m experiments.bench.hf --preset=gpt2-medium          # a random one, made here
    python -m experiments.bench.hf --checkpoint=/path/to/llama   # a real one

Without --checkpoint it saves a randomly initialized transformers model of the preset's
architecture first (needs torch). It then loads it with models.hf.from_pretrained onto a
mesh over all devices (fsdp x tensor) and prints the load time and the peak of NumPy host
memory the load allocated (tracemalloc), next to the whole model's and the largest tensor's
size: the loader holds one checkpoint tensor at a time, not the model.
"""

import math
import os
import tempfile
import time
import tracemalloc

from absl import app, flags
import jax

import models
import parallel

_PRESET = flags.DEFINE_string("preset", "gpt2-medium", "models.PRESETS name to make at random")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "an HF checkpoint directory or Hub name")
_TENSOR = flags.DEFINE_integer("tensor", 2, "tensor-parallel mesh axis (fsdp takes the rest)")


def make_random(preset: str, directory: str):
  """Saves a random transformers model with the preset's architecture (float32)."""
  import torch
  import transformers

  cfg = models.get_preset(preset)
  hf = models.hf.hf_config(cfg)
  arch = hf.pop("architectures")[0]
  config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  torch.manual_seed(0)
  getattr(transformers, arch)(config).save_pretrained(directory)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    path = _CHECKPOINT.value
    if not path:
      path = os.path.join(tmp, _PRESET.value)
      t0 = time.perf_counter()
      make_random(_PRESET.value, path)
      print(f"made a random {_PRESET.value} in {time.perf_counter() - t0:.1f}s")
    ckpt = models.hf.Checkpoint(models.hf.resolve(path))
    sizes = [math.prod(ckpt.shape(k)) * 4 for k in ckpt.keys()]
    n = jax.device_count()
    mesh = parallel.make_mesh(data=1, fsdp=n // _TENSOR.value, tensor=_TENSOR.value)
    tracemalloc.start()
    t0 = time.perf_counter()
    _, params = models.hf.from_pretrained(path, mesh=mesh, rules=parallel.get_rules("fsdp_tp"))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib = 2**20
    print(
      f"loaded {len(sizes)} tensors ({sum(sizes) / mib:,.0f} MiB as float32) onto a "
      f"{dict(mesh.shape)} mesh in {seconds:.1f}s; peak host (NumPy) memory during the load "
      f"{peak / mib:,.0f} MiB; largest tensor {max(sizes) / mib:,.0f} MiB"
    )


if __name__ == "__main__":
  app.run(main)
