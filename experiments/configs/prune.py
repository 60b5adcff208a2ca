"""Pruning of the decoder LM on the synthetic source, then the sparse export.

    python -m experiments.train --config experiments/configs/prune.py:tiny --workdir /tmp/gmp
    python -m experiments.train --config experiments/configs/prune.py:nm --workdir /tmp/nm
    python -m experiments.train --config experiments/configs/prune.py:oneshot --workdir /tmp/os
    ... --config.prune.sparsity=0.75 --config.prune.distribution=global

`tiny` prunes gradually (Zhu & Gupta's cubic schedule) to 90% of every kernel from step 100
to 400 of 600, then trains on with the masks fixed. `nm` reaches 2:4 gradually (first 1 of
every 4 pruned, then 2). `oneshot` first trains the dense model in `<workdir>/pretrain`, then
prunes it once to 90% and evaluates it without retraining (train.steps=0). Each run ends
with the sparsity report (`<workdir>/sparsity.json`) and the sparse export
(`<workdir>/sparse`), reloaded and evaluated (`sparse_*` rows in metrics.jsonl).
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in ("tiny", "nm", "oneshot"):
    raise ValueError(f"prune.py:{arg}: choose tiny (gradual 90%), nm (2:4) or oneshot.")
  c = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
  c.prune.update(method="gradual", sparsity=0.9, start=100, end=400, every=50)
  if arg == "nm":
    c.prune.granularity = "2:4"
  if arg == "oneshot":
    c.pretrain = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=600)
    c.prune.update(method="oneshot", start=0)
    c.train.steps = 0
  return c
