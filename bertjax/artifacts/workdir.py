"""Run folders: which checkpoint a workdir means, and the run files (tokenizer, resolved config) beside it.

A workdir given to predict / export / quantize / prune / convert means its best checkpoint (`<workdir>/best`, the
one the training run's prediction files came from) when there is one, else its latest step.
"""

from __future__ import annotations

import json
import os
import shutil

from bertjax import paths
from bertjax.artifacts import checkpoint
from bertjax.errors import UserError


def find_checkpoint(path: str) -> str:
  """A workdir (its best checkpoint when there is one), `<workdir>/best` or a step folder -> the step folder."""
  path = paths.resolve(path)
  best = paths.join(path, "best")
  if paths.isdir(paths.join(path, checkpoint.CHECKPOINT_SUBDIR)) and paths.isdir(best):
    try:
      return checkpoint.resolve_step_dir(best)
    except UserError:
      pass
  return checkpoint.resolve_step_dir(path)


def workdir_of(step_dir: str) -> str | None:
  """The run folder above a step folder (`<wd>/checkpoints/N` or `<wd>/best/checkpoints/N`) holding tokenizer/."""
  d = step_dir
  for _ in range(4):
    d = os.path.dirname(d.rstrip("/"))
    if paths.exists(paths.join(d, "tokenizer")) or paths.exists(paths.join(d, "config.json")):
      return d
  return None


def copy_run_files(workdir: str | None, folder: str) -> None:
  """Copy a run's `tokenizer/` and `config.json` (what a Predictor reads beside a checkpoint) into `folder`."""
  if not workdir:
    return
  for name in ("tokenizer", "config.json"):
    src = os.path.join(workdir, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(folder, name))
    elif os.path.isfile(src):
      shutil.copy(src, os.path.join(folder, name))


def training_config(workdir: str | None) -> dict:
  """The `data` section of the run's resolved `config.json` ({} when absent)."""
  if not workdir or not paths.exists(paths.join(workdir, "config.json")):
    return {}
  try:
    return dict(json.loads(paths.read_text(paths.join(workdir, "config.json"))).get("data") or {})
  except ValueError:
    return {}
