"""benchmarks/accelerator.py --smoke: runs on CPU, prints a measured row, and imports nothing a bare accelerator
machine may lack (clu, datasets, ml_collections, transformers, torch)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import runpy, sys
sys.argv = ["accelerator.py", "--smoke"]
runpy.run_path("benchmarks/accelerator.py", run_name="__main__")
print("FORBIDDEN", sorted(m for m in ("clu", "datasets", "ml_collections", "transformers", "torch", "tensorflow")
                         if m in sys.modules))
"""


def test_accelerator_smoke_runs_on_cpu_with_only_jax_flax_optax_numpy():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = ""  # one CPU device, like a plain run
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "FORBIDDEN []" in text, text
  assert re.search(r"device: cpu \(cpu\), 1 device\(s\)", text), text
  m = re.search(r"measured 256\^3 float32 matmul: ([0-9.]+) TFLOP/s", text)
  assert m and float(m.group(1)) > 0, text
  row = re.search(r"^\s+16\s+4\s+xla\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.,]+)\s+-\s+([0-9.]+)%$", text, re.M)
  assert row, text
  compile_s, ms, seq_s, mfu = (float(g.replace(",", "")) for g in row.groups())
  assert ms > 0 and abs(seq_s - 4 / (ms / 1e3)) <= 0.02 * seq_s + 0.1  # seq/s = batch / step time
  assert 0 < mfu < 100  # a real fraction of the measured matmul rate


def test_the_benchmark_times_the_trainers_step():
  """No copy of the step: the benchmark and the Trainer both build it with bertjax.train.step.make_train_step,
  and the benchmark's loss is the pretraining task's (bertjax.tasks.losses)."""
  def source(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
      return f.read()

  bench, trainer = source("benchmarks", "accelerator.py"), source("bertjax", "train", "trainer.py")
  assert "make_train_step(" in bench and "step_lib.make_train_step(" in trainer
  for own_copy in ("value_and_grad", "tx.update(", "apply_updates", "softmax_cross_entropy"):
    assert own_copy not in bench and own_copy not in trainer, own_copy
  assert "losses.pretraining(" in bench and "losses.pretraining(" in source("bertjax", "tasks", "pretraining.py")
