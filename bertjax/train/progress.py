"""Steps per second and ETA, reported every `every_steps` steps, every `every_secs` seconds and at the last step.

Called after every step with the number of steps done; the first call only sets the starting point (so the
first rate excludes compilation). Each report writes `steps_per_sec` and `uptime` scalars and logs
`Setting work unit notes: 12.3 steps/s, 40.0% (400/1000), ETA: 0:00:49` (the line clu's ReportProgress logged).
"""

from __future__ import annotations

import datetime
import logging
import time


def format_secs(secs: float) -> str:
  return str(datetime.timedelta(seconds=round(secs)))


class ReportProgress:

  def __init__(self, num_train_steps: int, writer, every_steps: int | None = None, every_secs: float | None = 60.0,
               clock=time.monotonic):
    self.num_train_steps, self.writer = num_train_steps, writer
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
    logging.info("Setting work unit notes: %s", message)
    self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
    self.writer.write_scalars(step, {"uptime": t - self.t_start})
    self.prev_step, self.prev_time = step, t
    return True
