"""Preemption on several hosts: SIGTERM to ONE process of a 2-process run (jax.distributed on localhost, 2 CPU
devices each, fsdp over both) makes both processes save the same step and exit 143, and the same command then
resumes and ends bit-identical to an uninterrupted 2-process run."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bertjax.train import checkpoint
from test_multihost import free_port

REPO = Path(__file__).resolve().parents[1]
STEPS = 12

pytestmark = pytest.mark.slow


def start(workdir: Path, corpus: str, cache: str, port: int, log_name: str) -> list[tuple[subprocess.Popen, Path]]:
  """The 2 processes of one run, each with its own log file."""
  over = {"data.corpus": corpus, "data.vocab_size": 1000, "data.max_seq_length": 32,
          "data.max_predictions_per_seq": 5, "training.global_batch_size": 16, "training.eval_batch_size": 16,
          "training.num_train_steps": STEPS, "training.log_every_steps": 1, "training.eval_every_steps": 100,
          "training.checkpoint_every_steps": 100, "training.async_checkpointing": False,
          "optimizer.warmup_steps": 2, "model.preset": "tiny", "mesh.shape.data": 1, "mesh.shape.fsdp": -1}
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               BERTJAX_CACHE=cache, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    log = workdir.parent / f"{log_name}.{i}.log"
    cmd = [sys.executable, "-m", "bertjax.main", "--config=configs/mlm.py", f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in over.items())]
    with open(log, "w") as f:
      procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return procs


def finish(procs, timeout: float = 240) -> list[tuple[int, str]]:
  end, out = time.time() + timeout, []
  for p, log in procs:
    try:
      rc = p.wait(timeout=max(1.0, end - time.time()))
    except subprocess.TimeoutExpired:  # a hung collective fails the test instead of hanging CI
      for q, _ in procs:
        q.kill()
      rc = p.wait()
    out.append((rc, log.read_text()))
  return out


def wait_for(log: Path, pattern: str, procs, timeout: float = 240) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if re.search(pattern, log.read_text()):
      return
    if any(p.poll() is not None for p, _ in procs):
      break
    time.sleep(0.05)
  for p, _ in procs:
    p.kill()
  raise AssertionError(f"{pattern!r} not seen:\n" + log.read_text()[-3000:])


def test_sigterm_to_one_process_saves_the_same_step_everywhere_and_resumes_bit_exactly(small_corpus, cache_dir,
                                                                                          tmp_path):
  straight, run = tmp_path / "straight", tmp_path / "run"
  cache = str(Path(cache_dir))
  for rc, text in finish(start(straight, small_corpus, cache, free_port(), "straight")):
    assert rc == 0, text[-3000:]

  procs = start(run, small_corpus, cache, free_port(), "run")
  wait_for(procs[1][1], r"train step 3/", procs)
  t_sig = time.time()
  procs[1][0].send_signal(signal.SIGTERM)  # process 1 only, as a preemption notice to one host
  results = finish(procs, timeout=120)
  exit_s = time.time() - t_sig
  saved = [re.findall(r"preempted \(signal 15\): saved a checkpoint at step (\d+)", text) for _, text in results]
  assert [rc for rc, _ in results] == [143, 143], [t[-3000:] for _, t in results]
  assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert 3 <= step < STEPS and sorted(os.listdir(run / "checkpoints")) == [str(step)]
  assert checkpoint.load_params(str(run))[1]["step"] == step

  resumed = finish(start(run, small_corpus, cache, free_port(), "resumed"))
  for rc, text in resumed:
    assert rc == 0 and f"Resuming from checkpoint at step {step}" in text, text[-3000:]
  a, meta_a = checkpoint.load_params(str(straight))
  b, meta_b = checkpoint.load_params(str(run))
  assert meta_a["step"] == meta_b["step"] == STEPS
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  print(f"preempted at step {step}; both processes exited {exit_s:.1f} s after the signal")
