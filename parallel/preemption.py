"""Preemption: on SIGTERM (what Cloud TPU and Kubernetes send before they take the machine),
the train loop saves a checkpoint at the end of the current step and exits.

    preemption = Preemption()
    for step in ...:
      state = train_step(state, batch)
      if preemption.reached(step + 1):
        save(step + 1, state)
        raise Preempted(step + 1)
    preemption.close()

One process: a SIGTERM handler sets a flag; the step that ends after it saves. Several
processes: they must save at the same step (a checkpoint is a collective), so the decision
is JAX's preemption sync service (`jax.distributed.initialize` starts it and catches
SIGTERM on every process): once any process is told, all agree on a step and every
process's `reached(step)` is True at that step.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped because it was asked to (SIGTERM).

  Rerunning the same command resumes there. `python -m experiments.train` exits with
  status 143 (128 + SIGTERM) so a scheduler sees a terminated job, not a finished one.
  """

  def __init__(self, step: int):
    super().__init__(f"Preempted (SIGTERM): saved the checkpoint at step {step}; rerun to resume.")
    self.step = step

  def __reduce__(self):  # crosses process boundaries intact (a worker pool's result)
    return Preempted, (self.step,)


class Preemption:
  """Whether the run has been asked to stop: `reached(step)` is True at the step to save at."""

  def __init__(self):
    self.received = False
    self._previous = None
    self._multi = jax.process_count() > 1  # JAX's sync service owns SIGTERM then
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    if not self.received:
      logging.warning(
        "Received signal %d: saving a checkpoint after this step, then exiting.", signum
      )
    self.received = True

  def reached(self, step: int) -> bool:
    """Call after every step, on every process, with the number of steps done."""
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    """Gives SIGTERM back to whoever had it before (the default: terminate)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
