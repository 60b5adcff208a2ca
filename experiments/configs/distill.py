"""Distillation on the synthetic source: a decoder LM student from a bigger teacher (Hinton
et al.), or a DistilBERT-style encoder.

    python -m experiments.train --config experiments/configs/distill.py:tiny --workdir /tmp/kd
    python -m experiments.train --config experiments/configs/distill.py:tiny --workdir /tmp/scratch \
        --config.distill.method=none                        # the same student from scratch
    python -m experiments.train --config experiments/configs/distill.py:encoder --workdir /tmp/db
    python -m experiments.train --config experiments/configs/distill.py:compressed --workdir /tmp/c

The teacher (`config.teacher`, a run config of its own) is trained first in
`<workdir>/teacher` unless `--config.distill.teacher_workdir` names a finished run of it.

- `tiny`: a 4-layer teacher (1200 steps), a 2-layer student (300 steps): soft targets at T=1,
  a 0.1 weight on the hard labels.
- `cached`: the same, from the teacher's top-16 logits cached on disk before training.
- `encoder`: DistilBERT's recipe on masked-LM: a 4-layer teacher, a 2-layer student initialized
  from every other teacher layer, loss 5 L_ce (T=2) + 2 L_mlm + 1 L_cos (last hidden states).
- `compressed`: the `tiny` student pruned to 50% and trained with int8 QAT while it distills.
"""

from experiments.configs import common

ARGS = ("tiny", "cached", "encoder", "compressed")


def _lm(steps: int, n_layers: int):
  c = common.shrink_for_cpu(common.base_config("tiny", task="lm"), steps=steps)
  c.model.n_layers = n_layers
  return c


def get_config(arg: str | None = None):
  arg = arg or "tiny"
  if arg not in ARGS:
    raise ValueError(f"distill.py:{arg}: choose one of {ARGS}.")
  if arg == "encoder":
    teacher = common.shrink_for_cpu(common.base_config("tiny-encoder", task="mlm"), steps=600)
    teacher.model.n_layers = 4
    c = common.shrink_for_cpu(common.base_config("tiny-encoder", task="mlm"), steps=300)
    for run in (teacher, c):  # post-LN BERT at the decoder's 3e-3 stays at the unigram loss
      run.optim.lr = 1e-3
    c.distill.update(
      method="kd",
      task_weight=2.0,
      kd_weight=5.0,
      hidden_weight=1.0,
      hidden_kind="cosine",
      layer_map="last",
      init="every_other",
    )
  else:
    teacher = _lm(steps=1200, n_layers=4)
    c = _lm(steps=300, n_layers=2)
    # Soft targets at T=1 carry the teacher's whole predictive distribution; the hard labels
    # get a lower weight (Hinton et al.). On this source T=2 slows the student (README).
    c.distill.update(method="kd", task_weight=0.1, kd_weight=1.0, temperature=1.0)
  if arg == "cached":
    c.distill.update(top_k=16, cache=True)
  if arg == "compressed":
    c.prune.update(method="gradual", sparsity=0.5, start=50, end=200, every=50)
    c.quant.method = "qat"
  c.teacher = teacher
  return c
