"""Named-entity recognition with the encoder's token-classification head.

    python -m experiments.train --config experiments/configs/ner.py:tiny --workdir /tmp/ner
    python -m experiments.train --config experiments/configs/ner.py --workdir /tmp/conll

- `tiny`: the tiny encoder on the synthetic tagging task (experiments/data/encoder.py
  TagSource: IOB2 entities of 3 types whose tags depend on context), after 300 steps of MLM
  pretraining; minutes on 2 CPU cores. Entity-level P / R / F1 (seqeval's) and token accuracy.
- (none): BERT-base cased (`hf:bert-base-cased`) fine-tuned on TFDS conll2003 as Devlin et al.
  (first subtoken of each word labelled): seq_len 128, batch 32, lr 5e-5, 3 epochs; scored on
  the dev split. CoNLL-format files instead of TFDS: --config.data.tfds.name=conll:TRAIN,EVAL.
"""

import math

from experiments.configs import common

CONLL_TRAIN = 14_041  # sentences in conll2003's train split


def get_config(arg: str | None = None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"ner.py:{arg}: choose tiny, or nothing for conll2003 with BERT-base.")
  tiny = arg == "tiny"
  c = common.base_config("tiny-encoder" if tiny else "bert-base", task="tokens")
  if tiny:
    c.model.update(head="tokens", num_labels=7)  # O and B- / I- of 3 types
    c.data.tags = dict(n_types=3, max_entities=4, max_len=4)
    common.shrink_for_cpu(c, steps=600)
    c.optim.lr = 1e-3
    pre = common.shrink_for_cpu(common.base_config("tiny-encoder", task="mlm"), steps=300)
    pre.model.head = "mlm"
    # Rotary positions: a tag depends on relative position ("the symbol after an opener"),
    # which with learned absolute positions the tiny encoder did not learn in 600 steps
    # (all "O": F1 0); with rotary ones it reaches F1 1.0 by step 400.
    c.model.positions = pre.model.positions = "rotary"
    c.pretrain = pre
    return c
  c.model.update(head="tokens", num_labels=9)  # conll2003's tags
  c.dtype = "bfloat16"
  c.init_from = "hf:bert-base-cased"
  c.data.update(source="tfds", tokenizer="bert-base-cased")
  c.data.tfds.update(name="conll2003", eval_split="dev")
  c.model.dropout_rate = 0.1
  c.train.update(batch_size=32, seq_len=128, log_every=50)
  return common.bert_finetune(c, lr=5e-5, epochs=3, epoch=math.ceil(CONLL_TRAIN / 32))
