"""Training progress: the periodic steps/s + ETA hook, the live progress bar, the end-of-run summary table.

`ReportProgress` is called after every step with the number of steps done; the first call only sets the
starting point (so the first rate excludes compilation). Every `every_steps` steps, every `every_secs` seconds and
at the last step it writes `steps_per_sec` and `uptime` scalars and logs
`Setting work unit notes: 12.3 steps/s, 40.0% (400/1000), ETA: 0:00:49` (the line clu's ReportProgress logged).

`ProgressBar` (tqdm) replaces the periodic log lines on an interactive terminal and in Jupyter / Colab
(`training.progress_bar`: auto | on | off); `summary` is the table logged at the end of a run.
"""

from __future__ import annotations

import datetime
import importlib.util
import io
import logging
import os
import sys
import time
from typing import Mapping

import jax
from tqdm import tqdm as tqdm_console
from tqdm.notebook import tqdm as tqdm_notebook

from bertjax.errors import UserError
from bertjax.train import metrics as mlib


def format_secs(secs: float) -> str:
  return str(datetime.timedelta(seconds=round(secs)))


class ReportProgress:

  def __init__(self, num_train_steps: int, writer, every_steps: int | None = None, every_secs: float | None = 60.0,
               clock=time.monotonic, log: bool = True):
    self.num_train_steps, self.writer, self.log = num_train_steps, writer, log
    self.every_steps, self.every_secs, self.clock = every_steps, every_secs, clock
    self.t_start = clock()
    self.prev_step: int | None = None
    self.prev_time = 0.0

  def _due(self, step: int, t: float) -> bool:
    return (step != self.prev_step and (bool(self.every_steps) and step % self.every_steps == 0
                                        or self.every_secs is not None and t - self.prev_time > self.every_secs
                                        or step == self.num_train_steps))

  def __call__(self, step: int) -> bool:
    t = self.clock()
    if self.prev_step is None:
      self.prev_step, self.prev_time = step, t
      return False
    if not self._due(step, t):
      return False
    steps_per_sec = (step - self.prev_step) / max(t - self.prev_time, 1e-9)
    message = f"{steps_per_sec:.1f} steps/s"
    if self.num_train_steps > 0:
      message += (f", {100 * step / self.num_train_steps:.1f}% ({step}/{self.num_train_steps}), "
                  f"ETA: {format_secs((self.num_train_steps - step) / max(steps_per_sec, 1e-9))}")
    if self.log:  # off while a progress bar shows the same
      logging.info("Setting work unit notes: %s", message)
    self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
    self.writer.write_scalars(step, {"uptime": t - self.t_start})
    self.prev_step, self.prev_time = step, t
    return True


# -- the live progress bar (interactive runs) -----------------------------------------------------------------
BAR_SETTINGS = ("auto", "on", "off")


def check(config) -> None:
  """Raise the one-line UserError of a bad `training.progress_bar` before anything is written."""
  value = config.training.get("progress_bar", "auto")
  if value not in BAR_SETTINGS:
    raise UserError(f"training.progress_bar={value!r} is unknown; choose one of {list(BAR_SETTINGS)}")


def in_notebook() -> bool:
  """True inside a Jupyter / Colab kernel (not a terminal IPython, not plain Python)."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
  return shell is not None and hasattr(shell, "kernel")


def want_bar(setting: str, stream=None) -> bool:
  """`training.progress_bar`: "on", "off", or "auto" = the log stream (stderr) is an interactive terminal or this is
  a notebook. Only process 0 shows a bar."""
  if setting == "off" or jax.process_index() > 0:
    return False
  if setting == "on":
    return True
  stream = sys.stderr if stream is None else stream
  return in_notebook() or bool(getattr(stream, "isatty", lambda: False)())


class _AboveBar(logging.Handler):
  """Wraps a log handler so that a record is printed above the bar, not through it."""

  def __init__(self, inner: logging.Handler, bar):
    super().__init__()
    self.inner, self.bar = inner, bar

  def handle(self, record: logging.LogRecord) -> bool:
    self.bar.clear()
    try:
      return bool(self.inner.handle(record))
    finally:
      self.bar.refresh()


def _columns(stream) -> int:
  try:
    return os.get_terminal_size(stream.fileno()).columns
  except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
    return 0


class ProgressBar:
  """A tqdm bar over the training steps (steps, ETA; loss and tokens/s at each logging interval) on stderr, or a
  widget in a notebook with ipywidgets. While it is open, log records of the root logger print above it."""

  def __init__(self, total: int, initial: int, stream=None):
    if in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
      tqdm = tqdm_notebook
    else:
      tqdm = tqdm_console
    stream = sys.stderr if stream is None else stream
    sized = _columns(stream) > 0  # a terminal of width 0 (some ptys): tqdm would draw nothing
    self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=sized,
                    ncols=None if sized else 100, file=stream)
    root = logging.getLogger()
    self.handlers = list(root.handlers)
    root.handlers[:] = [_AboveBar(h, self.bar) for h in self.handlers]

  def update(self, step: int) -> None:
    self.bar.update(step - self.bar.n)

  def show(self, scalars: Mapping[str, float], tokens_per_s: float) -> None:
    loss = scalars.get("loss")
    self.bar.set_postfix_str((f"loss {loss:.4f} | " if loss is not None else "") + f"{tokens_per_s:,.0f} tokens/s")

  def close(self) -> None:
    root = logging.getLogger()
    root.handlers[:] = [h.inner if isinstance(h, _AboveBar) else h for h in root.handlers]
    self.bar.close()


# -- the end-of-run summary ----------------------------------------------------------------------------------
def table(rows: list[tuple[str, str]], title: str) -> str:
  """A two-column text table: `title`, then one `name | value` row per entry."""
  width = max(len(k) for k, _ in rows)
  rule = "-" * (width + 2 + max(len(v) for _, v in rows))
  return "\n".join([title, rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])


def _headline(m: Mapping[str, float], main_metric: str) -> str:
  """The main metric and the usual headline numbers present (the rest is in eval_metrics.json)."""
  keys = list(dict.fromkeys(k for k in (main_metric, *mlib.HEADLINE) if k in m))
  return ", ".join(f"{k} {float(m[k]):.4f}" for k in keys) or "-"


def summary(*, step: int, total: int, first_step: int, wall_secs: float, loop_secs: float,
            train_loss: float | None, eval_metrics: Mapping[str, float], main_metric: str, best: Mapping,
            checkpoint_dir: str, checkpoint_steps: list[int], best_dir: str | None, metrics_file: str) -> str:
  """The end-of-run table (logged by the trainer)."""
  run = step - first_step
  rows = [("steps", f"{step}/{total}" + (f" ({run} in this run, from step {first_step})" if first_step else "")),
          ("wall time", format_secs(wall_secs)),
          ("steps/s", f"{run / loop_secs:.2f} (training loop, evaluations included)" if run and loop_secs > 0 else "-"),
          ("final train loss", f"{train_loss:.4f} (last logging interval)" if train_loss is not None else "-"),
          ("final eval", _headline(eval_metrics, main_metric))]
  if main_metric and best.get("step") is not None:
    rows.append(("best eval", f"{main_metric} {best['value']:.4f} at step {best['step']}"))
  rows.append(("checkpoints", f"{checkpoint_dir} (steps {', '.join(map(str, checkpoint_steps)) or 'none'})"))
  if best_dir:
    rows.append(("best checkpoint", best_dir))
  rows.append(("eval metrics", metrics_file))
  return table(rows, "run summary")
