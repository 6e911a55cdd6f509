"""Quiet, useful logs for the command-line tools (train, predict, convert, ...): what a user needs to read, not
the libraries' internals.

`quiet_libraries()` keeps out of the log: orbax's per-save / per-restore INFO chatter and its harmless
"metadata file does not exist" warnings, JAX's "Unable to initialize backend 'tpu'" INFO line, the `datasets`
INFO lines; and on a host without TPU chips and without a GPU plugin it pins JAX to the CPU, so that an installed
libtpu does not print its initialisation errors. Warnings and errors of every library still show, and `--v=1`
(absl DEBUG) or a JAX_PLATFORMS set by the user leaves everything as it is.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os

import jax
from absl import logging as absl_logging
from datasets.utils import logging as datasets_logging

# orbax warnings that say nothing to a user (a checkpoint written before orbax kept this metadata reads fine)
_HARMLESS_ORBAX = ("Metadata file does not exist",)


class _QuietOrbax(logging.Filter):
  """orbax logs through absl (logger "absl"): keep its errors and meaningful warnings, drop the rest."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    if any(s in record.getMessage() for s in _HARMLESS_ORBAX):  # outside absl.app the caller shows as absl itself
      return False
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname.replace(os.sep, "/")


def _pci_vendor(vendor: str) -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == vendor:
          return True
    except OSError:
      continue
  return False


def _tpu_chips_present() -> bool:
  """Google TPU chips as the kernel shows them (PCI vendor 0x1ae0, /dev/accel*, /dev/vfio): what jax checks."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")) or _pci_vendor("0x1ae0")


def _nvidia_gpu_present() -> bool:
  """An NVIDIA GPU (its device files or PCI vendor 0x10de)."""
  return bool(glob.glob("/dev/nvidia[0-9]*")) or _pci_vendor("0x10de")


def _gpu_plugin_installed() -> bool:
  return bool(importlib.util.find_spec("jax_plugins")) or bool(importlib.metadata.entry_points(group="jax_plugins"))


def pin_cpu_without_accelerator() -> bool:
  """JAX_PLATFORMS=cpu when libtpu or JAX's CUDA plugin is installed (e.g. by `.[test]`, to compile for chips that
  are not there) but the host has neither TPU chips nor an NVIDIA GPU: JAX would pick the CPU anyway, after
  printing a screen of initialisation errors. Call before JAX's first device query."""
  if os.environ.get("JAX_PLATFORMS") or jax.config.values.get("jax_platforms"):
    return False
  if importlib.util.find_spec("libtpu") is None and not _gpu_plugin_installed():
    return False
  if _tpu_chips_present() or _nvidia_gpu_present():
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


def quiet_libraries(debug: bool = False) -> None:
  """Library log levels for a command-line run (idempotent); `debug` leaves them as they are."""
  if debug:
    return
  absl_logger = absl_logging.get_absl_logger()  # absl's own logger class: it finds the real caller (orbax)
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
  datasets_logging.set_verbosity_warning()
  pin_cpu_without_accelerator()


def dataset_progress_bars(on: bool) -> None:
  """`datasets`' map / filter bars: on a terminal they show progress, in a log file they are noise."""
  if on:
    datasets_logging.enable_progress_bar()
  else:
    datasets_logging.disable_progress_bar()
