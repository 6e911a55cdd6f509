"""Metric writers without TensorFlow: a real run imports no TensorFlow, and TensorBoard's reader finds the tags."""

import json
import logging
import re
import subprocess
import sys
import types

import pytest

from conftest import REPO

RUN = r"""
import json, pkgutil, importlib, sys
sys.argv = ["bertjax-train"] + json.loads(sys.argv[1])
import bertjax
from bertjax import main
try:
  main.run()
except SystemExit as e:
  assert not e.code, e.code
for m in pkgutil.walk_packages(bertjax.__path__, "bertjax."):  # everything a user may import after training
  importlib.import_module(m.name)
print("TF_MODULES", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_cpu"))))
"""


def _events(workdir):
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util import tensor_util
  out = {}
  for f in sorted(workdir.glob("events.out.tfevents*")):
    for event in EventFileLoader(str(f)).Load():
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(v.tag, {})[event.step] = float(tensor_util.make_ndarray(v.tensor))
  return out


def test_training_imports_no_tensorflow_and_tensorboard_reads_the_scalars(small_corpus, cache_dir, tmp_path):
  wd = tmp_path / "run"
  args = ["--config=configs/mlm.py", f"--workdir={wd}", f"--config.data.corpus={small_corpus}",
          f"--config.data.cache_dir={cache_dir}", "--config.data.vocab_size=2000", "--config.data.max_seq_length=64",
          "--config.data.max_predictions_per_seq=10", "--config.model.preset=tiny",
          "--config.model.max_position_embeddings=64", "--config.training.global_batch_size=16",
          "--config.training.eval_batch_size=16", "--config.training.num_train_steps=4",
          "--config.training.log_every_steps=2", "--config.training.eval_every_steps=100",
          "--config.training.async_checkpointing=False", "--config.optimizer.warmup_steps=0"]
  p = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert re.search(r"TF_MODULES \[\]", p.stdout), p.stdout[-2000:]
  scalars = _events(wd)
  from bertjax.train.writers import read_scalars
  assert read_scalars(str(wd)) == scalars  # our TF-free reader (the notebook's plots) reads the same values
  assert sorted(scalars["steps_per_sec"]) == [2, 4] and all(v > 0 for v in scalars["steps_per_sec"].values())
  assert sorted(scalars["train/loss"]) == [2, 4] and sorted(scalars["uptime"]) == [2, 4]
  for step in (2, 4):  # the event values are the ones the progress line printed
    line = re.search(rf"train step {step}/4 \| loss ([0-9.]+) \| mlm_accuracy ([0-9.]+)", p.stderr)
    assert line, p.stderr[-3000:]
    assert f"{scalars['train/loss'][step]:.4f}" == line.group(1)
    assert f"{scalars['train/mlm_accuracy'][step]:.4f}" == line.group(2)
  assert re.search(r"Setting work unit notes: [0-9.]+ steps/s, 100\.0% \(4/4\), ETA: 0:00:00", p.stderr)
  final = json.loads((wd / "eval_metrics.json").read_text())
  evals = {k[len("eval/"):]: v[4] for k, v in scalars.items() if k.startswith("eval/")}
  assert {"loss", "mlm_accuracy"} <= set(evals)
  assert all(evals[k] == pytest.approx(final[k], rel=1e-6) for k in evals), (evals, final)


def test_report_progress_rates_eta_and_schedule(caplog):
  from bertjax.train.progress import ReportProgress
  written, now = [], [100.0]

  class W:
    def write_scalars(self, step, scalars):
      written.append((step, scalars))

  rp = ReportProgress(10, W(), every_steps=4, every_secs=None, clock=lambda: now[0])
  fired = []
  with caplog.at_level(logging.INFO):
    for step in range(1, 11):
      now[0] += 0.5 if step > 1 else 30.0  # the first step (compilation) is slow and not counted
      fired.append(rp(step))
  assert [s for s, f in zip(range(1, 11), fired) if f] == [4, 8, 10]
  rates = [(s, v["steps_per_sec"]) for s, v in written if "steps_per_sec" in v]
  assert rates == [(4, 2.0), (8, 2.0), (10, 2.0)]
  assert [v["uptime"] for s, v in written if "uptime" in v] == [31.5, 33.5, 34.5]
  assert "Setting work unit notes: 2.0 steps/s, 40.0% (4/10), ETA: 0:00:03" in caplog.text


def test_wandb_writer_is_optional_and_logs_the_same_scalars(tmp_path, monkeypatch):
  from ml_collections import ConfigDict

  from bertjax import config as base
  from bertjax.errors import UserError
  from bertjax.train import writers
  c = base.base_config()
  writers.check(c)  # disabled: nothing imported
  c.wandb.enabled = True
  monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
  with pytest.raises(UserError, match=r"^config.wandb.enabled=True needs the wandb package: pip install wandb"):
    writers.check(c)
  logged = []
  run = types.SimpleNamespace(log=lambda d, step: logged.append((step, d)), finish=lambda: logged.append("finish"),
                              config=ConfigDict())
  fake = types.SimpleNamespace(init=lambda **kw: logged.append(kw) or run)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  w = writers.create(str(tmp_path), c)
  w.write_scalars(3, {"train/loss": 1.5})
  w.close()
  assert logged[0]["project"] == "bertjax" and logged[0]["dir"] == str(tmp_path)
  assert logged[1:] == [(3, {"train/loss": 1.5}), "finish"]
  assert {"train/loss": {3: 1.5}} == _events(tmp_path)


def test_event_files_reach_a_url_workdir_through_bertjax_paths(tmp_path, monkeypatch):
  """tensorboardX's own gs:// writer needs google-cloud-storage; ours goes through bertjax.paths (etils.epath).
  A fake `mem://` scheme maps onto tmp_path, so the test needs no network."""
  from bertjax import paths
  from bertjax.train import writers
  local = lambda url: str(tmp_path / url.split("://", 1)[1])
  real_open, real_makedirs = paths.open, paths.makedirs
  monkeypatch.setattr(paths, "open", lambda p, mode="r": real_open(local(p) if paths.is_url(p) else p, mode))
  monkeypatch.setattr(paths, "makedirs", lambda p: real_makedirs(local(p) if paths.is_url(p) else p))
  w = writers.TensorBoardWriter("mem://bucket/run")
  w.write_scalars(1, {"train/loss": 2.5})
  w.flush()
  assert _events(tmp_path / "bucket" / "run") == {"train/loss": {1: 2.5}}  # readable at each flush
  w.write_scalars(2, {"train/loss": 1.25})
  w.close()
  assert _events(tmp_path / "bucket" / "run") == {"train/loss": {1: 2.5, 2: 1.25}}
