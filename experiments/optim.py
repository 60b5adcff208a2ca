"""The optimizer from config: AdamW with warmup + cosine/linear/constant decay and clipping.

The active compression methods change it in two places: the update rule (LSQ's step sizes
get their own Adam) and around the whole optimizer (pruning, its masks in the state).
"""

import ml_collections
import optax

from compress import quant


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.final_lr_fraction, decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.lr)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: choose 'cosine', 'linear' or 'constant'.")
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(
  config: ml_collections.ConfigDict, total_steps: int, methods=()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> the update rule, wrapped by the methods; the learning-rate schedule)."""
  cfg = config.optim
  schedule = make_schedule(cfg, total_steps)
  if cfg.name != "adamw":
    raise ValueError(
      f"optim.name={cfg.name!r}: only 'adamw' is built in; chain your own "
      "optax transform in experiments/optim.py."
    )
  # Weight decay on matrices only: not on biases, norm scales (the usual BERT/GPT recipe),
  # nor on quantization step sizes.
  adamw = optax.adamw(
    schedule,
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=quant.decay_mask,
  )
  for m in methods:
    adamw = m.update_rule(adamw, schedule)
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  tx = optax.chain(clip, adamw)
  for m in methods:
    tx = m.wrap_optimizer(tx)
  return tx, schedule
