"""Seconds per train step of full fine-tuning vs LoRA vs adapters on the same batches, measured interleaved
(round-robin, so a busy shared machine slows all three alike), plus trainable parameters and optimizer-state bytes.

  python benchmarks/peft_step_time.py --init_from_hf=$MINILM --data_dir=../shared/data/glue --rounds=3 --steps=5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"full": {"method": "none"}, "lora": {"method": "lora"}, "adapter": {"method": "adapter", "adapter_size": 64}}


def trainer_for(peft: dict, a: argparse.Namespace):
  sys.path.insert(0, REPO)
  from configs import glue
  from bertjax.train.trainer import Trainer
  c = glue.get_config()
  c.init_from_hf = a.init_from_hf
  c.data.update(task="sst2", data_dir=a.data_dir, max_train_examples=16000, max_seq_length=a.max_seq_length)
  c.training.num_epochs = 1.0
  c.peft.update(peft)
  t = Trainer(c, tempfile.mkdtemp())
  t.setup()
  return t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--init_from_hf", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--max_seq_length", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  a = p.parse_args()
  from bertjax.peft import core
  runs = {}
  for name, peft in METHODS.items():
    t = trainer_for(peft, a)
    s = t.init_state()
    batch = t.put_batch(t.source.batch(0))
    params, opt, _ = t.train_step(s.params, s.opt_state, batch, np.int32(1), s.rng)  # compile
    runs[name] = dict(trainer=t, params=params, opt=opt, rng=s.rng, times=[],
                      trainable=core.count(t.abstract_params)[0], total=sum(core.count(x)[0] for x in (
                          t.abstract_params, t.abstract_frozen)), opt_bytes=core.count(t.abstract_opt)[1])
  import jax
  for r in range(a.rounds):
    for name, run in runs.items():
      t = run["trainer"]
      batches = [t.put_batch(t.source.batch(2 + r * a.steps + i)) for i in range(a.steps)]
      jax.block_until_ready(run["params"])
      t0 = time.perf_counter()
      for i, b in enumerate(batches):
        run["params"], run["opt"], m = t.train_step(run["params"], run["opt"], b, np.int32(2 + i), run["rng"])
      jax.block_until_ready((run["params"], m))
      run["times"].append((time.perf_counter() - t0) / a.steps)
  print(json.dumps({name: {"s_per_step_median_of_rounds": float(np.median(run["times"])),
                           "s_per_step_rounds": [round(x, 3) for x in run["times"]],
                           "trainable": run["trainable"], "total": run["total"],
                           "trainable_pct": round(100 * run["trainable"] / run["total"], 3),
                           "optimizer_state_bytes": run["opt_bytes"]} for name, run in runs.items()}, indent=1))


if __name__ == "__main__":
  main()
