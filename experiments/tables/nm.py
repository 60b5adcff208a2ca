"""2:4 structured sparsity (Mishra et al. 2021) against unstructured 50%, before and after
retraining.

The recipe: train dense, prune once to 2:4 (the 2 largest |w| of every 4 along the input
dimension), retrain with the masks fixed and the same hyperparameters. Rows: the dense model
(and the same model trained on for the retraining steps, the fair reference after retraining),
one-shot unstructured 50% and one-shot 2:4, each evaluated as pruned and after retraining.

- tiny: the tiny LM (experiments/configs/lm.py:tiny) trained 240 steps, retrained 120;
  about 5 minutes on 2 CPU cores with 3 seeds.
- full: GPT-2 small from `hf:gpt2` on lm1b (lm_tfds.py:lm1b,hf) pruned as it is, retrained
  2,000 steps of 512 x 128 tokens: about an hour on a TPU v4-8 (bfloat16, fsdp).
"""

from experiments.tables import Arm, Check, Report, agreement, copy, dense_lm, finetune, loss_key

TITLE = "2:4 sparsity vs unstructured 50%, before and after retraining (Mishra et al. 2021)"
PAPER = """
Mishra et al.: train dense, prune to 2:4 once, retrain with the mask fixed: "virtually no
loss" (e.g. BERT-large SQuAD F1 91.9 dense / 91.9 2:4). Without retraining 2:4 is worse than
unstructured 50% (the Wanda authors' README, github.com/locuslab/wanda: LLaMA-2-7B, WikiText-2
perplexity, one-shot magnitude pruning; with Wanda's own scores 6.42 and 11.02):

| LLaMA-2-7B, no retraining | perplexity |
|---|---:|
| dense | 5.12 |
| 50% unstructured (magnitude) | 14.89 |
| 2:4 (magnitude) | 54.59 |
"""

AGREEMENT = "greedy agreement with dense (as pruned / retrained)"
NOTES = """Greedy agreement: the fraction of 16 greedy new tokens, after 16-token prompts from 8 eval
sequences, equal to the dense model's continuation (`models.decode.greedy_agreement`), of the
sparse export as reloaded; the dense model is the one the row was pruned from, before
retraining."""

STEPS = {"tiny": (240, 120), "test": (8, 4), "full": (0, 2000)}


def arms(scale: str) -> list[Arm]:
  dense_steps, retrain = STEPS[scale]
  dense = dense_lm(scale, dense_steps)
  base = copy(dense, init_from="")
  oneshot = {"prune.method": "oneshot", "prune.start": 0}
  arms = [Arm("dense", dense), Arm("dense-retrained", finetune(copy(base), retrain), "dense")]
  for name, granularity in (("unstructured-50", "unstructured"), ("2:4", "2:4")):
    c = copy(base, **oneshot, **{"prune.granularity": granularity, "prune.sparsity": 0.5})
    arms.append(Arm(f"{name}-oneshot", finetune(copy(c), 0), "dense", reference="dense"))
    arms.append(Arm(f"{name}-retrained", finetune(c, retrain), "dense", reference="dense"))
  return arms


def report(res) -> Report:
  key = loss_key(res, "dense")
  rows = [["dense", "0", res.fmt("dense", key), res.fmt("dense-retrained", key), "1 (itself)"]]
  for label, name in (("unstructured 50%", "unstructured-50"), ("2:4", "2:4")):
    agree = " / ".join(agreement(res, f"{name}-{k}") for k in ("oneshot", "retrained"))
    rows.append(
      [label, "0.5", res.fmt(f"{name}-oneshot", key), res.fmt(f"{name}-retrained", key), agree]
    )
  dense_loss = res.mean_std("dense-retrained", "eval_loss")[0]
  rel = (res.mean_std("2:4-retrained", "eval_loss")[0] - dense_loss) / dense_loss
  checks = [
    res.less(
      "unstructured-50-oneshot",
      "2:4-oneshot",
      key,
      "before retraining, 2:4 is worse than unstructured 50%",
    ),
    res.less(
      "dense",
      "unstructured-50-oneshot",
      key,
      "before retraining, unstructured 50% is worse than dense",
    ),
    Check(
      "after retraining, 2:4 is close to dense: within 1% (relative, eval loss) of the dense "
      "model trained as long",
      bool(rel <= 0.01),
      f"{100 * rel:+.2f}%",
    ),
    res.less("2:4-retrained", "2:4-oneshot", key, "retraining improves 2:4"),
  ]

  def plot(fig, res):
    import numpy as np

    ax = fig.add_subplot(1, 1, 1)
    groups = [
      ("dense", "dense", "dense-retrained"),
      ("unstructured 50%", "unstructured-50-oneshot", "unstructured-50-retrained"),
      ("2:4", "2:4-oneshot", "2:4-retrained"),
    ]
    x = np.arange(len(groups))
    for i, (label, col) in enumerate((("as pruned", 1), ("after retraining", 2))):
      stats = [res.mean_std(g[col], key) for g in groups]
      ax.errorbar(
        x + (i - 0.5) * 0.2,
        [s[0] for s in stats],
        [s[1] for s in stats],
        fmt="o",
        capsize=4,
        markersize=8,
        label=label,
      )  # points: the differences are small
    ax.set_xticks(x, [g[0] for g in groups])
    ax.set_ylabel(f"{key} (nats/token)")
    ax.set_title("2:4 vs unstructured 50% (mean ± std over seeds)")
    ax.legend()

  cols = ["model", "sparsity", f"{key} as pruned", f"{key} after retraining", AGREEMENT]
  return Report(cols, rows, checks, plot, NOTES)
