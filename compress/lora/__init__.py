"""Low-rank adapters: LoRA through the models' dot_general hook (stacking on a quantized one:
QLoRA), merge / unmerge, the adapters-only selection an optimizer trains, and QLoRA's frozen
NF4 (or int4) base.

    model = models.build(cfg, dot_general_cls=lora.lora_dot(r"attn|mlp", rank=8, alpha=16))
    only = lora.adapters(params); plain = lora.merge(params, alpha=16)
"""

from compress.lora.adapters import (
  ADAPTER,
  RANK_AXIS,
  Lora,
  adapted_kernels,
  adapters,
  check,
  check_block,
  load_nf4_base,
  lora_dot,
  merge,
  quantize_base,
  round_blockwise,
  save_nf4_base,
  trains,
  unmerge,
)

__all__ = [
  "ADAPTER",
  "RANK_AXIS",
  "Lora",
  "adapted_kernels",
  "adapters",
  "check",
  "check_block",
  "load_nf4_base",
  "lora_dot",
  "merge",
  "quantize_base",
  "round_blockwise",
  "save_nf4_base",
  "trains",
  "unmerge",
]
