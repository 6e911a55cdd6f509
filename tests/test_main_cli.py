"""`bertjax-train` from a user's first hour: configs by name from any directory, `--print_config`, `--help`, the
unknown-field error naming where the field lives, configs shipped in the wheel, and a short quiet log."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

from bertjax import main


def _run(cwd, *args, timeout=300, env=None):
  """`python -m bertjax.main ...` from `cwd` (outside the checkout), importing this checkout's bertjax."""
  env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
  return subprocess.run([sys.executable, "-m", "bertjax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_config_names_resolve_to_the_configs_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert set(main.config_names()) >= {"mlm", "glue", "ner", "squad", "classify"}
  for name in ("mlm", "glue", "ner", "squad", "classify"):
    assert main.resolve_config(name) == str(REPO / "configs" / f"{name}.py")
    assert main.resolve_config(f"{name}.py") == str(REPO / "configs" / f"{name}.py")
  assert main.resolve_config("glue:arg") == f"{REPO / 'configs' / 'glue.py'}:arg"
  assert main.resolve_config("configs/mlm.py") == str(REPO / "configs" / "mlm.py")  # the README's path, elsewhere
  assert main.resolve_config("my/mlm.py") == "my/mlm.py"  # any other path stays a path (and fails with one line)
  assert main.resolve_config("nope") == "nope"  # and fails later with one line naming the known names
  (tmp_path / "mlm").write_text("")  # an existing file wins over a name
  assert main.resolve_config("mlm") == "mlm"


def test_print_config_by_name_from_any_directory_runs_nothing(tmp_path):
  r = _run(tmp_path, "--config=glue", "--config.data.task=rte", "--config.training.num_epochs=2.5",
           "--print_config")
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  assert lines[0].startswith(f"# {REPO / 'configs' / 'glue.py'}, after the command-line overrides")
  assert "  task: rte" in lines and "  num_epochs: 2.5" in lines and "task: glue" in lines
  assert "JAX" not in r.stderr and list(tmp_path.iterdir()) == []  # no run started, no workdir


def test_help_exits_0_and_points_to_the_field_list(tmp_path):
  r = _run(tmp_path, "--help")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("usage: python -m bertjax.main --config=<name or file>")
  assert "docs/configuration.md" in r.stdout and "bertjax/config.py" in r.stdout and "--print_config" in r.stdout
  assert "classify, dapt, embed, glue, mlm, ner, squad" in r.stdout


@pytest.mark.parametrize("config,field,home", [
    ("mlm", "training.num_train_stepz", "defined in bertjax/config.py (fields shared by every task)"),
    ("glue", "data.taks", "defined in bertjax/config.py (shared) and configs/glue.py (data_dir, task)"),
    ("classify", "training.main_metrc", "bertjax/config.py (shared) and configs/classify.py (main_metric)")])
def test_unknown_field_names_where_its_family_lives(tmp_path, config, field, home):
  r = _run(tmp_path, f"--config={config}", f"--config.{field}=1")
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert f"unknown config field {field!r}" in errors[0] and home in errors[0], errors[0]
  assert "docs/configuration.md" in errors[0] and "Traceback" not in r.stderr


def test_unknown_config_name_lists_the_known_ones(tmp_path):
  r = _run(tmp_path, "--config=mlmm")
  assert r.returncode == 2 and "config name (classify, dapt, embed, glue, mlm, ner, squad)" in r.stderr, r.stderr[-2000:]


def test_the_wheel_ships_every_config_as_bertjax_configs(tmp_path):
  """A non-editable install has no checkout: configs/ goes into the wheel as the package bertjax_configs."""
  src = tmp_path / "src"
  shutil.copytree(REPO / "bertjax", src / "bertjax", ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copytree(REPO / "configs", src / "configs", ignore=shutil.ignore_patterns("__pycache__"))
  for f in ("pyproject.toml", "setup.py", "README.md"):
    shutil.copy(REPO / f, src / f)
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                      str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  (wheel,) = (tmp_path / "dist").glob("bertjax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  configs = {p.name for p in (REPO / "configs").glob("*.py")}
  assert {f"bertjax_configs/{c}" for c in configs} <= names
  modules = {str(p.relative_to(REPO)) for p in (REPO / "bertjax").rglob("*.py")}
  assert sorted(modules - names) == [] and "bertjax/deploy/cli.py" in names  # namespace subpackages too
  assert not any(n.startswith(("tests/", "configs/")) for n in names)


def test_a_two_step_run_logs_under_30_lines(tmp_path, small_corpus, cache_dir):
  """No libtpu / orbax / datasets internals and no parameter table at INFO; the progress line and summary stay."""
  args = ["--config=mlm", f"--workdir={tmp_path / 'wd'}", f"--config.data.corpus={small_corpus}",
          f"--config.data.cache_dir={cache_dir}", "--config.data.vocab_size=2000", "--config.data.max_seq_length=64",
          "--config.data.max_predictions_per_seq=10", "--config.data.short_seq_length=0", "--config.model.preset=tiny",
          "--config.model.max_position_embeddings=64", "--config.training.num_train_steps=2",
          "--config.training.async_checkpointing=False", "--config.compilation_cache=off"]
  r = _run(tmp_path, *args, env={"XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-3000:]
  lines = (r.stdout + r.stderr).splitlines()
  assert len(lines) < 30, "\n".join(lines)
  assert re.search(r"train step 2/2 \| loss [0-9.]+ \| mlm_accuracy [0-9.]+", r.stderr)
  assert "run summary" in r.stderr and re.search(r"^final eval +loss [0-9.]+", r.stderr, re.M)
  for noise in ("libtpu", "Unable to initialize backend", "model parameters", "[Hyperparameters]", "/orbax/",
                "Generating train split", "JAX version"):
    assert noise not in r.stderr, noise
  verbose = _run(tmp_path, *args, f"--workdir={tmp_path / 'wd_v'}", "--config.training.num_train_steps=1", "--v=1",
                 env={"XLA_FLAGS": ""})  # absl's verbosity flag: DEBUG lines, the parameter table among them
  assert verbose.returncode == 0 and "model parameters:" in verbose.stderr, verbose.stderr[-3000:]
  assert re.search(r"bert/embeddings/word_embeddings/embedding +\| \(2000, 128\)", verbose.stderr)
