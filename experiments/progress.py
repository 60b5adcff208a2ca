"""What a run prints while it runs: a progress bar on a terminal or in a notebook, periodic
plain lines elsewhere (a log file, CI), and library INFO logs kept out of the way.

    p = Progress(total=600, initial=0, desc="lm-tiny")
    p.update()                                    # every step: a counter, no device sync
    p.status(25, "loss 4.195, 16.2k tok/s")       # the bar's postfix, or a periodic line
    p.line("step 50: eval_loss 3.971")            # a line above the bar
    p.close()

Used by the train loop (experiments/metrics.py) and by experiments.reproduce (one bar over
runs; its workers write to their run.log, not a terminal, so they print lines).
"""

import logging
import os
import sys
import time

import tqdm

# trimformer's own packages: their INFO lines stay when the libraries' are dropped.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = tuple(
  os.path.join(_ROOT, p) + os.sep for p in ("experiments", "models", "parallel", "compress")
)


class _OwnInfoOnly(logging.Filter):
  """Drops INFO (and DEBUG) records logged from outside trimformer's packages: orbax's
  (through absl) and jax's (Python loggers) chatter. WARNING and above always pass."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or record.pathname.startswith(_OWN)


_FILTER = _OwnInfoOnly()


def quiet_libraries(verbose: bool = False):
  """Library INFO logs off (`verbose`: back on). Filters by where a record was logged, not by
  logger: orbax and trimformer both log through absl's logger."""
  from absl import logging as absl_logging

  for handler in (absl_logging.get_absl_handler(), *logging.root.handlers):
    if verbose:
      handler.removeFilter(_FILTER)
    else:
      handler.addFilter(_FILTER)


def _above_bars(handler: logging.Handler):
  """Makes `handler` clear the progress bars before it writes a line and redraw them after,
  so a log line (a warning, a restored checkpoint) lands above the bar, not through it."""
  target = getattr(handler, "python_handler", handler)  # absl's handler delegates to this one
  if getattr(target, "_above_bars", False) or not isinstance(target, logging.StreamHandler):
    return
  emit = target.emit

  def emit_above(record):
    with tqdm.tqdm.external_write_mode(file=target.stream):
      emit(record)

  target.emit, target._above_bars = emit_above, True


def number(v) -> str:
  """A number for people: 4 significant digits, thousands as k/M/G, never 1.2e+04."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return str(v)
  if isinstance(v, int):
    return f"{v:,}"
  a = abs(v)
  if a >= 1e3:
    scale, suffix = next(
      (10.0**e, s) for e, s in ((12, "T"), (9, "G"), (6, "M"), (3, "k")) if a >= 10.0**e
    )
    x = v / scale
    return f"{x:.{0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2}f}{suffix}"
  if a >= 1e-4 or v == 0 or v != v:
    return f"{v:.4g}"
  return f"{v:.2e}"  # only tiny values (a learning rate at the end of a schedule)


def duration(s: float) -> str:
  """Seconds as 0:42, 12:05 or 3:02:17."""
  s = int(round(s))
  h, m = divmod(s // 60, 60)
  return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _bar_class(file):
  """The tqdm class that draws where the output goes (the widget in Jupyter / Colab, the text
  bar on a terminal), None for a file or a pipe."""
  from tqdm import autonotebook  # the notebook class in a notebook kernel, else tqdm.std's

  if autonotebook.tqdm is not tqdm.std.tqdm:
    return autonotebook.tqdm  # draws in the cell, wherever the streams go
  return tqdm.tqdm if hasattr(file, "isatty") and file.isatty() else None


class Progress:
  """Progress over `total` steps (or runs): a tqdm bar where one draws (a terminal, a
  notebook; `bar` forces it on or off), else a plain line per `status` call with elapsed
  time and ETA. `update` is a counter (call it every step). `warmup`: the rate for the ETA
  starts at the first update, so a first step that compiles does not count. `leave=None`:
  the bar stays when it is the only one, and goes when it was nested in another."""

  def __init__(
    self,
    total: int,
    initial: int = 0,
    desc: str = "",
    unit: str = "step",
    file=None,
    bar: bool | None = None,
    enabled: bool = True,
    leave: bool | None = True,
    warmup: bool = True,
  ):
    self.file, self.total, self.n, self.desc = file or sys.stderr, total, initial, desc
    self.enabled, self.unit = enabled, unit
    self.t0 = time.perf_counter()
    self.anchor = None if warmup else (self.t0, initial)  # (time, n) the rate is counted from
    cls = _bar_class(self.file) if bar is None else (tqdm.tqdm if bar else None)
    self.bar = None
    if enabled and cls is not None:
      for handler in logging.root.handlers:
        _above_bars(handler)
      self.bar = cls(
        total=total,
        initial=initial,
        desc=desc or None,
        unit=unit,
        file=self.file,
        dynamic_ncols=True,
        leave=leave,
      )

  def update(self, n: int = 1):
    if self.anchor is None:  # warmup: the time before (compilation) is not the rate
      self.anchor = (time.perf_counter(), self.n + n)
      if self.bar is not None:
        self.bar.unpause()
    self.n += n
    if self.bar is not None:
      self.bar.update(n)

  def eta(self, at: int = 0) -> float | None:
    """Seconds left after step `at` (default: the count), at the rate since the first update;
    None before there is a rate."""
    if self.anchor is None or self.n <= self.anchor[1]:
      return None
    t, n = self.anchor
    return (self.total - max(at, self.n)) * (time.perf_counter() - t) / (self.n - n)

  def status(self, step: int, text: str):
    """Where the run is: the bar's postfix, or a line `step k/total: text, elapsed, ETA`."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.show(text)
      return
    eta = self.eta(step)  # a row is fetched a step or more after its step ran
    left = "" if eta is None else f", ETA {duration(eta)}"
    elapsed = duration(time.perf_counter() - self.t0)
    self.line(f"{self.unit} {step}/{self.total}: {text}, elapsed {elapsed}{left}")

  def show(self, text: str):
    """The bar's postfix (what runs now); nothing without a bar."""
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)

  def line(self, text: str):
    """A line of its own, above the bar."""
    if not self.enabled:
      return
    text = f"{self.desc}: {text}" if self.desc else text
    if self.bar is not None:
      self.bar.write(text, file=self.file)
    else:
      print(text, file=self.file, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
