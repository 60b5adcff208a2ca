"""When masks change and to what sparsity: pure functions of the (traced) step.

A `Schedule` answers two questions for the optimizer step t, both under jit:
`is_update(t)` (recompute the masks at this step?) and `sparsity(t, target)` (the
sparsity in effect after step t, for a layer whose final sparsity is `target`).

    one_shot(at=0)                       # target at step `at`, then fixed
    cubic(start=100, end=1100, every=100)  # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - p)^3
    periodic(every=100)                  # re-select at the target every 100 steps
"""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp


class Schedule(NamedTuple):
  is_update: Callable  # step -> bool
  sparsity: Callable  # (step, target) -> sparsity after that step
  start: int
  end: int | None  # the last step that changes masks (None: never stops)


def _check_steps(start: int, end: int | None, every: int, name: str):
  if start < 0:
    raise ValueError(f"{name}: start={start} must be >= 0.")
  if every < 1:
    raise ValueError(f"{name}: every={every} must be >= 1 step.")
  if end is not None and end < start:
    raise ValueError(
      f"{name}: the schedule ends (end={end}) before it starts (start={start}); set end >= start."
    )


def one_shot(at: int = 0) -> Schedule:
  """The target sparsity, selected once at step `at` and fixed from then on."""
  _check_steps(at, at, 1, "one_shot")
  return Schedule(
    is_update=lambda t: t == at,
    sparsity=lambda t, target: jnp.where(t >= at, target, 0.0),
    start=at,
    end=at,
  )


def cubic(start: int, end: int, every: int, initial: float = 0.0) -> Schedule:
  """Zhu & Gupta's gradual schedule: masks recomputed at start, start + every, ..., end with
  s_t = s_f + (s_i - s_f) * (1 - (t - start) / (end - start))^3, then fixed at s_f.

  `end - start` is n * dt in the paper's notation and must be a multiple of `every` (dt),
  so that the last update lands on s_f.
  """
  _check_steps(start, end, every, "cubic")
  if (end - start) % every:
    raise ValueError(
      f"cubic: end - start = {end - start} is not a multiple of every={every}; the last "
      "update would miss the target. Choose end = start + n * every."
    )
  if not 0.0 <= initial < 1.0:
    raise ValueError(f"cubic: initial sparsity {initial} must lie in [0, 1).")
  span = end - start

  def is_update(t):
    return (t >= start) & (t <= end) & ((t - start) % every == 0)

  def sparsity(t, target):
    last = start + (jnp.minimum(t, end) - start) // every * every  # last update <= t
    p = jnp.clip((last - start) / span, 0.0, 1.0) if span else 1.0  # end == start: one shot
    s = target + (initial - target) * (1.0 - p) ** 3
    return jnp.where(t >= start, s, 0.0)

  return Schedule(is_update, sparsity, start, end)


def periodic(every: int, start: int = 0, end: int | None = None) -> Schedule:
  """The target sparsity from `start`, re-selected every `every` steps until `end`
  (e.g. for scores that change, like movement)."""
  _check_steps(start, end, every, "periodic")

  def is_update(t):
    on = (t >= start) & ((t - start) % every == 0)
    return on if end is None else on & (t <= end)

  return Schedule(
    is_update=is_update,
    sparsity=lambda t, target: jnp.where(t >= start, target, 0.0),
    start=start,
    end=end,
  )
