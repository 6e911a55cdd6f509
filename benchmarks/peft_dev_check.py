"""A LoRA workdir and its `to_hf --peft` folder predict a GLUE dev set alike: bertjax (merged LoRA) vs HF peft
(unmerged LoRA on the transformers base), the latter in a fresh Python process.

  python -m bertjax.convert to_hf --peft --checkpoint=workdirs/sst2_lora --out=/tmp/sst2-lora-peft
  python benchmarks/peft_dev_check.py --workdir=workdirs/sst2_lora --peft_dir=/tmp/sst2-lora-peft \
    --data_dir=../shared/data/glue --task=sst2 --max_seq_length=64

Prints both dev accuracies and the largest logit difference over the dev rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PEFT_SIDE = r"""
import csv, json, sys
import numpy as np, torch, transformers, peft
folder, dev, n_cols, max_len, out = sys.argv[1:6]
cfg = json.load(open(folder + "/adapter_config.json"))
tok = transformers.AutoTokenizer.from_pretrained(folder)
base = transformers.AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=2)
model = peft.PeftModel.from_pretrained(base, folder).eval()
rows = list(csv.reader(open(dev, encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
logits = []
with torch.no_grad():
  for i in range(0, len(rows), 64):
    enc = tok([r[0] for r in rows[i:i + 64]], truncation=True, max_length=int(max_len), padding=True,
              return_tensors="pt")
    logits.append(model(**enc).logits.numpy())
np.save(out, np.concatenate(logits))
"""


def bertjax_logits(workdir: str, data_dir: str, task: str, max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(dev logits of the real rows, labels) from the workdir's latest checkpoint, LoRA merged onto its base."""
  import jax
  from flax import nnx

  sys.path.insert(0, REPO)
  from configs import glue
  from bertjax.artifacts.factory import model_from_meta
  from bertjax.tasks.glue import GlueTask
  from bertjax.train import checkpoint
  params, meta = checkpoint.load_params(workdir)
  c = glue.get_config()
  c.init_from_hf = meta["peft"]["base"]["init_from_hf"]
  c.data.update(task=task, data_dir=data_dir, max_seq_length=max_seq_length)
  t = GlueTask(c, tempfile.mkdtemp())
  t.prepare()
  model = model_from_meta(meta, params, dtype="float32")
  predict = nnx.jit(lambda m, b: t.predict_step(m, b))
  outs = [jax.tree.map(np.asarray, predict(model, b)) for b in t.eval_batches()]
  keep = np.concatenate([o["example_weights"] for o in outs]) > 0
  return np.concatenate([o["logits"] for o in outs])[keep], np.concatenate([o["labels"] for o in outs])[keep]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--peft_dir", required=True)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--task", default="sst2")
  p.add_argument("--max_seq_length", type=int, default=64)
  a = p.parse_args()
  ours, labels = bertjax_logits(a.workdir, a.data_dir, a.task, a.max_seq_length)
  out = os.path.join(tempfile.mkdtemp(), "peft_logits.npy")
  dev = os.path.join(a.data_dir, "SST-2" if a.task == "sst2" else a.task.upper(), "dev.tsv")
  subprocess.run([sys.executable, "-c", _PEFT_SIDE, a.peft_dir, dev, "1", str(a.max_seq_length), out], check=True)
  theirs = np.load(out)
  print(json.dumps({"rows": int(len(labels)), "bertjax_accuracy": float(np.mean(ours.argmax(-1) == labels)),
                    "peft_accuracy": float(np.mean(theirs.argmax(-1) == labels)),
                    "same_predictions": int(np.sum(ours.argmax(-1) == theirs.argmax(-1))),
                    "max_abs_logit_diff": float(np.max(np.abs(ours - theirs)))}))


if __name__ == "__main__":
  main()
