"""int8 (qwix) vs float32 on a fine-tuned GLUE workdir: dev metrics, sentences/s and file sizes, one process.

    python benchmarks/quantize_glue.py --workdir=workdirs/mrpc --task=mrpc [--glue_dir=../shared/data/glue]

Runs `bertjax.predict`'s Predictor on the task's dev examples (labels dropped) with the float32 checkpoint and
with each `bertjax.quantize` mode, and scores every run with the training run's own metric code
(`bertjax.tasks.metrics.glue_metrics`: accuracy, F1 for MRPC/QQP, ...). Sentences/s is the second of two passes
(the first compiles every batch shape). `benchmarks/predict_sst2.py` adds the transformers pipeline for SST-2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="a fine-tuned GLUE run folder (or its best/ or a step folder)")
  ap.add_argument("--task", required=True)
  ap.add_argument("--glue_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
  ap.add_argument("--batch_size", type=int, default=32)
  a = ap.parse_args(argv)
  from bertjax import predict, quantize
  from bertjax.data import glue
  from bertjax.tasks import metrics

  spec = glue.GLUE_TASKS[a.task]
  dev = glue.read_split(a.glue_dir, a.task, spec.dev_splits[0])
  texts = [e.text_a for e in dev]
  pairs = [e.text_b for e in dev] if spec.text_columns[1:] else None
  gold = np.array([e.label if spec.is_regression else spec.labels.index(e.label) for e in dev])

  def score(p):
    p(texts[:64], None if pairs is None else pairs[:64])  # compile
    t = time.perf_counter()
    out = p(texts, pairs)
    secs = time.perf_counter() - t
    if spec.is_regression:
      pred = np.array([o["score"] for o in out])
      labels = None
    else:
      labels = [o["label"] for o in out]
      pred = np.array([spec.labels.index(x) for x in labels])
    return {**metrics.glue_metrics(a.task, pred, gold), "examples_per_s": len(texts) / secs}, labels

  res = {"task": a.task, "dev_examples": len(dev), "batch_size": a.batch_size}
  p = predict.Predictor.from_checkpoint(a.workdir, batch_size=a.batch_size)
  res["checkpoint"] = step = p.source
  res["float32"], ref = score(p)
  res["float32"]["file_bytes"] = sum(os.path.getsize(os.path.join(r, f))
                                     for r, _, fs in os.walk(os.path.join(step, "params")) for f in fs)
  tmp = tempfile.mkdtemp(prefix="quantize_glue_")
  for mode in quantize.MODES:
    folder = os.path.join(tmp, mode)
    sizes = quantize.quantize(step, folder, mode)
    res[mode], labels = score(predict.load(folder, batch_size=a.batch_size))
    res[mode]["file_bytes"] = sizes["file_bytes"]
    if labels is not None:
      res[mode]["same_label_as_float32"] = float(np.mean([x == y for x, y in zip(labels, ref)]))
  print(json.dumps(res, indent=2))
  return res


if __name__ == "__main__":
  main()
