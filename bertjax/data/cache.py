"""Cache folders written atomically and rebuilt when unreadable; arrays stored as memory-mapped `.npy` files.

Every cache entry is a folder built in a private temporary folder beside it and published with one `os.rename`,
so processes sharing a cache never see a half-written entry: the first to finish publishes, the others drop
their copy and use it (the content is a function of the cache key). An entry that cannot be read is reported
and replaced by the next finished build.

An array store holds one `<column>.npy` per column and a `meta.json` (row count, columns) written last; it is
opened lazily (`np.load(mmap_mode="r")`). A truncated file, a missing column or a bad header makes it
unreadable. Silent corruption of array bytes that keeps every file's size is not detected (no checksums: they
would cost a full read of the data on every start).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from typing import Callable, Iterator

import multiprocess
import numpy as np


def open_store(folder: str, warn: bool = True) -> dict[str, np.ndarray] | None:
  """The store's columns as read-only memory maps; None (with a warning if it exists) when unusable."""
  if not os.path.exists(folder):
    return None
  try:
    with open(os.path.join(folder, "meta.json")) as f:
      meta = json.load(f)
    out = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in meta["columns"]}
    bad = [k for k, v in out.items() if len(v) != meta["rows"]]
    if bad:
      raise ValueError(f"columns {bad} do not have {meta['rows']} rows")
    return out
  except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
    if warn:
      logging.warning("cache %s is unreadable (%s: %s); rebuilding it", folder, type(e).__name__, e)
    return None


def new_build_folder(folder: str) -> str:
  """A private, empty folder beside `folder` to build the store in."""
  tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  return tmp


def concatenate(parts: list[str], dst: str) -> int:
  """Write the row-wise concatenation of the `.npy` files `parts` to `dst` one part at a time; -> rows."""
  heads = [np.load(p, mmap_mode="r") for p in parts]
  first = heads[0]
  rows = sum(len(h) for h in heads)
  header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
            "shape": (rows, *first.shape[1:])}
  del heads
  with open(dst, "wb") as f:
    np.lib.format.write_array_header_2_0(f, header)
    for p in parts:
      f.write(np.ascontiguousarray(np.load(p)).tobytes())  # plain writes: no mapped pages pile up in RSS
      os.remove(p)
  return rows


def publish(tmp: str, folder: str, columns: list[str], rows: int) -> None:
  """Finish the array store built in `tmp` (meta.json last) and publish it as `folder`."""
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump({"rows": rows, "columns": columns}, f)
  publish_folder(tmp, folder, lambda: open_store(folder, warn=False) is not None)


def publish_folder(tmp: str, folder: str, readable: Callable[[], bool]) -> None:
  """Move the finished folder `tmp` to `folder` unless a `readable()` one is already there (then drop `tmp`)."""
  try:
    os.rename(tmp, folder)  # atomic; fails when the folder exists
    return
  except OSError:
    pass
  if readable():  # another process published the same content first
    shutil.rmtree(tmp, ignore_errors=True)
    return
  aside = f"{folder}.broken-{uuid.uuid4().hex[:8]}"
  os.rename(folder, aside)
  try:
    os.rename(tmp, folder)
  except OSError:  # yet another process published meanwhile
    shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def spawned_workers(num_proc: int | None) -> Iterator[None]:
  """Inside the block, `datasets.map(num_proc=N)` starts its workers with spawn instead of fork.

  A process whose JAX runtime is up runs threads; forking it can deadlock the child (JAX warns on every fork), and
  the trainer has JAX up before it prepares data. Spawned workers import what they need afresh. The start method
  is restored afterwards; with one process (num_proc <= 1) nothing changes."""
  if not num_proc or num_proc <= 1:
    yield
    return
  before = multiprocess.get_start_method(allow_none=True)
  multiprocess.set_start_method("spawn", force=True)
  try:
    yield
  finally:
    multiprocess.set_start_method(before, force=True)
