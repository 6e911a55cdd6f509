"""Kill a tiny pretraining run and rerun the same command: are the final parameters bit-identical?

  python benchmarks/preemption_check.py --out /tmp/preemption [--kills 5] [--steps 40] [--seed 0]

1. an uninterrupted reference run;
2. `--kills` runs killed with SIGKILL at a random moment after step 5 (the last one the moment an async save's
   `*.orbax-checkpoint-tmp-*` folder appears, i.e. during the save), each rerun to the end;
3. one run sent SIGTERM at a random moment after step 5: exit code, time from signal to exit, the checkpoint step
   it names; then rerun to the end.
Every final parameter tree is compared with the reference's, array by array (exact equality). Prints one line per
trial and writes `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, cache: str, steps: int) -> list[str]:
  c = "--config."
  return [sys.executable, "-m", "bertjax.main", "--config=" + os.path.join(REPO, "configs", "mlm.py"),
          f"--workdir={workdir}", f"{c}data.cache_dir={cache}", f"{c}data.vocab_size=2000",
          f"{c}data.max_seq_length=64", f"{c}data.max_predictions_per_seq=10", f"{c}model.preset=tiny",
          f"{c}model.max_position_embeddings=64", f"{c}training.global_batch_size=16",
          f"{c}training.eval_batch_size=64", f"{c}training.num_train_steps={steps}", f"{c}training.log_every_steps=5",
          f"{c}training.eval_every_steps=100000", f"{c}training.checkpoint_every_steps=4",
          f"{c}training.keep_checkpoints=2", f"{c}training.async_checkpointing=True",
          f"{c}optimizer.warmup_steps=5"]


class Run:
  """A training process whose stderr lines are collected with their arrival times."""

  def __init__(self, cmd: list[str], log: str):
    self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": REPO})
    self.lines: list[tuple[float, str]] = []
    self.log = open(log, "w")
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self):
    for line in self.proc.stderr:
      self.lines.append((time.time(), line))
      self.log.write(line)
      self.log.flush()

  def wait_for(self, pattern: str, timeout: float = 1800) -> float | None:
    t_end = time.time() + timeout
    while time.time() < t_end:
      for t, line in self.lines:
        if re.search(pattern, line):
          return t
      if self.proc.poll() is not None:
        self.reader.join(timeout=5)
        return next((t for t, line in self.lines if re.search(pattern, line)), None)
      time.sleep(0.05)
    return None

  def finish(self, timeout: float = 3600) -> int:
    rc = self.proc.wait(timeout=timeout)
    self.reader.join(timeout=10)
    self.log.close()
    return rc

  def text(self) -> str:
    return "".join(line for _, line in self.lines)


def same_params(a: str, b: str) -> bool:
  import jax
  import numpy as np
  from bertjax.train.checkpoint import load_params
  pa, ma = load_params(a)
  pb, mb = load_params(b)
  la, lb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
  return ma["step"] == mb["step"] and len(la) == len(lb) and all(
      ka == kb and x.dtype == y.dtype and np.array_equal(x, y) for (ka, x), (kb, y) in zip(la, lb))


def tmp_dirs(workdir: str) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if "tmp" in n) if os.path.isdir(d) else []


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="/tmp/bertjax_preemption")
  ap.add_argument("--kills", type=int, default=5)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  rng = random.Random(args.seed)
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  cache = os.path.join(args.out, "cache")
  summary: dict = {"steps": args.steps, "trials": []}

  ref = os.path.join(args.out, "reference")
  r = Run(command(ref, cache, args.steps), os.path.join(args.out, "reference.log"))
  t_start = r.wait_for(r"train step 5/")  # after the first step's compilation, which takes most of a short run
  rc = r.finish()
  t_end = r.lines[-1][0]
  assert rc == 0 and t_start, f"reference run failed (rc {rc}); see {args.out}/reference.log"
  train_s = t_end - t_start
  summary["reference_train_s"] = round(train_s, 1)
  print(f"reference: {args.steps} steps, {train_s:.1f} s from step 5 to exit", flush=True)

  for i in range(args.kills + 1):
    sigterm = i == args.kills
    wd = os.path.join(args.out, f"trial{i}")
    r = Run(command(wd, cache, args.steps), os.path.join(args.out, f"trial{i}.log"))
    r.wait_for(r"train step 5/")
    during_save = i == args.kills - 1
    if during_save:  # kill the moment an async save's temporary folder exists
      t_end = time.time() + train_s
      while not tmp_dirs(wd) and time.time() < t_end and r.proc.poll() is None:
        time.sleep(0.002)
      delay = None
    else:
      delay = rng.uniform(0.1, 0.9) * train_s
      time.sleep(delay)
    left = tmp_dirs(wd)
    t_sig = time.time()
    sig = signal.SIGTERM if sigterm else signal.SIGKILL
    finished_first = r.proc.poll() is not None
    if not finished_first:
      r.proc.send_signal(sig)
    rc = r.finish()
    exit_s = time.time() - t_sig
    steps_before = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    m = re.search(r"saved a checkpoint at step (\d+)", r.text())
    r2 = Run(command(wd, cache, args.steps), os.path.join(args.out, f"trial{i}.rerun.log"))
    rc2 = r2.finish()
    resumed = re.search(r"Resuming from checkpoint at step (\d+)", r2.text())
    ok = rc2 == 0 and same_params(ref, wd)
    trial = {"signal": sig.name, "delay_s": None if delay is None else round(delay, 2), "during_save": during_save,
             "finished_before_signal": finished_first, "rc": rc, "exit_s": round(exit_s, 2),
             "checkpoints_after_kill": steps_before, "tmp_dirs_at_kill": left,
             "tmp_dirs_after_rerun": tmp_dirs(wd), "resumed_from": int(resumed.group(1)) if resumed else None,
             "rerun_rc": rc2, "bit_identical": ok}
    if sigterm:
      trial["checkpoint_step_named"] = int(m.group(1)) if m else None
    summary["trials"].append(trial)
    print(json.dumps(trial), flush=True)
  kills = [t for t in summary["trials"] if t["signal"] == "SIGKILL"]
  summary["kill9_identical"] = f"{sum(t['bit_identical'] for t in kills)}/{len(kills)}"
  term = summary["trials"][-1]
  summary["sigterm_ok"] = bool(term["rc"] == 143 and term["bit_identical"] and term["checkpoint_step_named"]
                               in term["checkpoints_after_kill"])
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"kill -9: {summary['kill9_identical']} bit-identical; SIGTERM: rc {term['rc']}, exit {term['exit_s']} s "
        f"after the signal, checkpoint at step {term.get('checkpoint_step_named')}, continuation "
        f"{'bit-identical' if term['bit_identical'] else 'DIFFERENT'}", flush=True)
  return 0 if summary["sigterm_ok"] and all(t["bit_identical"] for t in kills) else 1


if __name__ == "__main__":
  sys.exit(main())
