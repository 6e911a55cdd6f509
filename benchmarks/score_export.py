"""Score a pretraining run where it never trained, the way a user of the export would: with transformers.

  python benchmarks/score_export.py --workdir=workdirs/mlm [--out=workdirs/mlm_hf]

1. Exports the run with `python -m bertjax.convert to_hf` (which checks parity with transformers itself).
2. Loads the folder with transformers' `BertForPreTraining` and its tokenizer, and scores masked-token
   prediction on (a) the run's held-out BBC News documents (the `data.eval_fraction` split, rebuilt with the
   run's seed) and (b) the CoNLL-2003 dev sentences (Reuters news, never seen in training), each cut into
   single-segment passages of up to 128 tokens (whole sentences, in order). In every passage 15% of the
   non-special tokens are chosen (at most 20) and every chosen position is set to [MASK]. Reported: top-1
   accuracy at those positions against always answering their most frequent token.
3. Runs `transformers.pipeline("fill-mask")` on the export for a few held-out sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bertjax.data import corpus, pretraining as pt  # noqa: E402


def held_out_documents(config: dict) -> list[str]:
  """The run's held-out documents: `data.eval_fraction` of the corpus, split with the run's seed (as prepare())."""
  d = config["data"]
  cache = d.get("cache_dir") or corpus.default_cache_dir()
  docs = corpus.load_documents(d["corpus"], cache, d["text_column"], d["sample_by"])
  n_eval = max(2, int(round(len(docs) * d["eval_fraction"])))
  return list(docs.train_test_split(test_size=n_eval, seed=config["seed"], shuffle=True)["test"]["text"])


def fill_mask_examples(docs: list[str], tok, n: int = 6, seed: int = 0) -> list[tuple[str, str]]:
  """(sentence with one [MASK], the hidden word): a random one-token word of a 10-30 word sentence per doc."""
  rng = np.random.default_rng(seed)
  out = []
  for text in docs:
    sents = [s for s in pt.split_sentences(text)[1:] if 10 <= len(s.split()) <= 30]  # [0] is the title
    if not sents:
      continue
    words = sents[0].split()
    ok = [i for i, w in enumerate(words) if i > 0 and w.isalpha() and len(tok.tokenize(w)) == 1]
    if ok:
      i = int(rng.choice(ok))
      out.append((" ".join(words[:i] + [tok.mask_token] + words[i + 1:]), words[i]))
    if len(out) == n:
      break
  return out


def conll_sentences(path: str) -> list[str]:
  """CoNLL-2003 `token TAG` lines -> sentences (tokens joined by spaces; WordPiece splits punctuation anyway)."""
  out, cur = [], []
  with open(path) as f:
    for line in f:
      parts = line.split()
      if parts and parts[0] != "-DOCSTART-":
        cur.append(parts[0])
      elif cur:
        out.append(" ".join(cur))
        cur = []
  if cur:
    out.append(" ".join(cur))
  return out


def passages(groups: list[list[str]], tok, max_len: int = 128) -> np.ndarray:
  """Whole sentences packed in order into [CLS] ... [SEP] passages of <= max_len tokens (a group never spans
  passages of another group); a sentence longer than a passage is cut. -> int32 [N, max_len], 0-padded."""
  rows = []
  for sents in groups:
    ids = tok(sents, add_special_tokens=False)["input_ids"] if sents else []
    cur: list[int] = []
    for s in ids:
      if cur and len(cur) + len(s) > max_len - 2:
        rows.append(cur)
        cur = []
      cur = cur + s[:max_len - 2 - len(cur)]
    if cur:
      rows.append(cur)
  out = np.zeros((len(rows), max_len), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r) + 2] = [tok.cls_token_id, *r, tok.sep_token_id]
  return out


def score(model, tok, ids: np.ndarray, seed: int = 0, batch: int = 64) -> dict[str, float]:
  """Every chosen position (15% of non-special tokens, <= 20) set to [MASK]; top-1 accuracy vs most frequent."""
  import torch
  masker = pt.Masker(pt.MaskConfig(0.15, 20, 1.0, 0.0), len(tok), tok.all_special_ids, tok.mask_token_id,
                     tok.pad_token_id)
  b = masker({"input_ids": ids, "token_type_ids": np.zeros_like(ids), "nsp_labels": np.zeros(len(ids), np.int32)},
             np.random.default_rng(seed))
  preds = []
  with torch.no_grad():
    for s in range(0, len(ids), batch):
      logits = model(input_ids=torch.tensor(b["input_ids"][s:s + batch], dtype=torch.long),
                     attention_mask=torch.tensor(b["attention_mask"][s:s + batch], dtype=torch.long),
                     token_type_ids=torch.zeros(ids[s:s + batch].shape, dtype=torch.long)).prediction_logits
      pos = torch.tensor(b["masked_positions"][s:s + batch], dtype=torch.long)
      preds.append(torch.gather(logits.argmax(-1), 1, pos).numpy())
  w = b["masked_weights"] > 0
  labels, pred = b["masked_labels"][w], np.concatenate(preds)[w]
  top = int(np.bincount(labels).argmax())
  return {"passages": len(ids), "masked": int(w.sum()), "accuracy": float((pred == labels).mean()),
          "baseline_frequent": float((labels == top).mean()), "frequent_token": tok.convert_ids_to_tokens(top)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="workdirs/mlm", help="a finished bertjax pretraining run")
  ap.add_argument("--out", default="", help="export folder (default <workdir>_hf; replaced)")
  ap.add_argument("--conll", default=os.path.join(REPO, "..", "shared", "data", "conll2003", "dev.txt"))
  ap.add_argument("--seed", type=int, default=0, help="masking seed")
  a = ap.parse_args()
  out = a.out or a.workdir.rstrip("/") + "_hf"
  r = subprocess.run([sys.executable, "-m", "bertjax.convert", "to_hf", f"--checkpoint={a.workdir}", f"--out={out}",
                      "--overwrite"], cwd=REPO, capture_output=True, text=True)
  print(r.stdout.strip())
  if r.returncode:
    sys.exit(f"to_hf failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.BertForPreTraining.from_pretrained(out).eval()
  with open(os.path.join(a.workdir, "config.json")) as f:
    config = json.load(f)
  results = {}
  docs = held_out_documents(config)
  results["bbc_held_out"] = score(model, tok, passages([pt.split_sentences(t) for t in docs], tok), a.seed)
  if os.path.exists(a.conll):
    results["conll2003_dev"] = score(model, tok, passages([conll_sentences(a.conll)], tok), a.seed)
  else:
    print(f"skipping CoNLL-2003: {a.conll} not found")
  print(f"\n{'text (never trained on)':26s} {'passages':>8s} {'[MASK]s':>8s} {'accuracy':>9s} "
        f"{'most frequent token':>22s}")
  for name, s in results.items():
    print(f"{name:26s} {s['passages']:8d} {s['masked']:8d} {s['accuracy']:9.4f} "
          f"{s['baseline_frequent']:9.4f} ({s['frequent_token']!r})")
  fill = transformers.pipeline("fill-mask", model=out, tokenizer=out, top_k=5)
  results["fill_mask"] = []
  print("\nfill-mask (transformers pipeline on the export), held-out BBC sentences:")
  for text, word in fill_mask_examples(docs, tok, seed=a.seed):
    top = [(p["token_str"], round(p["score"], 3)) for p in fill(text)]
    results["fill_mask"].append({"text": text, "hidden": word, "top5": top})
    print(f"  {text}\n    hidden: {word} -> " + ", ".join(f"{t} {s:.3f}" for t, s in top))
  with open(os.path.join(out, "scores.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
