"""GLUE fine-tuning from TFDS (glue/<task>): BERT-base from the Hugging Face checkpoint, and
DistilBERT's recipe distilled from it.

    python -m experiments.train --config experiments/configs/glue.py:sst2 --workdir /tmp/sst2
    python -m experiments.train --config experiments/configs/glue.py:mnli,distil --workdir /tmp/d
    python -m experiments.train --config experiments/configs/glue.py:sst2,tiny --workdir /tmp/t

The arg is a task (cola, sst2, mrpc, qqp, mnli, qnli, rte, wnli; stsb is regression and is not
run), then optional flags:
- (none): BERT-base (`init_from = "hf:bert-base-uncased"`, a fresh classifier head), Devlin et
  al.'s fine-tuning: batch 32, seq_len 128, lr 2e-5 with 10% warmup and linear decay, weight
  decay 0.01, dropout 0.1, 3 epochs; evaluated on the whole validation split every epoch
  (eval.steps=0). Hardware: one GPU or a TPU v4-8 / v5e-8 (bfloat16): minutes (rte) to a few
  hours (mnli, qqp).
- `distil`: a 6-layer student initialized from every other layer of the fine-tuned BERT-base
  (the run above, trained first in `<workdir>/teacher` unless --config.distill.teacher_workdir
  names a finished one), trained on the task with the teacher's soft targets (T=2, weight 0.5)
  and the labels (weight 0.5) for 3 epochs at lr 5e-5.
- `tiny`: the tiny encoder with the byte tokenizer, from scratch, 20 steps: a CPU check of the
  pipeline (the tests run it on mocked data).

The data must be prepared in `data.tfds.data_dir` (`tfds build glue/<task>` where it can
download; GLUE is small), and the tokenizer / checkpoint named on the Hub must be reachable
or be local directories (--config.data.tokenizer=/path --config.init_from=hf:/path).
"""

import math

from experiments.data import tfds as tfds_data
from experiments.configs import common

# Train examples of each task in TFDS glue 2.0.0 (for epochs -> steps).
TRAIN_EXAMPLES = dict(
  cola=8551, sst2=67349, mrpc=3668, qqp=363846, mnli=392702, qnli=104743, rte=2490, wnli=635
)
FLAGS = ("distil", "tiny")


def _finetune(task: str, tiny: bool):
  _, num_labels = tfds_data.glue_task(f"glue/{task}")
  c = common.base_config("tiny-encoder" if tiny else "bert-base", task="classify")
  c.model.update(head="classify", num_labels=num_labels)
  c.data.source = "tfds"
  c.data.tfds.name = f"glue/{task}"
  c.eval.steps = 0  # the whole validation split
  if tiny:
    c.train.update(steps=20, batch_size=16, seq_len=64, log_every=5, checkpoint_every=20)
    c.eval.update(every=10, batch_size=16)
    c.optim.update(lr=1e-3, warmup_steps=2, weight_decay=0.0)
    c.data.tfds.shuffle_buffer = 100
    return c
  c.dtype = "bfloat16"
  c.init_from = "hf:bert-base-uncased"
  c.data.tokenizer = "bert-base-uncased"
  c.model.dropout_rate = 0.1
  c.train.update(batch_size=32, seq_len=128, log_every=50)
  epoch = math.ceil(TRAIN_EXAMPLES[task] / 32)
  return common.bert_finetune(c, lr=2e-5, epochs=3, epoch=epoch, b2=0.999, eps=1e-6)


def get_config(arg: str | None = None):
  task, *flags = (arg or "sst2").split(",")
  tfds_data.glue_task(f"glue/{task}")  # an unknown task (or stsb) raises here
  if unknown := sorted(set(flags) - set(FLAGS)):
    raise ValueError(f"glue.py:{arg}: unknown flag(s) {unknown}; choose from {FLAGS}.")
  tiny = "tiny" in flags
  c = _finetune(task, tiny)
  if "distil" not in flags:
    return c
  teacher = c
  c = _finetune(task, tiny)
  c.init_from = ""  # the student starts from its teacher's layers
  c.model.n_layers = 2 if tiny else 6
  if tiny:
    teacher.model.n_layers = 4
  else:
    c.optim.lr = 5e-5
  c.distill.update(method="kd", init="every_other", temperature=2.0, task_weight=0.5, kd_weight=0.5)
  c.teacher = teacher
  return c
