"""Entry point: `bertjax-train --config=mlm [--workdir=DIR] [--config.x.y=value ...]` (= `python -m bertjax.main`).

`--config` takes a config name shipped with bertjax (mlm, glue, ner, squad, classify) or a config file's path;
`--print_config` prints the resolved config and exits; every field is listed in docs/configuration.md.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import runpy
import sys
from pathlib import Path

import jax
import yaml
from absl import app, flags, logging
from ml_collections import config_flags

from bertjax import config as shared_config
from bertjax import logs
from bertjax.data.corpus import default_cache_dir
from bertjax.errors import Diverged, UserError
from bertjax.train import progress, resilience, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "A config name (mlm, glue, ner, squad, classify) or a config file (get_config()); override any "
    "field with --config.<field>=<value> (every field: docs/configuration.md, or --print_config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and outputs; default workdirs/<config name>.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when launched multi-host).")
flags.DEFINE_bool("print_config", False, "Print the resolved config (after the --config.* overrides) and exit.")

DOCS = "docs/configuration.md"
SHARED_FIELDS_FILE = "bertjax/config.py"
_HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")


def config_dirs() -> list[str]:
  """Where config names are looked up: the checkout's configs/ (the source), else the installed bertjax_configs."""
  dirs = [str(Path(__file__).resolve().parents[1] / "configs")]
  spec = importlib.util.find_spec("bertjax_configs")  # the wheel ships configs/ as this package
  dirs += list(spec.submodule_search_locations or []) if spec else []
  return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def config_names() -> list[str]:
  return sorted({os.path.basename(f)[:-3] for d in config_dirs() for f in glob.glob(os.path.join(d, "*.py"))
                 if not os.path.basename(f).startswith("_")})


def resolve_config(value: str) -> str:
  """`--config` value -> a file path: an existing file as given, else a shipped config by name (`mlm`, `mlm.py`, or
  `configs/mlm.py` outside the checkout); anything after ':' (config_flags' argument to get_config) is kept."""
  path, sep, arg = value.partition(":")
  shipped = re.fullmatch(r"configs/(\w+)\.py", path)  # the repository's relative path, run from elsewhere
  if os.path.isfile(path) or (("/" in path or os.sep in path) and not shipped):
    return value
  name = shipped.group(1) if shipped else path[:-3] if path.endswith(".py") else path
  for d in config_dirs():
    if os.path.isfile(os.path.join(d, f"{name}.py")):
      return os.path.join(d, f"{name}.py") + sep + arg
  return value


class _ConfigDumper(yaml.SafeDumper):
  """--print_config: one `field: value` line per field, lists inline (`target_modules: [query, value]`)."""


_ConfigDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _multihost_env() -> bool:
  """True when a launcher describes several processes (TPU pod slices, SLURM, explicit coordinator)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def main(argv):
  del argv
  logs.quiet_libraries(debug=logging.level_debug())
  config = _load_config()
  if FLAGS.print_config:
    _print_and_exit(f"# {FLAGS['config'].config_filename}, after the command-line overrides ({DOCS} explains every "
                    "field)\n" + yaml.dump(json.loads(config.to_json_best_effort()), Dumper=_ConfigDumper,
                                           sort_keys=True, width=120))
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
  logs.dataset_progress_bars(progress.want_bar(config.training.get("progress_bar", "auto")))
  trainer.train_and_evaluate(config, workdir)


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
                    f"configs/mlm.py or a config name ({', '.join(config_names())})")
  try:
    config = FLAGS.config
    config.get("task")  # the first access runs the file's get_config()
  except OSError as e:
    raise UserError(f"--config={filename} could not be loaded ({' '.join(str(e).split())})") from None
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/mlm.py")
  return config


def _print_and_exit(text: str) -> None:
  """stdout, exit 0; a reader that stops early (`| head`) is no error."""
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
  sys.exit(0)


def _fail(msg: str) -> None:
  print(f"bertjax: error: {msg}", file=sys.stderr)
  sys.exit(2)


def _invoked_as() -> str:
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "bertjax-train"
  return "python -m bertjax.main" if prog in ("main.py", "__main__.py", "-c", "") else prog


def usage() -> str:
  """`--help`: how to call it, the flags, and where the config fields are explained."""
  rows = [f"  --{name}: {FLAGS[name].help}" for name in ("config", "workdir", "print_config", "distributed")]
  return "\n".join([
      f"usage: {_invoked_as()} --config=<name or file> [--workdir=DIR] [--config.<field>=<value> ...] "
      "[--print_config]",
      "",
      "Pretrain or fine-tune a BERT model: one config (a config name or a configs/*.py file) + overrides.",
      f"Config names: {', '.join(config_names())} (from {', '.join(config_dirs()) or 'nowhere: reinstall bertjax'}).",
      "",
      *rows,
      "",
      f"Config fields: every field with its default and meaning is in {DOCS} (bertjax repository);",
      "fields shared by every task live in bertjax/config.py, a task's own in configs/<name>.py.",
      f"  {_invoked_as()} --config=mlm --print_config      # the resolved config, nothing run",
      "Exit codes: 0 done, 2 a user mistake (one line), 3 diverged, 128+signal preempted (rerun to resume).",
      "absl's own flags (logging verbosity --v=1 shows DEBUG lines, ...): --helpfull.",
  ])


def _children(config, parent: str) -> set[str] | None:
  try:
    return set((config[parent] if parent else config).keys())
  except (KeyError, AttributeError):
    return None


def _field_home(field: str, config_file: str) -> str:
  """Where the family of an unknown field `a.b.c` is defined: bertjax/config.py for the shared fields
  (`base_config()`, `finetune_config()`), the config file for a task's own (`data.task`, `training.main_metric`)."""
  parent = field.rpartition(".")[0]
  shared = [_children(c, parent) for c in (shared_config.base_config(), shared_config.finetune_config("task", 1e-5))]
  shared_children = set().union(*[c for c in shared if c is not None]) if any(c is not None for c in shared) else None
  task = os.path.join("configs", os.path.basename(config_file.split(":")[0])) if config_file else "the config file"
  if shared_children is None:
    return f"{task} (its own fields; shared ones in {SHARED_FIELDS_FILE})"
  try:
    task_children = _children(runpy.run_path(config_file.split(":")[0])["get_config"](), parent) or set()
  except Exception:  # the config file itself does not load: name both places
    task_children = shared_children | {"its own fields"}
  if task_children - shared_children:
    return f"{SHARED_FIELDS_FILE} (shared) and {task} ({', '.join(sorted(task_children - shared_children))})"
  return f"{SHARED_FIELDS_FILE} (fields shared by every task)"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config overrides, but a user mistake is one line, not a traceback; `--config=mlm`
  names a shipped config; `--help` prints `usage()` and exits 0."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    _print_and_exit(usage() + "\n")
  argv = [argv[0]] + [f"--config={resolve_config(a[len('--config='):])}" if a.startswith("--config=") else a
                      for a in argv[1:]]
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    text = str(e).encode().decode("unicode_escape")
    names = re.findall(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and names
           and a.split("=")[0].split(".")[-1] == names[0] or (names and f".{names[0]}." in a.split("=")[0])]
    if isinstance(e, (KeyError, AttributeError)) and bad:
      field = bad[0][len("--config."):]
      suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
      config_file = next((a[len("--config="):] for a in argv[1:] if a.startswith("--config=")), "")
      _fail(f"unknown config field {field!r}{suggestion}; these fields are defined in "
            f"{_field_home(field, config_file)}; all of them: {DOCS} or --print_config")
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
