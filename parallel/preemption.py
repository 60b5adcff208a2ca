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

import contextlib
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped because it was asked to (SIGTERM);
  or, `during` work outside the train loop (a teacher's cache, the exports), it stopped that
  work at once, keeping none of it, with `step` its latest checkpoint (None: none yet).

  Rerunning the same command resumes there. `python -m experiments.train` exits with
  status 143 (128 + SIGTERM) so a scheduler sees a terminated job, not a finished one.
  """

  def __init__(self, step: int | None, during: str = ""):
    if during:
      where = "no checkpoint yet" if step is None else f"the latest checkpoint is step {step}"
      message = f"Preempted (SIGTERM) during {during}, which the rerun redoes; {where}."
    else:
      message = f"Preempted (SIGTERM): saved the checkpoint at step {step}; rerun to resume."
    super().__init__(message)
    self.step, self.during = step, during

  def __reduce__(self):  # crosses process boundaries intact (a worker pool's result)
    return Preempted, (self.step, self.during)


@contextlib.contextmanager
def stop_at_once(during: str, step: int | None):
  """Outside the train loop, where nothing is saved mid-way (building a teacher's cache, the
  exports), SIGTERM raises Preempted(step, during) at once: the work is redone by the rerun,
  and writes it half did are never taken as complete (they go to temporary paths). One
  process in the main thread only: with several, JAX's sync service owns SIGTERM."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def stop(signum, frame):
    del signum, frame
    raise Preempted(step, during)

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


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
