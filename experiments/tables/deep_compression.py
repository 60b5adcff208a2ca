"""Deep Compression (Han, Mao & Dally 2016): dense -> pruned -> pruned + quantized, and the same
pipeline with distillation from the dense model, in bytes on disk and excess loss.

Each stage starts from the previous stage's model and trains `ft` steps:
- pruned: gradual magnitude pruning to 90% of every kernel (cubic over the first two thirds),
  exported as bitmask + float32 values;
- quantized (without pruning, for comparison): 4-bit weight QAT (8-bit activations), exported
  as int4 codes packed two per byte;
- pruned + quantized: the pruned model with its masks kept and 4-bit QAT; the export stores
  each code matrix as a bitmask + its non-zero int4 codes;
- + distilled: both stages again, each also distilling (KD, T=1) from the teacher: the dense
  model trained on as long as both stages (`dense-long`), so that it is clearly better than
  any student can become.
Embedding tables are stored at 8 bits in every integer export. Losses are those of the
exports as served (`sparse_*` / `serve_*`); the dense model's size is its float32 parameters.
On disk, orbax compresses each array with zstd (Han et al. used Huffman coding as the third
stage); the sizes are what `du` would count.

- tiny: the tiny LM (experiments/configs/lm.py:tiny), dense 200 steps, 100 per stage; about
  7 minutes on 2 CPU cores with 3 seeds.
- small: the same model, dense 600 steps (the tiny run's length), 200 per stage; about 12
  minutes on 2 CPU cores with 5 seeds.

Why distillation once failed to help here: the teacher was the dense model the pipeline
started from, trained 200 steps. Each stage trains on, so the compressed students (400 steps
in all) had passed their teacher (pruned + int4: 0.932 excess loss against the teacher's
0.963), and the KD term pulled them back towards a weaker model (0.954). Distillation needs a
teacher better than the student can become alone; the teacher is now the dense model trained
as long as the whole pipeline.
- full: GPT-2 small from `hf:gpt2` on lm1b (lm_tfds.py:lm1b,hf), 2,000 steps per stage:
  about 4 hours on a TPU v4-8.
"""

from experiments.tables import Arm, Check, Report, agreement, copy, dense_lm, finetune, loss_key

TITLE = "Deep Compression: pruning x quantization (x distillation), bytes on disk (Han et al.)"
PAPER = """
Han, Mao & Dally: pruning (9-13x fewer connections), trained quantization (32 -> 5 bits) and
Huffman coding compound without accuracy loss:

| network | size | compressed | ratio | top-1 error (ref -> compressed) |
|---|---:|---:|---:|---|
| AlexNet | 240 MB | 6.9 MB | 35x | 42.78% -> 42.78% |
| VGG-16 | 552 MB | 11.3 MB | 49x | 31.50% -> 31.17% |
"""

NOTES = """Each stage trains on from the previous one, so later stages have trained longer: the
quantized and pruned + quantized models can end below the dense model they started from. The
distilled rows learn from the dense model trained on as long as both stages (the teacher row),
which no student passes. Greedy agreement: the fraction of 16 greedy new tokens, after 16-token
prompts from 8 eval sequences, equal to the dense model's, of each export as reloaded."""

STEPS = {"tiny": (200, 100), "small": (600, 200), "test": (6, 6), "full": (0, 2000)}
SPARSITY, BITS = 0.9, 4

# arm -> (the loss key prefix of its export, its bytes-on-disk key)
EXPORT = {
  "dense": ("", "float32_bytes"),
  "dense-long": ("", "float32_bytes"),
  "pruned": ("sparse_", "sparse_bytes"),
  "quantized": ("serve_", "export_bytes"),
  "pruned-quantized": ("serve_", "export_bytes"),
  "pruned-kd": ("sparse_", "sparse_bytes"),
  "pruned-quantized-kd": ("serve_", "export_bytes"),
}
LABELS = {
  "dense": "dense (float32)",
  "dense-long": "dense, trained as long: the teacher",
  "pruned": f"pruned {SPARSITY:.0%}",
  "quantized": f"quantized (int{BITS})",
  "pruned-quantized": f"pruned {SPARSITY:.0%} + int{BITS}",
  "pruned-kd": f"pruned {SPARSITY:.0%}, distilled",
  "pruned-quantized-kd": f"pruned {SPARSITY:.0%} + int{BITS}, distilled",
}


def arms(scale: str) -> list[Arm]:
  dense_steps, ft = STEPS[scale]
  dense = dense_lm(scale, dense_steps)
  base = finetune(copy(dense, init_from=""), ft)
  gradual = {"prune.method": "gradual", "prune.sparsity": SPARSITY}
  every = max(1, ft // 6)  # 4 mask updates, the last at about two thirds of the stage
  gradual.update({"prune.start": 0, "prune.end": 4 * every, "prune.every": every})
  keep_masks = {"prune.method": "oneshot", "prune.sparsity": SPARSITY, "prune.start": 0}
  q = {"quant.method": "qat", "quant.bits": BITS, "quant.act_bits": 8}
  kd = {"distill.method": "kd", "distill.temperature": 1.0, "distill.task_weight": 0.1}
  long = finetune(copy(dense, init_from=""), 2 * ft)
  pqkd = copy(base, **keep_masks, **q, **kd)
  return [
    Arm("dense", dense),
    Arm("dense-long", long, "dense"),
    Arm("pruned", copy(base, **gradual), "dense", reference="dense"),
    Arm("quantized", copy(base, **q), "dense", reference="dense"),
    Arm("pruned-quantized", copy(base, **keep_masks, **q), "pruned", reference="dense"),
    Arm("pruned-kd", copy(base, **gradual, **kd), "dense", "dense-long", reference="dense"),
    Arm("pruned-quantized-kd", pqkd, "pruned-kd", "dense-long", reference="dense"),
  ]


def report(res) -> Report:
  key = loss_key(res, "dense")
  f32 = res.rows["pruned"][0]["row"]["float32_bytes"]

  def size(arm):
    k = EXPORT[arm][1]
    return f32 if arm.startswith("dense") else res.mean_std(arm, k)[0]

  rows = []
  for arm, (prefix, _) in EXPORT.items():
    if arm not in res.rows:  # an older table, without the teacher's row
      continue
    agree = "1 (itself)" if arm == "dense" else agreement(res, arm)
    sz = f"{size(arm):,.0f}"
    rows.append([LABELS[arm], res.fmt(arm, prefix + key), sz, f"{f32 / size(arm):.1f}x", agree])
  m = lambda arm: res.mean_std(arm, EXPORT[arm][0] + key)[0]  # noqa: E731
  pq = "pruned-quantized"
  checks = [
    Check(
      "pruning and quantization compound: pruned + quantized is smaller than either alone",
      bool(size(pq) < min(size("pruned"), size("quantized"))),
      f"{size(pq):,.0f} B vs pruned {size('pruned'):,.0f} B, quantized {size('quantized'):,.0f} B",
    ),
    Check(
      "quantizing the pruned model costs less than pruning did",
      bool(m(pq) - m("pruned") < m("pruned") - m("dense")),
      f"{m(pq) - m('pruned'):+.4f} for int{BITS} vs {m('pruned') - m('dense'):+.4f} for pruning",
    ),
    res.less("pruned-kd", "pruned", "sparse_" + key, "distillation lowers the pruned model's loss"),
    res.less(
      "pruned-quantized-kd", pq, "serve_" + key, "distillation lowers the compressed model's loss"
    ),
  ]

  def plot(fig, res):
    ax = fig.add_subplot(1, 1, 1)
    for arm, (prefix, _) in EXPORT.items():
      if arm not in res.rows:
        continue
      mean, std = res.mean_std(arm, prefix + key)
      ax.errorbar(size(arm), mean, std, marker="o", capsize=3, label=LABELS[arm])
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk")
    ax.set_ylabel(f"{key} of the export (nats/token)")
    ax.set_title("Deep Compression: size vs loss")
    ax.legend(fontsize=8)

  return Report(
    ["model", f"{key} (as exported)", "bytes on disk", "compression", "greedy agreement"],
    rows,
    checks,
    plot,
    NOTES,
  )
