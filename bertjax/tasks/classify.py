"""Text classification on one's own data (`config.task="classification"`, configs/classify.py).

Single-label (softmax + cross-entropy, optional "balanced" class weights), multi-label (sigmoid + binary
cross-entropy, `data.threshold`) or regression (`data.problem_type="regression"`, MSE) on
`BertForSequenceClassification`. Rows come from local files or a hub dataset (`bertjax.data.classify`); the
label set is read from the training rows and kept in the checkpoint meta (and so in the HF export's
`id2label`). Without validation data a seeded `data.dev_fraction` of the training rows is the dev split.

Every evaluation reports accuracy, macro / micro precision, recall and F1 (TensorBoard `eval/*`) and logs the
per-class table. After training the best parameters write `<workdir>/predictions/{dev,test}.jsonl`,
`<workdir>/confusion_matrix_{dev,test}.png` and the per-class reports and confusion matrices into
`eval_metrics.json` (`dev_report`, `test_report`; test scores also as `test_accuracy`, `test_macro_f1`, ...).

This is the one sequence-classification task: GLUE (`bertjax.tasks.glue`) is this task with GLUE's readers,
label sets, metrics and submission files.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.artifacts import checkpoint
from bertjax.data import classify as data, glue, loader, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import BertForSequenceClassification
from bertjax.tasks import common, metrics
from bertjax.tasks.base import Task
from bertjax.tasks.common import MODEL_KEYS, cache_dir_of, valid_rows

_CLASS_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision", "micro_recall",
                  "micro_f1", "weighted_f1")
_REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman_mean")
_PROBLEM_TYPES = {"regression": "regression", "single": "single_label_classification",
                  "multi": "multi_label_classification"}


class ClassificationTask(Task):
  """The sequence-classification task: the model, losses, batches (bucketed or packed), evaluation over one or
  more dev splits and the tokenizer / model config. The data source, label set, dev metrics and outputs are
  hooks (`_configure`, `_read`, `_featurize`, `_log_data`, `dev_metrics`, `finalize`, `checkpoint_meta`): here
  one's own files or hub dataset; `bertjax.tasks.glue.GlueTask` plugs in GLUE's readers, label sets and metrics."""
  name = "classification"
  head = "sequence_classification"
  main_metric = "macro_f1"
  predicts = True

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.kind = "single"  # single | multi (several labels per row) | regression
    self.label_names: list[str] = []
    self.features: dict[str, dict[str, np.ndarray]] = {}  # split -> token arrays (MODEL_KEYS, ...)
    self.targets: dict[str, np.ndarray] = {}  # labelled split -> class ids / 0-1 rows (multi) / scores
    self.dev_splits, self.test_splits = ["dev"], ["test"]  # the first dev split is the main one
    self.weights: np.ndarray | None = None  # "balanced" class weights
    self.threshold = 0.5
    self._configure(config.data)

  def _configure(self, d: ConfigDict) -> None:
    """Read the data config (no data loading): problem type, fields, metric, class weights."""
    problem = d.get("problem_type", "classification") or "classification"
    if problem not in ("classification", "regression"):
      raise UserError(f"data.problem_type={problem!r} is unknown; use 'classification' (with data.multi_label for "
                      "several labels per row) or 'regression'")
    self.kind = "regression" if problem == "regression" else "multi" if d.get("multi_label") else "single"
    self.fields = data.Fields(d.get("text_field", "text"), d.get("text_pair_field", "") or "",
                              d.get("label_field", "label"), self.kind == "multi", d.get("label_separator", ","),
                              self.kind == "regression")
    choices = _REGRESSION_METRICS if self.kind == "regression" else _CLASS_METRICS
    self.main_metric = (self.config.training.get("main_metric")
                        or ("pearson" if self.kind == "regression" else "macro_f1"))
    if self.main_metric not in choices:
      raise UserError(f"training.main_metric={self.main_metric!r} is not reported for this task; choose one of "
                      f"{list(choices)}")
    weights = d.get("class_weights", "") or ""
    if weights not in ("", "balanced") or (weights and self.kind == "regression"):
      raise UserError(f"data.class_weights={weights!r}: use 'balanced' (classification only) or ''")
    self.balanced = weights == "balanced"
    self.threshold = float(d.get("threshold", 0.5))
    self.splits: dict[str, data.Rows] = {}

  # -- data ---------------------------------------------------------------------------------------------
  def prepare(self) -> None:
    c = self.config
    common.check_seq_length(c)
    self._read()  # the data's mistakes first, before the tokenizer and model are loaded
    tok, self.tok_source = common.load_tokenizer(c, self.workdir)
    self.tok = glue.as_tokenizer(tok)
    glue.special_ids(self.tok)  # [CLS]/[SEP]/[PAD] present
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    self._featurize(toklib.fingerprint(self.tok))
    self._log_data()

  def _read(self) -> None:
    """The rows of every split (`self.splits`) and the label set, from files or a hub dataset."""
    d, cache = self.config.data, cache_dir_of(self.config)
    files = {"train": d.get("train_file", ""), "dev": d.get("validation_file", ""), "test": d.get("test_file", "")}
    if d.get("dataset"):
      if files["train"]:
        raise UserError("set either data.dataset or data.train_file, not both")
      names = {"train": d.get("train_split", "train"), "dev": d.get("validation_split", "validation"),
               "test": d.get("test_split", "test")}
      out = {s: data.read_hub(d.dataset, names[s], self.fields, cache, s == "train", s != "test")
             for s in ("train", "dev", "test") if names[s]}
      self.splits = {s: r for s, r in out.items() if r is not None}
    elif not files["train"]:
      raise UserError("no training data: set data.train_file (CSV, TSV, JSONL or parquet) or data.dataset")
    else:
      self.splits = {s: data.read_file(p, self.fields, cache, s != "test") for s, p in files.items() if p}
    self.label_names = ["score"] if self.kind == "regression" else self._resume_labels(
        data.label_names(self.splits["train"], self.fields))

  def _resume_labels(self, names: list[str]) -> list[str]:
    """A resumed run keeps the checkpoint's label order; other classes in the training data are refused."""
    old = checkpoint.latest_meta(self.workdir)
    if old.get("task") != self.name or "label_names" not in old:
      return names
    if sorted(old["label_names"]) != sorted(names):
      raise UserError(f"workdir {self.workdir} holds a checkpoint with labels {old['label_names']}, but the training "
                      f"data has {names}; use a new --workdir")
    return list(old["label_names"])

  def _featurize(self, fp: str) -> None:
    """Token arrays (cached), the dev split (carved from train when absent), row limits, targets, weights."""
    c, d = self.config, self.config.data
    splits = self.splits
    train = splits["train"]
    for rows in splits.values():  # every check first: labels are encoded (and refused) before tokenization
      if rows.labels is not None:
        data.encode_labels(rows, self.label_names, self.fields, train.source)
    for rows in splits.values():
      key = f"classify-v1|{rows.key}|{self.fields.text}|{self.fields.pair}|{fp}|{d.max_seq_length}"
      rows.features = common.cached_arrays(cache_dir_of(c), "classify", key, lambda r=rows: glue.encode_pairs(
          self.tok, r.texts, r.pairs, d.max_seq_length))
    if "dev" not in splits:
      splits["train"], splits["dev"] = data.carve(train, float(d.get("dev_fraction", 0.1)), c.seed)
      logging.info("no validation data: %d of the %d training rows (data.dev_fraction=%g, seed %d) are the dev split",
                   len(splits["dev"]), len(train), d.get("dev_fraction", 0.1), c.seed)
    limits = {"train": int(d.get("max_train_examples", 0) or 0), "dev": int(d.get("max_eval_examples", 0) or 0),
              "test": int(d.get("max_eval_examples", 0) or 0)}
    self.splits = {s: r.take(range(min(limits[s], len(r)))) if limits[s] else r for s, r in splits.items()}
    self.features = {s: r.features for s, r in self.splits.items()}
    self.targets = {s: data.encode_labels(r, self.label_names, self.fields, train.source)
                    for s, r in self.splits.items() if r.labels is not None}
    self.weights = (data.class_weights(self.targets["train"], self.num_labels, self.kind == "multi")
                    if self.balanced else None)

  def _log_data(self) -> None:
    full = {s: f"{100 * float(np.mean(r.features['attention_mask'][:, -1])):.1f}%" for s, r in self.splits.items()}
    logging.info("classification (%s): %s rows; %d labels %s; tokenizer %s; rows filling all %d tokens (maybe cut): "
                 "%s; main metric %s", _PROBLEM_TYPES[self.kind],
                 ", ".join(f"{s} {len(r)}" for s, r in self.splits.items()), self.num_labels,
                 self.label_names[:20], self.tok_source, self.config.data.max_seq_length, full, self.main_metric)
    if self.kind == "single":
      dev, train = (np.bincount(self.targets[s], minlength=self.num_labels) for s in ("dev", "train"))
      logging.info("dev majority-class accuracy %.4f (a baseline to beat); train counts %s", dev.max() / dev.sum(),
                   dict(zip(self.label_names, train.tolist())))
    if self.weights is not None:
      logging.info("balanced class weights: %s", dict(zip(self.label_names, np.round(self.weights, 4).tolist())))

  def _arrays(self, split: str) -> dict[str, np.ndarray]:
    feats = self.features[split]
    labels = self.targets.get(split)
    if labels is None:  # unlabelled test rows: dummy targets, never scored
      labels = np.zeros((len(feats["input_ids"]),) + ((self.num_labels,) if self.kind == "multi" else ()),
                        np.float32 if self.kind != "single" else np.int32)
    return {**{k: feats[k] for k in MODEL_KEYS}, "labels": labels}

  def train_source(self) -> loader.BatchSource:
    c = self.config
    arrays = self._arrays("train")
    return loader.BatchSource(arrays, c.training.global_batch_size, c.seed, jax.process_index(),
                              jax.process_count(), name="train", buckets=loader.data_buckets(c.data),
                              packer=common.packer(c, arrays, c.training.global_batch_size))

  def _batches(self, split: str) -> list[loader.Batch]:
    c = self.config
    arrays = self._arrays(split)
    return loader.eval_batches(arrays, c.training.eval_batch_size, None, c.seed, jax.process_index(),
                               jax.process_count(), loader.data_buckets(c.data),
                               packer=common.packer(c, arrays, c.training.eval_batch_size))

  def eval_batches(self) -> list[loader.Batch]:
    """The main dev split's batches, then those of the other dev splits (GLUE's MNLI mismatched)."""
    if not hasattr(self, "_eval"):
      per_split = [self._batches(s) for s in self.dev_splits]
      self._eval_counts = [len(b) for b in per_split]
      self._eval = [b for bs in per_split for b in bs]
    return self._eval

  # -- model ----------------------------------------------------------------------------------------------
  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def build_model(self, rngs: nnx.Rngs) -> BertForSequenceClassification:
    return BertForSequenceClassification(self.model_config, self.num_labels, rngs)

  def _losses(self, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row loss and loss weight (class weights for single-label; 1 otherwise)."""
    ones = jnp.ones(logits.shape[:1], jnp.float32)
    if self.kind == "regression":
      return jnp.square(logits[:, 0] - labels), ones
    if self.kind == "multi":
      pos = 1.0 if self.weights is None else jnp.asarray(self.weights)  # BCE pos_weight per label
      per = pos * labels * jax.nn.softplus(-logits) + (1.0 - labels) * jax.nn.softplus(logits)
      return per.mean(-1), ones
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return xent, ones if self.weights is None else jnp.asarray(self.weights)[labels]

  def _correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    if self.kind == "multi":
      return jnp.all((logits >= _logit(self.threshold)) == (labels > 0.5), -1).astype(jnp.float32)
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

  def loss_fn(self, model, batch, rngs, deterministic):
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                   deterministic=deterministic, rngs=rngs, **loader.packed_inputs(batch))
    per, lw = self._losses(logits, batch["labels"])
    w = batch.get("example_weights")
    w = jnp.ones(per.shape, jnp.float32) if w is None else w.astype(jnp.float32)
    total, n = jnp.sum(per * lw * w), jnp.sum(lw * w)  # class-weighted mean, as torch's CrossEntropyLoss(weight)
    out = {"loss": (total, n)}
    if self.kind != "regression":
      out["accuracy"] = (jnp.sum(self._correct(logits, batch["labels"]) * w), jnp.sum(w))
    return total / jnp.maximum(n, 1e-9), out

  def predict_step(self, model, batch) -> dict[str, jax.Array]:
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], deterministic=True,
                   **loader.packed_inputs(batch))
    return {"logits": logits, "labels": batch["labels"], "example_weights": batch["example_weights"]}

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _scores(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities or scores, predicted ids / 0-1 matrix / scores) from logits."""
    logits = logits.astype(np.float64)
    if self.kind == "regression":
      return logits[:, 0], logits[:, 0]
    if self.kind == "multi":
      probs = 1.0 / (1.0 + np.exp(-logits))
      return probs, probs >= self.threshold
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs, probs.argmax(-1)

  def report(self, split: str, logits: np.ndarray) -> dict[str, Any]:
    """Scalars (+ `per_class` and `confusion_matrix` for classification) of `logits` on a labelled split."""
    gold = self.targets[split]
    probs, pred = self._scores(logits)
    if self.kind == "regression":
      p, s = metrics.pearson(pred, gold), metrics.spearman(pred, gold)
      return {"loss": float(np.mean((pred - gold) ** 2)), "pearson": p, "spearman": s,
              "pearson_spearman_mean": (p + s) / 2}
    if self.kind == "multi":
      out = metrics.multilabel_report(pred, gold, self.label_names)
      eps = 1e-12
      out["loss"] = float(-np.mean(gold * np.log(probs + eps) + (1 - gold) * np.log(1 - probs + eps)))
    else:
      out = metrics.classification_report(pred, gold, self.label_names)
      out["loss"] = float(-np.mean(np.log(probs[np.arange(len(gold)), gold] + 1e-12)))
    return out

  def compute_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """`dev_metrics` of each dev split; those of a split after the main one are prefixed (`mismatched_...`)."""
    self.eval_batches()
    out, start = {}, 0
    for split, count in zip(self.dev_splits, self._eval_counts):
      logits = valid_rows(outputs[start:start + count])["logits"]
      start += count
      prefix = "" if split == self.dev_splits[0] else split.replace("dev_", "") + "_"
      out.update({prefix + k: v for k, v in self.dev_metrics(split, logits).items()})
    return out

  def dev_metrics(self, split: str, logits: np.ndarray) -> dict[str, float]:
    """Dev scalars for TensorBoard / early stopping; the per-class table goes to the log."""
    rep = self.report(split, logits)
    if "per_class" in rep:
      logging.info("%s per-class report:\n%s", split, metrics.report_table(rep))
    return {k: v for k, v in rep.items() if not isinstance(v, (dict, list))}

  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"num_labels": self.num_labels, "label_names": list(self.label_names),
            "problem_type": _PROBLEM_TYPES[self.kind], "threshold": self.threshold}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, Any]:
    """With the best params: predictions for dev and test, reports and confusion-matrix PNGs."""
    out: dict[str, Any] = {}
    for split in ("dev", "test"):
      if split not in self.splits:
        continue
      logits = valid_rows(predict(self.eval_batches() if split == "dev" else self._batches(split)))["logits"]
      labelled = split in self.targets
      rep = self.report(split, logits) if labelled else None
      if split == "test":
        out["test_predictions"] = float(len(logits))
        if rep is not None:
          out.update({f"test_{k}": v for k, v in rep.items() if not isinstance(v, (dict, list))})
      if rep is not None:
        out[f"{split}_report"] = {**rep, "labels": list(self.label_names)}
      if jax.process_index() == 0:
        self._write(split, logits, rep, workdir)
    return out

  def _write(self, split: str, logits: np.ndarray, rep: Mapping[str, Any] | None, workdir: str) -> None:
    probs, pred = self._scores(logits)
    names = self.label_names
    if self.kind == "regression":
      predicted = [float(x) for x in pred]
    elif self.kind == "multi":
      predicted = [[n for n, on in zip(names, row) if on] for row in pred]
    else:
      predicted = [names[i] for i in pred]
    with paths.staged(paths.join(workdir, "predictions")) as folder:  # a gs:// workdir: written here, then copied
      data.write_predictions(os.path.join(folder, f"{split}.jsonl"), self.splits[split], names,
                             np.atleast_2d(probs) if self.kind != "regression" else probs, predicted, self.kind)
    path = paths.join(workdir, "predictions", f"{split}.jsonl")
    logging.info("wrote %d %s predictions to %s", len(predicted), split, path)
    if rep is None or "confusion_matrix" not in rep:
      return
    logging.info("%s report (best checkpoint):\n%s", split, metrics.report_table(rep))
    with paths.staged(workdir) as folder:
      data.plot_confusion(rep["confusion_matrix"], names, os.path.join(folder, f"confusion_matrix_{split}.png"),
                          f"{split}: accuracy {rep['accuracy']:.4f}, macro F1 {rep['macro_f1']:.4f}")
    logging.info("wrote the %s confusion matrix to %s", split, paths.join(workdir, f"confusion_matrix_{split}.png"))


def _logit(p: float) -> float:
  p = min(max(p, 1e-7), 1 - 1e-7)
  return float(np.log(p / (1 - p)))
