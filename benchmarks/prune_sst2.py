"""Head pruning on a fine-tuned SST-2 workdir: dev accuracy and `predict` sentences/s at 0 / 25 / 50% of heads.

    python benchmarks/prune_sst2.py --workdir=workdirs/sst2_16k --out=workdirs/sst2_pruned \
        [--fractions=0.25,0.5] [--recover_steps=100] [--num_examples=512] [--batch_size=32]

For each fraction: `bertjax.prune` (importance on the run's first `num_examples` training examples) into
`<out>/p<pct>`, and a recovery fine-tune of that pruned model (`prune.recover`: the run's own config, the normal
trainer, `recover_steps` steps) into `<out>/p<pct>_r<steps>`; folders already there are reused. Then every model
(the unpruned run, each pruned one, each recovered one) predicts the SST-2 dev sentences (labels dropped) with
`Predictor` at `batch_size`: one warm-up pass (compiles every bucket shape; gives the accuracy), then `repeats`
rounds of one timed pass per model, the models taken in turn (so a load change on a shared machine hits them
alike); sentences/s is the median over the rounds. Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--glue_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
  ap.add_argument("--fractions", default="0.25,0.5")
  ap.add_argument("--recover_steps", type=int, default=100)
  ap.add_argument("--num_examples", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  from bertjax import predict, prune
  from bertjax.artifacts import workdir
  dev = [l.rstrip("\n").split("\t") for l in open(os.path.join(a.glue_dir, "SST-2", "dev.tsv"), encoding="utf-8")][1:]
  texts, gold = [r[0] for r in dev], [r[1] for r in dev]
  step_dir = workdir.find_checkpoint(a.workdir)
  config = prune.run_config(workdir.workdir_of(step_dir), step_dir)
  models, res = {"0%": a.workdir}, {"workdir": a.workdir, "checkpoint": step_dir, "dev_sentences": len(texts),
                                    "batch_size": a.batch_size, "recover_steps": a.recover_steps, "models": {}}
  for f in (float(x) for x in a.fractions.split(",")):
    pct = f"{round(100 * f)}%"
    folder = os.path.join(a.out, f"p{round(100 * f)}")
    if not os.path.exists(os.path.join(folder, prune.PRUNE_REPORT)):
      t = time.perf_counter()
      prune.prune(a.workdir, folder, f, a.num_examples)
      res[f"prune_seconds_{pct}"] = time.perf_counter() - t
    report = json.load(open(os.path.join(folder, prune.PRUNE_REPORT)))
    res[f"pruned_{pct}"] = {k: report[k] for k in ("heads_removed", "heads_per_layer", "kept_heads",
                                                   "examples_scored", "parameters_before", "parameters_after")}
    models[pct] = folder
    if a.recover_steps:
      rec = f"{folder}_r{a.recover_steps}"
      if not os.path.exists(os.path.join(rec, "eval_metrics.json")):
        t = time.perf_counter()
        prune.recover(config, folder, rec, a.recover_steps)
        res[f"recover_seconds_{pct}"] = time.perf_counter() - t
      res[f"recovery_eval_{pct}"] = json.load(open(os.path.join(rec, "eval_metrics.json")))
      models[f"{pct} + {a.recover_steps} recovery steps"] = rec

  predictors = {}
  for name, path in models.items():
    p = predict.Predictor.from_checkpoint(path, batch_size=a.batch_size)
    labels = [o["label"] for o in p(texts)]  # warm-up: compiles every bucket shape
    predictors[name] = p
    res["models"][name] = {"checkpoint": p.source, "accuracy": sum(x == g for x, g in zip(labels, gold)) / len(gold)}
  rates = {name: [] for name in predictors}
  for _ in range(a.repeats):
    for name, p in predictors.items():
      t = time.perf_counter()
      p(texts)
      rates[name].append(len(texts) / (time.perf_counter() - t))
  for name, r in rates.items():
    res["models"][name].update(sentences_per_s=float(np.median(r)), sentences_per_s_rounds=[round(x, 1) for x in r])
  print(json.dumps(res, indent=2))
  print("\n| heads removed | dev accuracy | sentences/s |\n|---|---|---|")
  for name, m in res["models"].items():
    print(f"| {name} | {m['accuracy']:.4f} | {m['sentences_per_s']:.1f} |")


if __name__ == "__main__":
  main()
