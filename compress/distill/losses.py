"""Distillation losses as pure functions of logits, hidden states and attention maps.

Every loss returns (sum over the counted tokens, their weight), like the task losses of the
train loop, so sums add up across microbatches and shards and the mean is taken once.

    kd, weight = kd_loss(student_logits, teacher_logits, mask, temperature=2.0)
    kd, weight = kd_loss(student_logits, (top_values, top_indices), mask)   # cached teacher top-k
    cos, weight = hidden_loss(student_hiddens, teacher_hiddens, {0: 1, 1: 3}, mask, "cosine")

Soft targets (Hinton et al.): p = softmax(z / T); the loss is multiplied by T^2 so its
gradient scale does not shrink with T. For the forward KL, d loss / d z_student =
T * (softmax(z_s / T) - softmax(z_t / T)) per token, i.e. (1/T)(...) before the T^2.
"""

import math

import jax
import jax.numpy as jnp

KINDS = ("forward", "reverse", "jsd")


def _check(student, teacher_vocab: int, temperature: float, kind: str):
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 (1 is plain soft targets).")
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: choose one of {KINDS}.")
  if student.shape[-1] != teacher_vocab:
    raise ValueError(
      f"The student's vocabulary ({student.shape[-1]} logits) and the teacher's "
      f"({teacher_vocab}) differ: distillation on logits needs the same vocabulary."
    )


def _per_token(s, t, temperature: float, kind: str, top_idx=None):
  """KD per token (no T^2) for logits s [..., V] and teacher logits t ([..., V], or the
  top-k values [..., k] with their indices `top_idx`)."""
  log_s = jax.nn.log_softmax(s.astype(jnp.float32) / temperature, axis=-1)
  log_t = jax.nn.log_softmax(t.astype(jnp.float32) / temperature, axis=-1)
  if top_idx is not None:  # teacher mass on its top k only, renormalized
    log_s = jnp.take_along_axis(log_s, top_idx, axis=-1)
  p_t = jnp.exp(log_t)
  if kind == "forward":
    return jnp.sum(p_t * (log_t - log_s), axis=-1)
  p_s = jnp.exp(log_s)
  if kind == "reverse":
    return jnp.sum(p_s * (log_s - log_t), axis=-1)
  log_m = jnp.log(0.5 * (p_s + p_t) + 1e-30)
  return 0.5 * jnp.sum(p_t * (log_t - log_m) + p_s * (log_s - log_m), axis=-1)


def kd_loss(
  student_logits: jax.Array,
  teacher,
  mask: jax.Array | None = None,
  *,
  temperature: float = 1.0,
  kind: str = "forward",
  chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Soft-target distillation loss, summed over the tokens `mask` counts, times T^2.

  student_logits: [B, L, V]. teacher: logits [B, L, V], or (values, indices) [B, L, k] of
  the teacher's top k (forward KL only; the teacher's distribution renormalized on them).
  mask: [B, L] weights (padding 0); None counts every token.
  kind: "forward" KL(teacher || student), "reverse" KL(student || teacher), or "jsd".
  chunk: compute over the sequence in chunks of this many positions (each rematerialized
  in the backward pass), so the float32 softmax temporaries stay [B, chunk, V].
  Works unchanged with the vocabulary axis sharded (the softmax sums become all-reduces).
  """
  top_idx = None
  if isinstance(teacher, (tuple, list)):
    teacher, top_idx = teacher
    if kind != "forward":
      raise ValueError("A teacher top-k gives the forward KL only: use kind='forward'.")
    _check(student_logits, student_logits.shape[-1], temperature, kind)
    if top_idx.shape != teacher.shape:
      raise ValueError(f"top-k values {teacher.shape} and indices {top_idx.shape} differ.")
  else:
    _check(student_logits, teacher.shape[-1], temperature, kind)
  b, length = student_logits.shape[:2]
  mask = jnp.ones((b, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
  if not chunk or chunk >= length:
    per = _per_token(student_logits, teacher, temperature, kind, top_idx)
    return temperature**2 * jnp.sum(per * mask), jnp.sum(mask)
  if length % chunk:
    raise ValueError(f"chunk={chunk} does not divide the sequence length {length}.")
  n = length // chunk

  def split(x):  # [B, L, ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def one(args):
    s, t, m, idx = args
    return jnp.sum(_per_token(s, t, temperature, kind, idx) * m)

  idx = None if top_idx is None else split(top_idx)
  sums = jax.lax.map(one, (split(student_logits), split(teacher), split(mask), idx))
  return temperature**2 * jnp.sum(sums), jnp.sum(mask)


def teacher_top_k(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values, indices) of the teacher's k largest logits per token: what to cache."""
  values, indices = jax.lax.top_k(teacher_logits, k)
  return values, indices


def hidden_loss(
  student_hiddens,
  teacher_hiddens,
  layer_map: dict,
  mask: jax.Array | None = None,
  kind: str = "mse",
  projection: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Hidden-state matching summed over the mapped layer pairs and the counted tokens.

  student_hiddens / teacher_hiddens: sequences of [B, L, D] (index = layer).
  layer_map: {student layer: teacher layer}. kind: "mse" (mean over D of the squared
  difference) or "cosine" (1 - cosine similarity, DistilBERT's L_cos).
  projection: [D_student, D_teacher], a learned map when the widths differ.
  """
  if kind not in ("mse", "cosine"):
    raise ValueError(f"kind={kind!r}: choose 'mse' or 'cosine'.")
  for s, t in layer_map.items():
    if not 0 <= s < len(student_hiddens) or not 0 <= t < len(teacher_hiddens):
      raise ValueError(
        f"layer_map {s} -> {t} points past the models' depths (student "
        f"{len(student_hiddens)}, teacher {len(teacher_hiddens)} hidden states)."
      )
  total, weight = jnp.float32(0), None
  for s, t in layer_map.items():
    hs = student_hiddens[s].astype(jnp.float32)
    ht = jax.lax.stop_gradient(teacher_hiddens[t]).astype(jnp.float32)
    if projection is not None:
      hs = hs @ projection
    if hs.shape[-1] != ht.shape[-1]:
      raise ValueError(
        f"Student layer {s} has width {hs.shape[-1]}, teacher layer {t} {ht.shape[-1]}: "
        "pass a projection [D_student, D_teacher]."
      )
    if kind == "mse":
      per = jnp.mean((hs - ht) ** 2, axis=-1)
    else:
      cos = jnp.sum(hs * ht, -1) / (jnp.linalg.norm(hs, axis=-1) * jnp.linalg.norm(ht, axis=-1))
      per = 1.0 - cos
    m = jnp.ones(per.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    total, weight = total + jnp.sum(per * m), jnp.sum(m)
  return total, weight


def attention_loss(student_probs, teacher_probs, mask: jax.Array | None = None):
  """KL(teacher || student) between attention maps [B, H, L, L], summed over heads and the
  counted query rows (keys a mask excludes carry no probability in either map)."""
  if student_probs.shape != teacher_probs.shape:
    raise ValueError(
      f"Attention maps differ in shape: student {student_probs.shape}, teacher "
      f"{teacher_probs.shape} (map heads or layers first)."
    )
  p_t = jax.lax.stop_gradient(teacher_probs).astype(jnp.float32)
  p_s = student_probs.astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  per = jnp.sum(p_t * (jnp.log(p_t + tiny) - jnp.log(p_s + tiny)), axis=-1)  # [B, H, L]
  b, h, length = per.shape
  m = jnp.ones((b, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(per * m[:, None, :]), jnp.sum(m) * h


def every_other_layer(n_teacher: int, n_student: int | None = None) -> dict:
  """DistilBERT's layer map: student layer i <- teacher layer 2i (n_student defaults to half)."""
  n_student = n_student or math.ceil(n_teacher / 2)
  if 2 * (n_student - 1) >= n_teacher:
    raise ValueError(
      f"{n_student} student layers taken from every other of {n_teacher} teacher layers "
      "point past the teacher's depth."
    )
  return {i: 2 * i for i in range(n_student)}
