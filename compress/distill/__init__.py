"""Distillation: soft-target KD (forward/reverse KL, JSD; temperature with T^2; token masks;
chunked over the sequence; teacher top-k), hidden-state and attention-map losses, and
DistilBERT's every-other-layer map. Pure functions of arrays.

    kd, weight = distill.kd_loss(student_logits, teacher_logits, mask, temperature=2.0)
"""

from compress.distill.init import init_from_teacher
from compress.distill.losses import (
  KINDS,
  attention_loss,
  every_other_layer,
  hidden_loss,
  kd_loss,
  teacher_top_k,
)

__all__ = [
  "KINDS",
  "attention_loss",
  "every_other_layer",
  "hidden_loss",
  "init_from_teacher",
  "kd_loss",
  "teacher_top_k",
]
