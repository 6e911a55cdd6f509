"""What keeps a run's work safe: preemption signals, the divergence guard's host side, the workdir lock,
the learning-rate schedule a resumed run continues with, and `config.json` bookkeeping.

Exit codes (`bertjax.main` turns these exceptions into them):
  128 + signal (143 for SIGTERM, 130 for SIGINT)  preempted; a checkpoint at the signalled step was written
  3                                               diverged: too many consecutive non-finite steps
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import optax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.errors import Diverged, UserError
from bertjax.train import optim


class Preempted(Exception):
  """Training stopped on SIGTERM / SIGINT after saving a checkpoint; `code` is the process exit status."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


# -- preemption ----------------------------------------------------------------------------------------------
class PreemptionWatcher:
  """Notices SIGTERM / SIGINT without any per-step device sync.

  One process: our own handlers set a flag that the step loop reads. Several processes: JAX's coordination
  service already receives the preemption notice; `reached_preemption_sync_point(step)` makes every process
  agree on the same step, so all of them save that step together."""

  def __init__(self):
    self.signum: int | None = None
    self.multihost = jax.process_count() > 1
    self._old: dict[int, Any] = {}

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is threading.main_thread():
      sigs = (signal.SIGINT,) if self.multihost else (signal.SIGTERM, signal.SIGINT)
      for s in sigs:  # multi-host: JAX's preemption notifier owns SIGTERM
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now, as usual
      raise KeyboardInterrupt
    self.signum = signum

  def should_stop(self, step: int) -> bool:
    """True when training must save `step` and exit (the same answer on every process)."""
    if self.multihost:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signum = self.signum or signal.SIGTERM
          return True
      except RuntimeError:  # preemption service disabled: only our SIGINT handler is left
        pass
      return False  # a local SIGINT alone cannot be agreed on; the coordination service handles SIGTERM
    return self.signum is not None

  def exit_code(self) -> int:
    return 128 + int(self.signum or signal.SIGTERM)


# -- divergence guard (host side) ------------------------------------------------------------------------------
class SkipMonitor:
  """Reads each step's on-device `skipped` flag one step late (after the next step was dispatched), so the
  device never waits for the host; logs `skipped non-finite step N`, raises Diverged after `limit` in a row."""

  def __init__(self, limit: int):
    self.limit, self.consecutive, self.total, self.interval = max(1, int(limit)), 0, 0, 0
    self._pending: tuple[int, jax.Array] | None = None

  def push(self, step: int, flag: jax.Array) -> None:
    """`flag` is step `step`'s skipped flag (a device scalar); checks the previously pushed one."""
    flag.copy_to_host_async()
    self.flush()
    self._pending = (step, flag)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, flag = self._pending
    self._pending = None
    if not bool(flag):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.total += 1
    self.interval += 1
    logging.warning("skipped non-finite step %d (%d in a row, limit %d)", step, self.consecutive, self.limit)
    if self.consecutive >= self.limit:
      raise Diverged(f"training diverged: {self.consecutive} consecutive non-finite steps, the last at step {step}; "
                     "the last checkpoint holds finite parameters; lower optimizer.learning_rate or raise "
                     "training.max_consecutive_skips")

  def take_interval(self) -> int:
    n, self.interval = self.interval, 0
    return n


# -- the workdir lock --------------------------------------------------------------------------------------------
class WorkdirLock:
  """`flock` on the workdir folder itself (no lock file): released by the kernel when the process dies, and a
  copied workdir is another inode, so a stale lock never blocks. Object stores: no lock (see README)."""

  def __init__(self, workdir: str):
    self.workdir, self.fd = workdir, None

  def __enter__(self) -> "WorkdirLock":
    if not paths.is_local(self.workdir) or jax.process_index() > 0:
      return self
    fd = os.open(paths.resolve(self.workdir), os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise UserError(f"workdir {self.workdir} is in use by another live bertjax run; wait for it to finish "
                      "or use another --workdir") from None
    self.fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self.fd is not None:
      os.close(self.fd)  # closing the descriptor releases the flock
      self.fd = None


# -- learning-rate schedule on resume ----------------------------------------------------------------------
SCHEDULE_FIELDS = ("learning_rate", "schedule", "warmup_steps", "warmup_fraction", "end_learning_rate", "power")


def schedule_spec(opt: ConfigDict, num_train_steps: int) -> dict:
  """The JSON description of a schedule stored in checkpoint meta (`restart` set by continue_schedule)."""
  return {"num_train_steps": int(num_train_steps), **{k: opt.get(k) for k in SCHEDULE_FIELDS}, "restart": None}


def build_schedule(spec: Mapping) -> optax.Schedule:
  """An optax schedule from `schedule_spec` output, including a `restart` (warmup-free decay from its step)."""
  r = spec.get("restart")
  if not r:
    return optim.schedule(ConfigDict({k: spec[k] for k in SCHEDULE_FIELDS if spec.get(k) is not None}),
                          int(spec["num_train_steps"]))
  base = build_schedule(r["before"])  # the schedule the steps before the restart were trained with
  s0, lr0, n = int(r["step"]), float(r["learning_rate"]), int(spec["num_train_steps"])
  end = float(spec.get("end_learning_rate") or 0.0)
  if spec["schedule"] == "constant":
    decay = optax.constant_schedule(lr0)
  elif spec["schedule"] == "polynomial":
    decay = optax.polynomial_schedule(lr0, end, float(spec.get("power") or 1.0), max(1, n - s0))
  else:
    decay = optax.linear_schedule(lr0, end, max(1, n - s0))
  return optax.join_schedules([base, lambda s: decay(s)], [s0])


def resume_schedule(old: Mapping | None, new: dict, step: int, choice: str) -> dict:
  """The schedule a run resumed at `step` continues with; refuses (one line) a silent jump of the LR.

  Unchanged settings (or a checkpoint without a recorded schedule) -> the checkpoint's schedule, restarts
  included. Changed settings with the same LR at `step` (e.g. more steps of a constant schedule) -> the new one.
  Otherwise `choice` decides: 'restart' = a warmup-free decay from the LR the old schedule has at `step` to
  end_learning_rate at the new num_train_steps; 'extend' = the new settings as if the run had been planned with
  them from step 0 (the LR moves to the new schedule's value at `step`)."""
  if not old:
    return new
  base = {k: v for k, v in old.items() if k != "restart"}
  if base == {k: v for k, v in new.items() if k != "restart"}:
    return dict(old)
  lr_old, lr_new = float(build_schedule(old)(step)), float(build_schedule(new)(step))
  if choice == "restart":
    spec = {**new, "restart": {"step": int(step), "learning_rate": lr_old, "before": dict(old)}}
    logging.info("continue_schedule=restart: the learning rate decays from %.3e at step %d to %.3e at step %d",
                 lr_old, step, float(new.get("end_learning_rate") or 0.0), new["num_train_steps"])
    return spec
  if choice == "extend":
    logging.info("continue_schedule=extend: the new schedule from step 0; learning rate %.3e -> %.3e at step %d",
                 lr_old, lr_new, step)
    return new
  if choice:
    raise UserError(f"training.continue_schedule={choice!r}; use 'restart', 'extend' or ''")
  if abs(lr_old - lr_new) <= 1e-7 * max(abs(lr_old), abs(lr_new), 1e-30):
    return new
  changed = sorted(k for k in new if k != "restart" and old.get(k) != new[k])
  raise UserError(f"resuming at step {step} with changed {', '.join(changed)} would move the learning rate from "
                  f"{lr_old:.3e} to {lr_new:.3e}; set training.continue_schedule=restart (decay from {lr_old:.3e} "
                  "to the new end) or =extend (the new schedule as if planned from step 0)")


def check_batch_size(meta: Mapping, global_batch_size: int, allow: bool) -> None:
  old = (meta.get("data") or {}).get("global_batch_size")
  if old is not None and int(old) != int(global_batch_size) and not allow:
    raise UserError(f"the checkpoint was trained with training.global_batch_size={old}, not {global_batch_size}; "
                    "the data order would change: use the same size, or set "
                    "training.allow_batch_size_change=True to resume anyway")


# -- config.json -----------------------------------------------------------------------------------------------
def write_config(workdir: str, text: str) -> str:
  """`config.json` on the first run; a different config later goes beside it as config.<UTC time>.json."""
  path = paths.join(workdir, "config.json")
  if paths.exists(path):
    try:
      same = json.loads(paths.read_text(path)) == json.loads(text)
    except ValueError:
      same = False
    if same:
      return path
    path = paths.join(workdir, time.strftime("config.%Y%m%dT%H%M%SZ.json", time.gmtime()))
    logging.info("the config differs from the workdir's config.json; this run's config is in %s", path)
  return paths.write_text(path, text)
