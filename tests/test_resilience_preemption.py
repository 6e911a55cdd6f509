"""SIGTERM saves the signalled step and exits 143; kill -9 loses nothing a rerun cannot redo; the continuation is
bit-identical to an uninterrupted run."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from bertjax.train import checkpoint
from bertjax.train.trainer import train_and_evaluate
from test_trainer import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


def _overrides(corpus, cache):
  return {"data.corpus": corpus, "data.cache_dir": cache, "data.vocab_size": 2000, "data.max_seq_length": 64,
          "data.max_predictions_per_seq": 10, "data.num_proc": 1, "model.preset": "tiny",
          "model.max_position_embeddings": 64, "training.global_batch_size": 16, "training.eval_batch_size": 16,
          "training.num_train_steps": STEPS, "training.log_every_steps": 1, "training.eval_every_steps": 100,
          "training.checkpoint_every_steps": 4, "training.async_checkpointing": True,
          "optimizer.warmup_steps": 2}


class _Run:
  """`python -m bertjax.main` with the overrides; stderr collected line by line."""

  def __init__(self, workdir, overrides):
    cmd = [sys.executable, "-m", "bertjax.main", f"--config={REPO}/configs/mlm.py", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                 env={**os.environ, "PYTHONPATH": REPO})
    self.lines = []
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
    self.reader.start()

  def wait_for(self, text, timeout=300):
    end = time.time() + timeout
    while time.time() < end and self.proc.poll() is None:
      if any(text in line for line in list(self.lines)):
        return
      time.sleep(0.05)
    raise AssertionError(f"{text!r} not seen (rc {self.proc.poll()}):\n" + "".join(self.lines[-30:]))

  def finish(self, timeout=300):
    rc = self.proc.wait(timeout=timeout)
    self.reader.join(timeout=10)
    return rc


@pytest.mark.slow
def test_sigterm_and_kill9_then_the_same_command_continues_bit_exactly(small_corpus, cache_dir, tmp_path):
  over = _overrides(small_corpus, cache_dir)
  c = tiny_config(small_corpus, cache_dir)
  for k, v in over.items():
    section, name = k.split(".")
    c[section][name] = v
  train_and_evaluate(c, str(tmp_path / "straight"))  # also fills the data cache for the subprocesses
  wd = str(tmp_path / "run")

  run = _Run(wd, over)
  run.wait_for("train step 2/")
  t_sig = time.time()
  run.proc.send_signal(signal.SIGTERM)
  rc = run.finish(timeout=120)
  exit_s = time.time() - t_sig
  text = "".join(run.lines)
  assert rc == 143, text[-3000:]
  saved = re.findall(r"preempted \(signal 15\): saved a checkpoint at step (\d+)", text)
  # The bound is 30 s on an idle 2-core machine; this one may be shared (measured 71 s at load 24 when
  # several test suites ran at once), so the CI bound is looser; benchmarks/preemption_check.py measures it.
  assert len(saved) == 1 and exit_s < 150, (saved, exit_s)
  step = int(saved[0])
  assert str(step) in os.listdir(os.path.join(wd, "checkpoints")) and checkpoint.load_params(wd)[1]["step"] == step

  run = _Run(wd, over)  # the same command: resumes at the signalled step, then is killed hard
  run.wait_for(f"Resuming from checkpoint at step {step}")
  run.wait_for(f"train step {step + 3}/")
  run.proc.kill()
  assert run.finish(timeout=60) == -signal.SIGKILL

  train_and_evaluate(c, wd)  # the same settings once more, to the end
  a, meta_a = checkpoint.load_params(str(tmp_path / "straight"))
  b, meta_b = checkpoint.load_params(wd)
  assert meta_a["step"] == meta_b["step"] == STEPS
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
