"""Fine-tuning feature caches (`tasks.common.cached_arrays`): whatever garbage sits in the cache file, it is
rebuilt (with a warning) and replaced by a readable file; nothing temporary is left behind."""

import io
import logging

import numpy as np
import pytest

from bertjax.tasks import common


def _npy() -> bytes:
  b = io.BytesIO()
  np.save(b, np.arange(3))
  return b.getvalue()


GARBAGE = {
    "random": lambda good: np.random.default_rng(0).bytes(len(good)),
    "empty": lambda good: b"",
    "truncated": lambda good: good[:len(good) - 30],
    "zeroed_middle": lambda good: good[:len(good) // 2] + bytes(40) + good[len(good) // 2 + 40:],  # CRC mismatch
    "npy_not_npz": lambda good: _npy(),
    "pickle": lambda good: b"\x80\x04K\x01.",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_cache_file_is_rebuilt(tmp_path, caplog, kind):
  calls = []

  def build():
    calls.append(1)
    return {"x": np.arange(5), "y": np.full((3, 2), 7.5)}

  first = common.cached_arrays(str(tmp_path), "k", "key", build)
  (path,) = list((tmp_path / "k").iterdir())
  path.write_bytes(GARBAGE[kind](path.read_bytes()))
  with caplog.at_level(logging.WARNING):
    rebuilt = common.cached_arrays(str(tmp_path), "k", "key", build)
  assert len(calls) == 2 and "rebuilding unreadable cache file" in caplog.text
  assert rebuilt["x"].tolist() == first["x"].tolist() == [0, 1, 2, 3, 4] and rebuilt["y"].tolist() == [[7.5] * 2] * 3
  again = common.cached_arrays(str(tmp_path), "k", "key", build)  # the rebuilt file is read, not built again
  assert len(calls) == 2 and sorted(again) == ["x", "y"] and again["y"].sum() == 45.0
  assert [p.name for p in (tmp_path / "k").iterdir()] == [path.name]  # no temporary file left behind


def test_unwritable_cache_only_warns(tmp_path, caplog):
  (tmp_path / "k").write_text("a file where the cache folder should be")
  with caplog.at_level(logging.WARNING):
    out = common.cached_arrays(str(tmp_path), "k", "key", lambda: {"x": np.arange(2)})
  assert out["x"].tolist() == [0, 1] and "could not cache features" in caplog.text
  assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
