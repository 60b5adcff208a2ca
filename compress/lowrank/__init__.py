"""Low-rank factorization: kernels replaced by truncated-SVD factors u [*in, r], v [r, *out].

choices = lowrank.plan(params, r"mlp/w./kernel$", energy=0.9)       # or rank=64, budget=0.5
params_f = lowrank.factorize_tree(params, choices)                   # kernel -> kernel_u, kernel_v
params = lowrank.merge_tree(params_f)                                # back to kernel (approximate)
lowrank.count_params(choices), lowrank.flops_per_token(choices)      # (before, after) each
"""

from compress.lowrank.dot import FactorizedDot, layer_ranks
from compress.lowrank.svd import (
  Choice,
  count_params,
  factorize,
  factorize_tree,
  flops_per_token,
  max_useful_rank,
  merge_tree,
  plan,
  rank_for_energy,
  ranks_for_budget,
  reconstruct,
  spectrum,
)

__all__ = [
  "FactorizedDot",
  "layer_ranks",
  "Choice",
  "count_params",
  "factorize",
  "factorize_tree",
  "flops_per_token",
  "max_useful_rank",
  "merge_tree",
  "plan",
  "rank_for_energy",
  "ranks_for_budget",
  "reconstruct",
  "spectrum",
]
