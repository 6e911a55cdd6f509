"""`bertjax.predict` on a fine-tuned SST-2 workdir vs transformers' pipeline, float32 vs int8 (qwix).

    python benchmarks/predict_sst2.py --workdir=workdirs/sst2_16k [--glue_dir=../shared/data/glue] [--batch_size=32]

On the SST-2 dev sentences (labels dropped): accuracy of `Predictor` (float32, int8 weight-only, int8 dynamic)
against the training run's own eval accuracy, label agreement with transformers' `pipeline("text-classification")`
on the `to_hf` export (same batch size, same maximum length, same CPU, in this one process), sentences/s of each,
parameter file sizes; and whether `predict` on the test sentences reproduces `predictions/SST-2.tsv` row for row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def timed(fn, *args, repeat: int = 1):
  fn(*args)  # warm-up: compiles every bucket shape
  t = time.perf_counter()
  for _ in range(repeat):
    out = fn(*args)
  return out, (time.perf_counter() - t) / repeat


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--glue_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
  ap.add_argument("--batch_size", type=int, default=32)
  a = ap.parse_args()
  from bertjax import predict, quantize
  from bertjax.artifacts import workdir
  from bertjax.convert import commands
  dev = [l.rstrip("\n").split("\t") for l in open(os.path.join(a.glue_dir, "SST-2", "dev.tsv"), encoding="utf-8")][1:]
  texts, gold = [r[0] for r in dev], [r[1] for r in dev]
  run_acc = json.load(open(os.path.join(a.workdir, "eval_metrics.json"))).get("best_accuracy")
  p = predict.Predictor.from_checkpoint(a.workdir, batch_size=a.batch_size)
  res = {"dev_sentences": len(texts), "max_seq_length": p.max_seq_length, "batch_size": a.batch_size,
         "training_run_accuracy": run_acc, "checkpoint": p.source}
  out, secs = timed(p, texts)
  labels = [o["label"] for o in out]
  res["bertjax_float32"] = {"accuracy": sum(x == g for x, g in zip(labels, gold)) / len(gold),
                            "sentences_per_s": len(texts) / secs}

  tmp = tempfile.mkdtemp(prefix="predict_sst2_")
  commands.to_hf(p.source, os.path.join(tmp, "hf"), verify=False, log=lambda _: None)
  import torch
  from transformers import pipeline
  pipe = pipeline("text-classification", model=os.path.join(tmp, "hf"), device="cpu")
  kw = dict(batch_size=a.batch_size, truncation=True, max_length=p.max_seq_length)
  hf_out, hf_secs = timed(lambda t: pipe(t, **kw), texts)
  hf_labels = [str(o["label"]) for o in hf_out]  # the export's id2label holds the run's label names
  agree = sum(x == y for x, y in zip(hf_labels, labels)) / len(labels)
  res["transformers_pipeline"] = {"accuracy": sum(x == g for x, g in zip(hf_labels, gold)) / len(gold),
                                  "sentences_per_s": len(texts) / hf_secs, "torch_threads": torch.get_num_threads(),
                                  "label_agreement_with_bertjax": agree}
  res["speedup_vs_pipeline"] = len(texts) / secs / res["transformers_pipeline"]["sentences_per_s"]

  step = workdir.find_checkpoint(a.workdir)
  res["float32_params_bytes"] = sum(os.path.getsize(os.path.join(r, f))
                                    for r, _, fs in os.walk(os.path.join(step, "params")) for f in fs)
  for mode in quantize.MODES:
    folder = os.path.join(tmp, mode)
    sizes = quantize.quantize(step, folder, mode)
    q = predict.load(folder, batch_size=a.batch_size)
    qout, qsecs = timed(q, texts)
    ql = [o["label"] for o in qout]
    res[mode] = {"accuracy": sum(x == g for x, g in zip(ql, gold)) / len(gold), "sentences_per_s": len(texts) / qsecs,
                 "file_bytes": sizes["file_bytes"],
                 "agreement_with_float32": sum(x == y for x, y in zip(ql, labels)) / len(ql)}

  test = [l.rstrip("\n").split("\t") for l in open(os.path.join(a.glue_dir, "SST-2", "test.tsv"), encoding="utf-8")][1:]
  sub = os.path.join(a.workdir, "predictions", "SST-2.tsv")
  if os.path.exists(sub):
    want = [l.rstrip("\n").split("\t") for l in open(sub)][1:]
    got = [o["label"] for o in p([r[1] for r in test])]
    same = sum(w == [r[0], g] for w, r, g in zip(want, test, got))
    res["test_rows_equal_to_run_predictions"] = f"{same}/{len(want)}"
  print(json.dumps(res, indent=2))


if __name__ == "__main__":
  main()
