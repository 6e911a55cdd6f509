"""The path layer: local paths made absolute, file:// mapped to local, other URLs never touched by os.path."""

import os

from bertjax import paths


def test_resolve_local_file_url_and_remote(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("run") == str(tmp_path / "run")
  assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
  assert paths.resolve(f"file://{tmp_path}/a%20b") == f"{tmp_path}/a b"
  assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "checkpoints", "12") == "gs://bucket/run/checkpoints/12"
  assert paths.join(f"file://{tmp_path}", "c") == str(tmp_path / "c")
  assert paths.is_url("gs://b/x") and not paths.is_local("gs://b/x") and paths.is_local(f"file://{tmp_path}")


def test_atomic_write_and_listing(tmp_path):
  f = paths.join(f"file://{tmp_path}", "d", "config.json")
  paths.write_text(f, "one")
  paths.write_text(f, "two")
  assert paths.read_text(f) == "two"
  assert paths.listdir(str(tmp_path / "d")) == ["config.json"]  # no temporary file left behind
  assert paths.listdir(str(tmp_path / "missing")) == []
  paths.rename(str(tmp_path / "d"), str(tmp_path / "e"))
  assert paths.isdir(str(tmp_path / "e")) and not paths.exists(str(tmp_path / "d"))


def test_staged_writes_reach_the_url_folder(tmp_path, monkeypatch):
  copied = {}
  monkeypatch.setattr(paths, "copy", lambda src, dst: copied.setdefault(dst, open(src).read()))
  monkeypatch.setattr(paths, "makedirs", lambda p: p)
  with paths.staged("gs://bucket/run/predictions") as folder:
    assert not paths.is_url(folder)
    os.makedirs(os.path.join(folder, "sub"))
    with open(os.path.join(folder, "sub", "dev.txt"), "w") as f:
      f.write("tags")
  assert copied == {"gs://bucket/run/predictions/sub/dev.txt": "tags"} and not os.path.exists(folder)
  with paths.staged(str(tmp_path / "local")) as folder:
    assert folder == str(tmp_path / "local") and os.path.isdir(folder)
