"""The command-line pieces every deployment command shares: one-line usage errors, the run wrapper, output folders."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Any, Callable

from bertjax import logs
from bertjax.errors import UserError


def prog(module: str) -> str:
  """The command as the user typed it: `bertjax-export` from the console script, else `python -m <module>`."""
  name = os.path.basename(sys.argv[0] if sys.argv else "")
  return name if name.startswith("bertjax-") else f"python -m {module}"


class Parser(argparse.ArgumentParser):
  """argparse whose usage errors are UserErrors (one line, exit 2), shared by the deployment commands."""

  def error(self, message: str):
    raise UserError(f"{message} (see `{self.prog} --help`)")


def run_cli(name: str, fn: Callable[[], Any]) -> int:
  """Run `fn` (progress messages on stderr, XLA's C++ logging and library internals quiet: `bertjax.logs`); a
  UserError prints `<name>: error: <one line>` and returns 2."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logs.quiet_libraries()
  try:
    fn()
  except UserError as e:
    print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


def add_out(p: argparse.ArgumentParser, what: str) -> None:
  """`--out` (a new or empty folder) and `--overwrite` (replace what is there)."""
  p.add_argument("--out", required=True, help=f"folder to write {what} to (must not exist or be empty, unless "
                 "--overwrite)")
  p.add_argument("--overwrite", action="store_true", help="replace the --out folder's contents")


def check_out(out: str, overwrite: bool) -> None:
  """Refuse an --out that holds anything (one line), unless --overwrite; checked before anything is loaded."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} exists and is not an empty folder but a file; pass a folder")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out={out} exists and is not an empty folder; pass a new folder or --overwrite")


def clear_out(out: str) -> None:
  """Empty the --out folder (after `check_out` allowed it and the inputs were read)."""
  if os.path.isdir(out):
    shutil.rmtree(out)
