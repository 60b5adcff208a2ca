"""Compression as pure functions and optax transforms over parameter pytrees.

Subpackages: `quant` (quantization-aware training, calibration, int8 serving),
`prune` (magnitude masks held in the optimizer state) and `distill` (distillation
losses). `compress` never imports `models`, `parallel` or `experiments`.
"""
