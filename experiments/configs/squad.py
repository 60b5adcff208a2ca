"""Extractive question answering (SQuAD v1.1) with the encoder's span head, and its
compression: Q8BERT's 8-bit QAT, DistilBERT's distillation, Sanh et al.'s movement pruning.

    python -m experiments.train --config experiments/configs/squad.py:tiny --workdir /tmp/qa
    python -m experiments.train --config experiments/configs/squad.py --workdir /tmp/squad
    python -m experiments.train --config experiments/configs/squad.py:qat --workdir /tmp/q8
    python -m experiments.train --config experiments/configs/squad.py:distil --workdir /tmp/d
    python -m experiments.train --config experiments/configs/squad.py:movement --workdir /tmp/mv

The arg is a size (`tiny` or none: full), then optional flags:
- `tiny`: the tiny encoder on the synthetic span task (experiments/data/encoder.py SpanSource:
  find the span the question's key opens), after 300 steps of MLM pretraining (as
  classify.py:tiny); minutes on 2 CPU cores. EM / F1 over token positions.
- (full): BERT-base (`hf:bert-base-uncased`) fine-tuned on TFDS squad/v1.1 as Devlin et al.:
  seq_len 384, doc stride 128, batch 32, lr 3e-5 with 10% warmup and linear decay, 2 epochs;
  scored on the whole validation split with the official EM / F1 after run_qa's n-best
  postprocessing. One GPU or a TPU v4-8 (bfloat16): about an hour.
- `qat`: the same with 8-bit weights and activations (Q8BERT: symmetric linear quantization,
  fake-quantized in training, exported to int8).
- `distil`: a 6-layer student (every other layer of the fine-tuned BERT-base, trained first in
  `<workdir>/teacher`) on the task loss and the teacher's start / end distributions (T=2).
- `movement`: movement pruning (Sanh et al. 2020) of the encoder's kernels to 90% with the
  cubic schedule over the first two thirds of training, then fine-tuned with the masks fixed.
"""

import math

from experiments.configs import common

FLAGS = ("tiny", "qat", "distil", "movement")
SQUAD_TRAIN = 88_641  # windows of squad/v1.1's 87,599 train questions at 384 / 128 (BERT's)


def _finetune(tiny: bool):
  c = common.base_config("tiny-encoder" if tiny else "bert-base", task="span")
  c.model.update(head="span", num_labels=2)
  if tiny:
    common.shrink_for_cpu(c, steps=1500)  # the plateau at loss ln 4 lasts 100-500 steps, by seed
    c.optim.lr = 1e-3
    c.data.span = dict(n_keys=4, max_answer=6)
    pre = common.shrink_for_cpu(common.base_config("tiny-encoder", task="mlm"), steps=300)
    pre.model.head = "mlm"
    c.pretrain = pre
    return c
  c.dtype = "bfloat16"
  c.init_from = "hf:bert-base-uncased"
  c.data.update(source="tfds", tokenizer="bert-base-uncased")
  c.data.tfds.name = "squad/v1.1"
  c.data.squad = dict(common.SQUAD)
  c.model.dropout_rate = 0.1
  c.train.update(batch_size=32, seq_len=384, log_every=100)
  return common.bert_finetune(c, lr=3e-5, epochs=2, epoch=math.ceil(SQUAD_TRAIN / 32))


def get_config(arg: str | None = None):
  flags = [f for f in (arg or "").split(",") if f]
  if unknown := sorted(set(flags) - set(FLAGS)):
    raise ValueError(f"squad.py:{arg}: unknown flag(s) {unknown}; choose from {FLAGS}.")
  tiny = "tiny" in flags
  c = _finetune(tiny)
  if "qat" in flags:
    c.quant.update(method="qat", bits=8, act_bits=8)
  if "movement" in flags:
    s, every = c.train.steps, max(1, c.train.steps // 30)
    start = s // 10  # the cubic schedule over the first two thirds, in whole updates
    c.prune.update(
      method="gradual",
      sparsity=0.9,
      score="movement",
      start=start,
      end=start + every * ((2 * s // 3 - start) // every),
      every=every,
      select=r"(attn|mlp)/.*kernel$",
    )
  if "distil" in flags:
    teacher = c.copy_and_resolve_references()
    c.init_from = ""
    c.model.n_layers = 2 if tiny else 6
    if tiny:
      teacher.model.n_layers = 4
      teacher.pretrain.model.n_layers = 4
      teacher.pretrain.optim.lr = 1e-3  # at 3e-3 the 4-layer MLM stays at the unigram loss
      del c.pretrain  # the student starts from its teacher's layers
    c.distill.update(
      method="kd", init="every_other", temperature=2.0, task_weight=0.5, kd_weight=0.5
    )
    c.teacher = teacher
  return c
