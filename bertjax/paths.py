"""The one place that turns a workdir / checkpoint string into a path, and the file operations on it.

Local paths get `expanduser` + `abspath`. URLs (`gs://bucket/run`, anything `scheme://...` that `etils.epath`
handles) are never passed through `os.path`: they stay strings end to end, so every host of a multi-host run
writes the same object-store location. `file://` URLs are mapped to their local path here, and only here:
tensorstore understands them, but orbax wraps every directory in `epath.Path`, which has no `file://` handler.

All functions take and return `str` (never `pathlib` objects), so callers can hand results to orbax, clu and
TensorBoard unchanged.

Object stores need their file-system package: `gs://` needs `gcsfs` (`pip install "bertjax[gcs]"`, which the
`[tpu]` and `[gpu]` extras include). Without it, the first operation on such a path is one `UserError` line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import urllib.parse
from typing import IO, Iterator

from etils import epath

from bertjax.errors import UserError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The fsspec package each object-store scheme needs (etils.epath, datasets and orbax's directory operations all go
# through fsspec; tensorstore, which writes the checkpoint arrays, has its own gs:// driver).
_BACKENDS = {"gs": ("gcsfs", 'pip install "bertjax[gcs]"'), "gcs": ("gcsfs", 'pip install "bertjax[gcs]"'),
             "s3": ("s3fs", "pip install s3fs")}


def is_url(path: str) -> bool:
  """True for `scheme://...` strings (including `file://`)."""
  return bool(_SCHEME.match(str(path)))


def resolve(path: str) -> str:
  """Canonical form: local -> absolute (with `~` expanded), `file://` -> its local path, other URLs unchanged."""
  path = os.fspath(path)
  if path.startswith("file://"):
    parsed = urllib.parse.urlparse(path)
    if parsed.netloc not in ("", "localhost"):
      raise ValueError(f"{path}: a file:// URL with host {parsed.netloc!r}; use file:///absolute/path")
    path = urllib.parse.unquote(parsed.path)
  elif is_url(path):
    return path.rstrip("/") if len(path.rstrip("/")) > path.index("://") + 3 else path
  return os.path.abspath(os.path.expanduser(path))


def is_local(path: str) -> bool:
  """True when `path` (after `resolve`) is on the local file system, where locks and renames are atomic."""
  return not is_url(resolve(path))


def require_backend(path: str) -> str:
  """`path` unchanged when its scheme's file-system package is installed; else one UserError line naming it."""
  scheme = str(path).split("://", 1)[0].lower() if is_url(path) else ""
  if scheme in _BACKENDS:
    package, install = _BACKENDS[scheme]
    if importlib.util.find_spec(package) is None:
      raise UserError(f"{path}: {scheme}:// paths need the {package} package, which is not installed; {install}")
  return path


def _p(path: str) -> epath.Path:
  return epath.Path(require_backend(resolve(path)))


def join(base: str, *parts: str) -> str:
  """`base/part/...` without `os.path.abspath` touching a URL."""
  base = resolve(base)
  if is_url(base):
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def exists(path: str) -> bool:
  return _p(path).exists()


def isdir(path: str) -> bool:
  return _p(path).is_dir()


def isfile(path: str) -> bool:
  return _p(path).is_file()


def makedirs(path: str) -> str:
  _p(path).mkdir(parents=True, exist_ok=True)
  return resolve(path)


def listdir(path: str) -> list[str]:
  """Entry names (not paths) in `path`, sorted; [] when it does not exist."""
  p = _p(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def open(path: str, mode: str = "r") -> IO:  # noqa: A001 - mirrors the builtin on purpose
  return _p(path).open(mode)


def read_text(path: str) -> str:
  return _p(path).read_text()


def write_text(path: str, text: str) -> str:
  """Write `text` atomically: readers see the old file or the new one, never a truncated one.

  Local: a temporary file in the same folder, fsynced, then `os.replace`. Object stores: one object PUT,
  which is atomic there."""
  path = resolve(path)
  if is_url(path):
    epath.Path(path).write_text(text)
    return path
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def rename(src: str, dst: str) -> str:
  """Move `src` to `dst` (a folder too); on object stores this is a copy + delete and not atomic."""
  _p(src).rename(_p(dst))
  return resolve(dst)


def copy(src: str, dst: str) -> str:
  """Copy one file (local or URL) to `dst`."""
  _p(src).copy(_p(dst), overwrite=True)
  return resolve(dst)


@contextlib.contextmanager
def staged(folder: str) -> Iterator[str]:
  """A local folder to write into for code that only knows local files (tokenizer savers, prediction writers).

  Local `folder`: yields it (created). URL: yields a temporary local folder whose files are copied to `folder`
  when the block ends without an error."""
  folder = resolve(folder)
  if not is_url(folder):
    os.makedirs(folder, exist_ok=True)
    yield folder
    return
  tmp = tempfile.mkdtemp(prefix="bertjax-stage-")
  try:
    yield tmp
    for root, _, files in os.walk(tmp):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), tmp)
        dst = join(folder, *rel.split(os.sep))
        makedirs(join(folder, *rel.split(os.sep)[:-1]))
        copy(os.path.join(root, name), dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_read(path: str) -> Iterator[str]:
  """A local copy of one file or folder (with its subfolders) for code that only reads local files (tokenizer
  loaders and exporters): `path` itself when local."""
  path = resolve(path)
  if not is_url(path):
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="bertjax-read-")
  try:
    local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
    if not isdir(path):
      yield copy(path, local)
      return
    _copy_tree(_p(path), local)
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _copy_tree(src: epath.Path, dst: str) -> None:
  """Every file under `src` into the local folder `dst` (gs:// paths have no recursive glob: one listing a level)."""
  os.makedirs(dst, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir():
      _copy_tree(child, os.path.join(dst, child.name))
    else:
      child.copy(epath.Path(os.path.join(dst, child.name)), overwrite=True)
