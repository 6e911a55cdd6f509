"""Console scripts and `training.eval_only`: evaluation and predictions from a checkpoint, checkpoints untouched."""

import importlib
import json
import sys
import tomllib

import pytest

from conftest import REPO
from test_glue_task import glue_dir, minilm_dir, tiny_config


def _entry(name: str):
  target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
  module, func = target.split(":")
  return getattr(importlib.import_module(module), func)


def test_console_scripts_are_the_module_entry_points(monkeypatch, capsys):
  from bertjax import main
  from bertjax.convert import __main__ as convert_main
  assert _entry("bertjax-train") is main.run and _entry("bertjax-convert") is convert_main.main
  monkeypatch.setattr(sys, "argv", ["bertjax-train"])
  with pytest.raises(SystemExit) as e:
    _entry("bertjax-train")()
  assert e.value.code == 2
  assert capsys.readouterr().err == "bertjax: error: --config is required, e.g. --config=configs/mlm.py\n"
  assert _entry("bertjax-convert")(["to_hf"]) == 2
  assert capsys.readouterr().err.startswith("bertjax.convert: error: the following arguments are required")


def _files(folder):
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.mark.slow
def test_eval_only_evaluates_the_latest_checkpoint_and_leaves_it_alone(cache_dir, tmp_path):
  from bertjax.errors import UserError
  from bertjax.train.trainer import train_and_evaluate
  c = tiny_config("sst2", glue_dir(), cache_dir, minilm_dir(), num_epochs=0.0, num_train_steps=4,
                  eval_every_steps=100, log_every_steps=2)
  c.data.max_eval_examples = 64  # dev and test
  wd = tmp_path / "wd"
  trained = train_and_evaluate(c, str(wd))
  before = _files(wd / "checkpoints")
  assert any(k.startswith("4/params") for k in before)
  c.training.eval_only = True
  c.training.num_train_steps = 1000  # would train on if it trained at all
  evaluated = train_and_evaluate(c, str(wd))
  assert _files(wd / "checkpoints") == before  # same files, bytes and mtimes
  out = wd / "eval_only_4"
  assert {"accuracy", "test_predictions"} <= set(evaluated) and evaluated == {k: trained[k] for k in evaluated}
  assert json.loads((out / "eval_metrics.json").read_text()) == {"step": 4, **evaluated}
  test_preds = (out / "predictions" / "SST-2.tsv").read_text()
  assert test_preds == (wd / "predictions" / "SST-2.tsv").read_text() and len(test_preds.splitlines()) == 65
  empty = tmp_path / "empty"
  with pytest.raises(UserError, match=r"training.eval_only=True needs a checkpoint: .* has none"):
    train_and_evaluate(c, str(empty))
  assert not empty.exists()
