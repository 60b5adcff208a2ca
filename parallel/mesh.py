"""Device meshes and the logical-axis rules that map model axis names onto them.

Sharding is data: the model names its axes ("embed", "mlp", "heads", ...), a rules
table maps each name to mesh axes ("stage", "data", "fsdp", "tensor"), and the mesh says how
many devices each mesh axis has. Changing parallelism means changing config, not code.
"stage" is pipeline parallelism: the scanned layers' leading axis ("layers") is sharded over
it, and models.pipeline runs them as a schedule over the stages.
"""

from collections.abc import Sequence
import math

import jax
from jax.experimental import mesh_utils
import numpy as np

MESH_AXES = ("stage", "data", "fsdp", "tensor")

# Logical name -> mesh axes. Names that map to a mesh axis of size 1 are replicated,
# so "fsdp_tp" works on every mesh; the narrower presets exist to make intent explicit
# (and to keep e.g. activations replicated over an axis you did not mean to use).
_PARAM_FSDP = [("embed", "fsdp")]
_PARAM_TP = [("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor")]
_ACT_TP = [
  ("act_vocab", "tensor"),
  ("act_mlp", "tensor"),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
]
_REPLICATED = [
  ("length", None),
  ("head_dim", None),
  ("layers", "stage"),  # the stacked layers: contiguous blocks of layers per pipeline stage
  ("stage", "stage"),  # the pipeline's per-stage slots (models.pipeline)
  ("norm", None),
  ("pos", None),
  ("type_vocab", None),
  ("labels", None),
  ("act_embed", None),
]

RULES = {
  "dp": [("batch", "data")] + _REPLICATED,
  "fsdp": [("batch", ("data", "fsdp"))] + _PARAM_FSDP + _REPLICATED,
  "tp": [("batch", "data")] + _PARAM_TP + _ACT_TP + _REPLICATED,
  "fsdp_tp": [("batch", ("data", "fsdp"))] + _PARAM_FSDP + _PARAM_TP + _ACT_TP + _REPLICATED,
}


def get_rules(rules: str | Sequence) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """A preset name from RULES, or an explicit [(logical, mesh_axes), ...] list."""
  if isinstance(rules, str):
    if rules not in RULES:
      raise ValueError(
        f"Unknown sharding rules preset {rules!r}; choose one of {sorted(RULES)} "
        "or give an explicit list of (logical_name, mesh_axes) pairs."
      )
    rules = RULES[rules]
  out = []
  for rule in rules:
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in axes if isinstance(axes, tuple) else (axes,):
      if a is not None and a not in MESH_AXES:
        raise ValueError(
          f"Sharding rule ({name!r}, {axes!r}) names mesh axis {a!r}; mesh axes are {MESH_AXES}."
        )
    out.append((name, axes))
  return tuple(out)


def resolve_mesh_shape(
  data: int, fsdp: int, tensor: int, n_devices: int, stage: int = 1
) -> tuple[int, int, int, int]:
  """Fills in a single -1 with the remaining devices and checks the shape; returns the sizes
  in MESH_AXES order (stage, data, fsdp, tensor)."""
  shape = [int(stage), int(data), int(fsdp), int(tensor)]
  what = f"mesh (stage, data, fsdp, tensor) = {tuple(shape)}"
  if shape.count(-1) > 1:
    raise ValueError(f"{what}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{what}: sizes must be positive (or -1 for 'the remaining devices').")
  hint = ""
  if jax.default_backend() == "cpu":
    hint = (
      " On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N (set before starting "
      "Python) simulates N devices."
    )
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if n_devices % known:
      raise ValueError(
        f"{what}: {n_devices} devices do not divide by the fixed axes' product {known}.{hint}"
      )
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(
      f"{what} uses {math.prod(shape)} devices but {n_devices} are available: make the "
      f"product equal the device count, or set one axis to -1 to take the remaining "
      f"devices.{hint}"
    )
  return tuple(shape)


def make_mesh(
  data: int = -1,
  fsdp: int = 1,
  tensor: int = 1,
  dcn: dict | None = None,
  devices: Sequence[jax.Device] | None = None,
  stage: int = 1,
) -> jax.sharding.Mesh:
  """A ("stage", "data", "fsdp", "tensor") mesh over all devices (one axis may be -1: the
  rest). "stage" is outermost: with several processes, stages split along processes first.

  `dcn` = {"data": d, ...} makes a hybrid mesh for multi-slice TPU or multi-node GPU: each
  mesh axis is (dcn size) x (size within a slice/node), with the slow data-center network
  only crossed by the dcn part (usually data parallelism). Within a slice the sizes
  data/fsdp/tensor above are per slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {"stage": 1, "data": 1, "fsdp": 1, "tensor": 1, **dict(dcn or {})}
  dcn_shape = tuple(int(dcn[a]) for a in MESH_AXES)
  granules = math.prod(dcn_shape)
  if granules < 1 or len(devices) % granules:
    raise ValueError(
      f"mesh.dcn {dcn_shape} does not divide the {len(devices)} devices into equal slices/nodes."
    )
  ici_shape = resolve_mesh_shape(data, fsdp, tensor, len(devices) // granules, stage)
  if granules > 1:  # TPU slices are granules; on GPU/CPU each process (node) is one
    grid = mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=devices[0].platform != "tpu"
    )
  elif devices[0].platform == "tpu":  # ordered along the torus' physical links
    grid = mesh_utils.create_device_mesh(ici_shape, devices)
  else:  # process-major order, so each process holds a contiguous block of the batch
    grid = np.asarray(devices).reshape(ici_shape)
  return jax.sharding.Mesh(grid, MESH_AXES)
