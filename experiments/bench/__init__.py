"""Benchmarks that print their figures: the train step (step; `python -m experiments.bench`),
HF checkpoint loading (hf), quantization (quant) and pruning (prune) overheads."""
