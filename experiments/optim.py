"""The optimizer from config: AdamW with warmup + cosine/linear/constant decay and clipping.

Compression transforms chain onto it here: LSQ's learned step sizes get their own Adam
(no weight decay, lr x quant.step_lr_scale), and the pruning transform (config.prune)
wraps the whole optimizer, holding the masks in its state.
"""

import ml_collections
import optax

from compress import quant
from experiments import compression


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
  config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
  q = config.get("quant")
  if q is not None and q.method != "none" and q.lsq:
    step_lr = lambda count: schedule(count) * q.step_lr_scale  # noqa: E731
    adamw = quant.split_optimizer(adamw, optax.adam(step_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  # Pruning wraps the whole optimizer: clipping and Adam see the masked gradients.
  return compression.prune_tx(config, optax.chain(clip, adamw)), schedule
