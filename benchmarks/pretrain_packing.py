"""Pretraining with and without sequence packing on the same config: padding share and real-token throughput.

  python benchmarks/pretrain_packing.py                      # configs/mlm.py (BBC News), 100 steps each way
  python benchmarks/pretrain_packing.py --steps=300 --max_segments=4,8 --out=workdirs/pretrain_packing.json

Prints the share of padding positions in the training rows unpacked and packed (first-fit, at most k pairs per
row) for each k, then trains `--steps` steps of the config unpacked and packed (k = the first of
`--max_segments`) in temporary workdirs and reports steps/s and real (non-padding) tokens/s, measured between
the first and last logged step (compilation and evaluation excluded). Both runs see the same steps and batch
size; a packed row holds several pairs, so packed runs process more pairs per step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from finetune_glue import _Progress, _rate  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "mlm.py"))
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--max_segments", default="2,3,4,8", help="k values for the padding table; the first is trained")
  ap.add_argument("--out", default=os.path.join("workdirs", "pretrain_packing.json"))
  a = ap.parse_args(argv)
  from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)
  import importlib.util
  from absl import logging as absl_logging
  from bertjax.data import pretraining as pt
  from bertjax.tasks.pretraining import PretrainingTask
  from bertjax.train import trainer as trainer_lib

  spec = importlib.util.spec_from_file_location("cfg", a.config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  base = mod.get_config()
  task = PretrainingTask(base, tempfile.mkdtemp(prefix="bertjax_pack_probe_"))
  task.prepare()
  pairs, width = task.train_pairs, base.data.max_seq_length
  ks = [int(k) for k in a.max_segments.split(",")]
  out = {"config": a.config, "pairs": len(pairs["lengths"]), "width": width,
         "padding_unpacked": pt.padding_share(pairs["lengths"], width), "packed": {}}
  print(f"{out['pairs']} training pairs of <= {width} tokens, mean {pairs['lengths'].mean():.1f} real tokens; "
        f"padding {100 * out['padding_unpacked']:.1f}% unpacked")
  for k in ks:
    p = pt.pack_pairs(pairs, k)
    out["packed"][k] = {"rows": len(p["lengths"]), "padding": pt.padding_share(p["lengths"], width),
                        "mean_pairs_per_row": float(p["nsp_slots"].sum(1).mean())}
    print(f"  k={k}: {out['packed'][k]['rows']} rows ({out['packed'][k]['mean_pairs_per_row']:.2f} pairs/row), "
          f"padding {100 * out['packed'][k]['padding']:.1f}%")
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().setLevel(logging.INFO)  # the trainer's `train step` lines reach the progress handler
  for packing in (False, True):
    c = mod.get_config()
    c.data.packing, c.data.max_segments_per_row = packing, ks[0]
    t = c.training
    t.num_train_steps, t.log_every_steps = a.steps, max(1, a.steps // 5)
    t.eval_every_steps = t.checkpoint_every_steps = a.steps
    rows = pt.pack_pairs(pairs, ks[0])["lengths"] if packing else pairs["lengths"]
    progress, workdir = _Progress(), tempfile.mkdtemp(prefix="bertjax_pack_")
    logging.getLogger().addHandler(progress)
    load0, t0 = os.getloadavg()[0], time.time()
    try:
      result = trainer_lib.train_and_evaluate(c, workdir)
    finally:
      logging.getLogger().removeHandler(progress)
      shutil.rmtree(workdir, ignore_errors=True)
    rate, window = _rate(progress.marks, [])
    name = f"packed_k{ks[0]}" if packing else "unpacked"
    out[name] = {"steps_per_s": rate, "timed_steps": window, "wall_s": time.time() - t0,
                 "real_tokens_per_s": rate * t.global_batch_size * float(np.mean(rows)),
                 "load_avg_1min": [load0, os.getloadavg()[0]],
                 "eval": {k: result[k] for k in ("mlm_accuracy", "mlm_accuracy_mask", "nsp_accuracy") if k in result}}
    print(f"{name}: {rate:.2f} steps/s, {out[name]['real_tokens_per_s']:.0f} real tokens/s "
          f"(steps {window}), held-out {out[name]['eval']}", flush=True)
  out["real_tokens_ratio"] = out[f"packed_k{ks[0]}"]["real_tokens_per_s"] / out["unpacked"]["real_tokens_per_s"]
  print(f"real tokens/s packed / unpacked: {out['real_tokens_ratio']:.2f}x")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2, default=float)
  return out


if __name__ == "__main__":
  main()
