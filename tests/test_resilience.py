"""Divergence guard, unreadable checkpoints, file:// and gs:// workdirs, the workdir lock, resume semantics."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bertjax import paths
from bertjax.errors import UserError
from bertjax.tasks.pretraining import PretrainingTask
from bertjax.train import checkpoint, resilience
from bertjax.train.trainer import train_and_evaluate
from test_trainer import tiny_config


def _steps(workdir: str) -> list[str]:
  return sorted(os.listdir(os.path.join(paths.resolve(workdir), "checkpoints")))


def _assert_checkpoints_finite(workdir: str) -> None:
  for name in _steps(workdir):
    if name.isdigit():
      params, _ = checkpoint.load_params(os.path.join(paths.resolve(workdir), "checkpoints", name))
      assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params)), name


def test_huge_learning_rate_stops_after_the_configured_skips(small_corpus, cache_dir, tmp_path, caplog):
  c = tiny_config(small_corpus, cache_dir, num_train_steps=12, max_consecutive_skips=3)
  c.optimizer.learning_rate = 1e8
  with caplog.at_level(logging.WARNING), pytest.raises(resilience.Diverged) as e:
    train_and_evaluate(c, str(tmp_path))
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped non-finite step")]
  assert len(skipped) == 3, skipped  # stopped at the third consecutive skip, not later
  last = int(skipped[-1].split()[3])
  assert f"the last at step {last}" in str(e.value) and "\n" not in str(e.value)
  assert int(skipped[0].split()[3]) == last - 2  # consecutive
  assert all(int(s) < last for s in _steps(tmp_path) if s.isdigit())
  _assert_checkpoints_finite(str(tmp_path))


def test_injected_nan_is_skipped_and_never_checkpointed(small_corpus, cache_dir, tmp_path, monkeypatch, caplog):
  orig = PretrainingTask.train_source

  def poisoned(self):  # a batch hook: from step 2 on, token ids outside the vocabulary embed as NaN
    src = orig(self)
    clean = src.batch

    def batch(step):
      b = dict(clean(step))
      if step >= 2:
        b["input_ids"] = np.full_like(b["input_ids"], 10**6)
      return b
    src.batch = batch
    return src

  monkeypatch.setattr(PretrainingTask, "train_source", poisoned)
  c = tiny_config(small_corpus, cache_dir, num_train_steps=8, log_every_steps=1, max_consecutive_skips=2)
  with caplog.at_level(logging.INFO), pytest.raises(resilience.Diverged, match="the last at step 4"):
    train_and_evaluate(c, str(tmp_path))
  messages = [r.getMessage() for r in caplog.records]
  assert [m.split(" (")[0] for m in messages if m.startswith("skipped")] == ["skipped non-finite step 3",
                                                                            "skipped non-finite step 4"]
  step3 = next(m for m in messages if m.startswith("train step 3/8"))
  assert "skipped_steps 1.0000" in step3 and "loss nan" in step3  # counted; no finite loss to average
  assert _steps(tmp_path) == ["2"]  # step 4's checkpoint was never written: the flag was read before saving
  _assert_checkpoints_finite(str(tmp_path))


@pytest.mark.slow
def test_file_url_workdir_resumes_past_a_corrupt_latest_checkpoint(small_corpus, cache_dir, tmp_path, caplog):
  url = f"file://{tmp_path}/run"
  c = tiny_config(small_corpus, cache_dir, num_train_steps=6)
  train_and_evaluate(c, url)
  assert _steps(url) == ["2", "4", "6"] and (tmp_path / "run" / "config.json").exists()
  good, meta = checkpoint.load_params(url)
  assert meta["step"] == 6 and meta["schedule"]["num_train_steps"] == 6 and meta["mesh"]["data"] == 8
  ckpts = tmp_path / "run" / "checkpoints"
  (ckpts / "6" / "meta" / "metadata").write_text('{"step": 6, "rng": [')  # meta JSON cut mid-way
  truncated = 0
  for f in (ckpts / "4" / "params").rglob("*"):  # array data cut short
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
      truncated += 1
  assert truncated
  before = sorted(os.listdir(tmp_path / "run"))
  c2 = tiny_config(small_corpus, cache_dir, num_train_steps=6, global_batch_size=32)
  with pytest.raises(UserError, match="global_batch_size=16, not 32"):  # refused before anything is touched
    train_and_evaluate(c2, url)
  assert sorted(os.listdir(tmp_path / "run")) == before and _steps(url) == ["2", "4", "6"]
  with caplog.at_level(logging.WARNING):
    train_and_evaluate(c, url)
  steps = _steps(url)
  assert [s for s in steps if s.isdigit()] == ["2", "4", "6"]  # 4 and 6 recomputed from step 2
  assert sorted(s.split("-")[0] for s in steps if not s.isdigit()) == ["4.corrupt", "6.corrupt"]  # kept aside
  assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 2
  again, _ = checkpoint.load_params(url)
  for x, y in zip(jax.tree_util.tree_leaves(good), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(x, y)
  assert json.loads((tmp_path / "run" / "eval_metrics.json").read_text())["step"] == 6
  assert [f for f in os.listdir(tmp_path / "run") if f.startswith("config")] == ["config.json"]  # unchanged


def test_gs_workdir_reaches_orbax_and_the_writer_unchanged(small_corpus, cache_dir, tmp_path, monkeypatch):
  """No network: the orbax manager and the metric writer are fakes that record the directory they get."""
  import orbax.checkpoint as ocp
  from bertjax.train import writers
  seen = {}
  real_manager = ocp.CheckpointManager

  def fake_manager(directory, options=None):
    seen.setdefault("checkpoints", str(directory))
    return real_manager(str(tmp_path / "local_checkpoints"), options=options)

  class Stop(Exception):
    pass

  def fake_writer(logdir, *args, **kw):
    seen["writer"] = logdir
    raise Stop

  written = {}
  monkeypatch.setattr(ocp, "CheckpointManager", fake_manager)
  monkeypatch.setattr(writers, "create", fake_writer)
  monkeypatch.setattr(paths, "makedirs", lambda p: p)
  monkeypatch.setattr(paths, "exists", lambda p: False)
  monkeypatch.setattr(paths, "write_text", lambda p, text: written.setdefault(p, text))
  monkeypatch.setattr(PretrainingTask, "save_assets", lambda self, workdir: written.setdefault("assets", workdir))
  with pytest.raises(Stop):
    train_and_evaluate(tiny_config(small_corpus, cache_dir), "gs://bucket/run/")
  assert seen == {"checkpoints": "gs://bucket/run/checkpoints", "writer": "gs://bucket/run"}
  assert written["assets"] == "gs://bucket/run" and "gs://bucket/run/config.json" in written


def test_workdir_lock_refuses_a_live_run_but_not_a_dead_or_copied_one(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                             "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                             "time.sleep(60)", str(wd)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="in use by another live bertjax run"):
      resilience.WorkdirLock(str(wd)).__enter__()
    shutil.copytree(wd, tmp_path / "copy")
    with resilience.WorkdirLock(str(tmp_path / "copy")):  # a copied workdir is not blocked
      pass
  finally:
    holder.kill()
    holder.wait(timeout=30)
  with resilience.WorkdirLock(str(wd)):  # the holder died: its lock went with it
    pass
  assert sorted(os.listdir(wd)) == []  # no lock file left behind
  with resilience.WorkdirLock("gs://bucket/run"):  # object stores: no lock
    pass


def _spec(n, lr=1e-3, schedule="linear", warmup=0):
  from ml_collections import ConfigDict
  from bertjax.config import base_config
  o = ConfigDict(base_config().optimizer.to_dict())
  o.learning_rate, o.schedule, o.warmup_steps = lr, schedule, warmup
  return resilience.schedule_spec(o, n)


def test_resume_schedule_never_jumps_silently():
  old = _spec(100, warmup=10)
  assert resilience.resume_schedule(old, _spec(100, warmup=10), 40, "") == old  # unchanged: no flag needed
  with pytest.raises(UserError, match="continue_schedule=restart"):
    resilience.resume_schedule(old, _spec(200, warmup=10), 100, "")  # finished run, more steps
  restart = resilience.resume_schedule(_spec(100, warmup=10), _spec(200, warmup=10), 60, "restart")
  f_old, f = resilience.build_schedule(old), resilience.build_schedule(restart)
  np.testing.assert_allclose([float(f(s)) for s in (0, 10, 59)], [float(f_old(s)) for s in (0, 10, 59)])
  np.testing.assert_allclose([float(f(s)) for s in (60, 130, 200)], [float(f_old(60)), float(f_old(60)) / 2, 0.0],
                             rtol=1e-6, atol=1e-12)  # warmup-free linear decay from step 60's LR to 0 at 200
  assert resilience.resume_schedule(restart, _spec(200, warmup=10), 150, "") == restart  # kept on later resumes
  extend = resilience.resume_schedule(old, _spec(200, warmup=10), 60, "extend")
  assert extend == _spec(200, warmup=10)
  const = _spec(4, schedule="constant")
  assert resilience.resume_schedule(const, _spec(8, schedule="constant"), 4, "") == _spec(8, schedule="constant")
  resilience.check_batch_size({"data": {"global_batch_size": 16}}, 32, allow=True)
  with pytest.raises(UserError, match="allow_batch_size_change"):
    resilience.check_batch_size({"data": {"global_batch_size": 16}}, 32, allow=False)


@pytest.mark.parametrize("error, code, line", [
    (resilience.Diverged("training diverged: 10 consecutive non-finite steps, the last at step 7; ..."), 3,
     "bertjax: error: training diverged: 10 consecutive non-finite steps, the last at step 7; ...\n"),
    (resilience.Preempted("preempted at step 5", 143), 143, ""),
    (UserError("workdir w is in use by another live bertjax run; wait for it to finish or use another --workdir"), 2,
     "bertjax: error: workdir w is in use by another live bertjax run; wait for it to finish or use another "
     "--workdir\n")])
def test_main_exit_codes(monkeypatch, capsys, error, code, line):
  from bertjax import main
  from bertjax.train import trainer

  def fail(config, workdir):
    raise error
  monkeypatch.setattr(trainer, "train_and_evaluate", fail)
  monkeypatch.setattr(sys, "argv", ["bertjax", f"--config={os.path.dirname(__file__)}/../configs/mlm.py",
                                    "--workdir=/nonexistent/never-created"])
  with pytest.raises(SystemExit) as e:
    main.run()
  assert e.value.code == code and capsys.readouterr().err == line
  assert not os.path.exists("/nonexistent/never-created")


def test_best_checkpoint_save_survives_replay_after_preemption(small_corpus, cache_dir, tmp_path):
  from bertjax.train.trainer import Trainer
  c = tiny_config(small_corpus, cache_dir)

  def trainer():  # a fresh process's trainer: its meta knows no best yet (the best save came after the checkpoint)
    tr = Trainer(c, str(tmp_path))
    tr.setup()
    tr.task.main_metric = "accuracy"
    return tr

  tr = trainer()
  params = tr.init_state().params
  tr.track_best(params, 4, {"accuracy": 0.5})
  tr2 = trainer()
  tr2.track_best(params, 4, {"accuracy": 0.5})  # replayed epoch end: orbax raised StepAlreadyExistsError here
  assert os.listdir(tmp_path / "best" / "checkpoints") == ["4"] and tr2.best["step"] == 4
  tr3 = trainer()
  tr3.track_best(params, 2, {"accuracy": 0.4})  # replay from an earlier step: the later best is recomputed
  assert os.listdir(tmp_path / "best" / "checkpoints") == ["2"]
