"""Training FLOPs of a Transformer step, chip peaks, and model FLOPs utilization (MFU).

Plain numbers in, plain numbers out: the caller maps its model config onto the arguments.
The count is MaxText's (`calculate_tflops_training_per_device`): matmul FLOPs only, forward
plus backward (x3), no rematerialization. So MFU counts the model's useful work; recomputed
forwards (remat) and elementwise ops (norms, softmax, activations, the optimizer) are not in it.
"""

import jax


def train_flops_per_step(
  *,
  batch: int,
  seq_len: int,
  n_layers: int,
  d_model: int,
  n_heads: int,
  n_kv_heads: int,
  head_dim: int,
  d_ff: int,
  vocab_size: int,
  gated_mlp: bool,
  causal: bool,
) -> float:
  """FLOPs of one training step over the whole global batch (forward + backward).

  3 x [L x (FFN + QKV + out-proj) + unembed] + 3 x L x attention, each a matmul of 2 FLOPs
  per multiply-add. Per device: divide by the device count (the work is split evenly over the
  mesh; replicated compute, e.g. on a tensor axis that does not divide it, is not counted).
  `vocab_size` is the output layer's width: V for an LM/MLM head, 0 for none.
  """
  b, s, e, f = batch, seq_len, d_model, d_ff
  hq, hkv, d = n_heads, n_kv_heads, head_dim
  n_ffn_in = 2 if gated_mlp else 1  # gated: W_gate and W_up both read x
  ffn = 2 * b * s * f * e * n_ffn_in + 2 * b * s * f * e
  qkv = 2 * b * s * e * (hq + 2 * hkv) * d
  out_proj = 2 * b * s * e * hq * d
  # QK^T and PV, each 2BS^2HD; causal attention only needs the lower triangle.
  attention = 4 * b * s**2 * hq * d / (2 if causal else 1)
  unembed = 2 * b * s * e * vocab_size
  return float(3 * (n_layers * (ffn + qkv + out_proj) + unembed) + 3 * n_layers * attention)


# Dense (no 2:4 sparsity) bf16 matmul peak per chip, FLOP/s, from the vendors' spec pages:
# TPUs: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "Peak compute per chip (bf16)".
# NVIDIA: the A100 / H100 / H200 datasheets list "BF16 Tensor Core" *with sparsity*; dense is
# half (A100 624 -> 312; H100 SXM 1,979 -> 989; H100 PCIe 1,513 -> 756; H200 1,979 -> 989).
PEAK_FLOPS = {
  "tpu-v4": 275e12,
  "tpu-v5e": 197e12,
  "tpu-v5p": 459e12,
  "tpu-v6e": 918e12,
  "a100": 312e12,  # SXM and PCIe alike
  "h100-sxm": 989e12,
  "h100-pcie": 756e12,  # lower clocks and power than SXM
  "h200": 989e12,
}

# jax's `device_kind` for TPUs, lowercased. "TPU v4 lite" (v4i, inference) is deliberately absent.
_TPU_KINDS = {
  "tpu v4": "tpu-v4",
  "tpu v5 lite": "tpu-v5e",
  "tpu v5e": "tpu-v5e",
  "tpu v5": "tpu-v5p",
  "tpu v5p": "tpu-v5p",
  "tpu v6 lite": "tpu-v6e",
  "tpu v6e": "tpu-v6e",
}


def chip_name(device_kind: str) -> str | None:
  """The PEAK_FLOPS key for a jax `device_kind` string, or None for CPUs and unknown chips."""
  kind = device_kind.lower().strip()
  if kind in _TPU_KINDS:
    return _TPU_KINDS[kind]
  if "nvl" in kind:  # H100/H200 NVL have their own (lower) peaks: unknown rather than wrong
    return None
  if "a100" in kind:  # e.g. "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"
    return "a100"
  if "h100" in kind:  # e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe"
    return "h100-pcie" if "pcie" in kind else "h100-sxm"
  if "h200" in kind:  # "NVIDIA H200", "NVIDIA GH200 ..."
    return "h200"
  return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` (default: the first device); None if not known."""
  device = device or jax.devices()[0]
  name = chip_name(device.device_kind)
  return PEAK_FLOPS[name] if name else None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, peak: float | None):
  """Model FLOPs utilization in [0, 1]: achieved FLOP/s per device over the chip's peak.

  None when the peak is unknown (CPU, unlisted chips): no made-up number.
  """
  if peak is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / n_devices / peak
