"""Entry point: `python -m bertjax.main --config=configs/mlm.py [--workdir=DIR] [--config.x.y=value ...]`."""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bertjax.data.corpus import default_cache_dir
from bertjax.errors import Diverged, UserError
from bertjax.train import resilience
from bertjax.train.trainer import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and outputs; default workdirs/<config name>.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when launched multi-host).")


def _multihost_env() -> bool:
  """True when a launcher describes several processes (TPU pod slices, SLURM, explicit coordinator)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


class _QuietLibraries(std_logging.Filter):
  """Keep orbax's per-save INFO chatter out of the progress log (warnings and errors still show)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _load_config()
  if FLAGS.distributed or (FLAGS.distributed is None and _multihost_env()):
    explicit = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                  ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
    jax.distributed.initialize(**explicit)  # TPU pods, SLURM, ... are auto-detected
  compilation_cache(config)
  name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename or "run"))[0]
  workdir = FLAGS.workdir or os.path.join("workdirs", name)
  shown = workdir if "://" in workdir else os.path.abspath(workdir)  # a URL stays a URL
  logging.info("JAX %s on %d devices (%s), process %d/%d; workdir %s", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, jax.process_index(), jax.process_count(), shown)
  train_and_evaluate(config, workdir)


def compilation_cache(config) -> str | None:
  """Turn on XLA's persistent compilation cache (a re-run loads the steps it compiled before): `compilation_cache`
  in the config, else $BERTJAX_COMPILATION_CACHE, else <bertjax cache>/xla_compilation_cache; 'off' disables it.
  A JAX_COMPILATION_CACHE_DIR set by the user is left as it is."""
  choice = str(config.get("compilation_cache") or os.environ.get("BERTJAX_COMPILATION_CACHE", ""))
  if choice.lower() in ("off", "none", "false", "0"):
    return None
  if not choice and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not choice:
    choice = os.path.join(config.data.get("cache_dir") or default_cache_dir(), "xla_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", choice)
  logging.info("XLA compilation cache: %s (compilation_cache='off' disables it)", choice)
  return choice


def _load_config():
  """The --config file's ConfigDict; a missing or broken file is one UserError line (the flag loads lazily)."""
  filename = FLAGS["config"].config_filename if FLAGS["config"].present else None
  if not filename:
    raise UserError("--config is required, e.g. --config=configs/mlm.py")
  path = filename.split(":")[0]
  if not os.path.isfile(path):
    raise UserError(f"--config={filename}: no such file {os.path.abspath(path)}; pass a config file such as "
                    "configs/mlm.py")
  try:
    config = FLAGS.config
    config.get("task")  # the first access runs the file's get_config()
  except OSError as e:
    raise UserError(f"--config={filename} could not be loaded ({' '.join(str(e).split())})") from None
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/mlm.py")
  return config


def _fail(msg: str) -> None:
  print(f"bertjax: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config overrides, but a user mistake is one line, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    text = str(e).encode().decode("unicode_escape")
    names = re.findall(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and names
           and a.split("=")[0].split(".")[-1] == names[0] or (names and f".{names[0]}." in a.split("=")[0])]
    if isinstance(e, (KeyError, AttributeError)) and bad:
      suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
      _fail(f"unknown config field {bad[0][len('--config.'):]!r}{suggestion}; see the config file for valid fields")
    _fail(f"bad command line: {' '.join(text.split())}")
  return []


def run():
  """Exit codes: 0 done; 2 a user mistake (one line); 3 diverged (one line); 128 + signal (143 SIGTERM,
  130 SIGINT) preempted after saving a checkpoint at the signalled step; the same command resumes."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except UserError as e:
    _fail(str(e))
  except Exception as e:
    if isinstance(e, resilience.Preempted):
      sys.exit(e.code)
    if isinstance(e, Diverged):
      print(f"bertjax: error: {e}", file=sys.stderr)
      sys.exit(e.code)
    raise


if __name__ == "__main__":
  run()
