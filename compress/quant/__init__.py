"""Quantization: pure quantizers, a quantized dot_general (QAT, calibration, int8 serving;
FP8 training: fp8.py), the optax side, and conversion to an integer checkpoint. QLoRA's NF4
weight format (blockwise, double-quantized scales, 4-bit packing): nf4.py.

    policy = quant.Policy.of((r"lm_head", None), (r".", quant.QuantConfig(bits=8, act_bits=8)))
    model = models.build(cfg, dot_general_cls=functools.partial(quant.QuantDot, policy))
    fp8 = quant.Policy.of((r"lm_head", None), (r".", quant.QuantConfig(format="fp8")))
"""

from compress.quant.quantizers import (
  CALIBRATORS,
  Grid,
  calibrate,
  check_bits,
  dequantize,
  fake_quant,
  grid_range,
  int_grid,
  int_range,
  lsq_fake_quant,
  lsq_grad_scale,
  lsq_init,
  lsq_range,
  quantize,
  scale_zero,
  storage_dtype,
  straight_through,
  tile,
)
from compress.quant import fp8
from compress.quant import nf4
from compress.quant.nf4 import NF4_CODE, nf4_roundtrip
from compress.quant.dot_general import MODES, QuantDot, calibrate_model
from compress.quant.policy import Policy, QuantConfig, report
from compress.quant.convert import convert, disk_bytes, load, save
from compress.quant.optim import (
  STEP_NAMES,
  decay_mask,
  is_step,
  keep_on_grid,
  labels,
  split_optimizer,
  without_steps,
)

__all__ = [
  "fp8",
  "nf4",
  "NF4_CODE",
  "nf4_roundtrip",
  "without_steps",
  "calibrate_model",
  "STEP_NAMES",
  "decay_mask",
  "is_step",
  "keep_on_grid",
  "labels",
  "split_optimizer",
  "CALIBRATORS",
  "Grid",
  "MODES",
  "Policy",
  "QuantConfig",
  "QuantDot",
  "calibrate",
  "check_bits",
  "convert",
  "dequantize",
  "disk_bytes",
  "fake_quant",
  "grid_range",
  "int_grid",
  "int_range",
  "load",
  "lsq_fake_quant",
  "lsq_grad_scale",
  "lsq_init",
  "lsq_range",
  "quantize",
  "report",
  "save",
  "scale_zero",
  "storage_dtype",
  "straight_through",
  "tile",
]
