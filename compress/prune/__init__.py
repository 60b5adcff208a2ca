"""Pruning: masks held in the optimizer state, exact selection under sharding, sparse export.

tx = prune.pruning(0.9, prune.cubic(start=100, end=1100, every=100), inner=optax.adamw(1e-3))
tx = prune.pruning(granularity="2:4", inner=optax.adamw(1e-3))       # N:M, one shot at 0
heads = prune.parse_granularity("heads", heads=s.heads)               # s: the model's layout
tx = prune.pruning(0.5, granularity=heads, select=s.weights, stacked=f"^{s.layers}/")
prune.report(params)                                                  # sparsity per layer
prune.save(directory, params); params = prune.load(directory)         # bitmask + values
"""

from compress.prune.masks import nm_keep, order_key, smallest, target_count
from compress.prune.schedules import Schedule, cubic, one_shot, periodic
from compress.prune.granularity import (
  DISTRIBUTIONS,
  NM,
  Blocks,
  Structured,
  erk_sparsities,
  parse_granularity,
)
from compress.prune.transform import SCORES, PruneState, Score, pruning
from compress.prune.export import (
  disk_bytes,
  format_report,
  load,
  masks_of,
  one_shot_prune,
  report,
  save,
)

__all__ = [
  "nm_keep",
  "order_key",
  "smallest",
  "target_count",
  "Schedule",
  "cubic",
  "one_shot",
  "periodic",
  "DISTRIBUTIONS",
  "NM",
  "SCORES",
  "Blocks",
  "PruneState",
  "Score",
  "Structured",
  "erk_sparsities",
  "parse_granularity",
  "pruning",
  "disk_bytes",
  "format_report",
  "load",
  "masks_of",
  "one_shot_prune",
  "report",
  "save",
]
