"""GLUE fine-tuning: the classification task (`bertjax.tasks.classify`) with GLUE's readers, label sets and metrics.

Sequence (pair) classification, or regression for STS-B, on `BertForSequenceClassification`. Data comes from a
GLUE-layout folder (`config.data.data_dir`, see `bertjax.data.glue`) or, when that is empty, the `nyu-mll/glue`
hub dataset. Tokenized splits are cached (`common.cached_arrays`) keyed by the source file (path, mtime, size),
the tokenizer fingerprint and `max_seq_length`, so reruns skip reading and tokenization. The dev metrics are the
task's GLUE metrics (`metrics.glue_metrics`; MNLI's mismatched dev split is reported with a `mismatched_` prefix).
After training, the best parameters predict every test split present and write GLUE submission files into
`<workdir>/predictions/`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.artifacts import checkpoint
from bertjax.data import glue
from bertjax.errors import UserError
from bertjax.tasks import common, metrics
from bertjax.tasks.classify import ClassificationTask

_CACHE_VERSION = 1


class _SplitMissing(Exception):
  """An optional split is unavailable (raised inside the cache builder, so nothing is cached)."""


class GlueTask(ClassificationTask):
  name = "glue"
  main_metric = "accuracy"  # replaced by the GLUE task's selection metric in _configure

  def _configure(self, d: ConfigDict) -> None:
    self.spec = glue.get_task(d.task)
    self.main_metric = self.spec.metric
    self.kind = "regression" if self.spec.is_regression else "single"
    self.label_names = ["score"] if self.spec.is_regression else list(self.spec.labels)
    self.splits: dict[str, dict[str, np.ndarray]] = {}  # split -> features (+ "labels", "index")

  # -- data ---------------------------------------------------------------------------------------------
  def _read(self) -> None:
    """Refuse a workdir whose checkpoint holds another GLUE task's classifier (before writing anything)."""
    meta = checkpoint.latest_meta(self.workdir)
    old = (meta.get("glue_task"), meta.get("num_labels"))
    if meta.get("task") == self.name and old != (self.spec.name, self.num_labels):
      raise UserError(f"workdir {self.workdir} holds a checkpoint of GLUE task {old[0]} ({old[1]} labels), not "
                      f"{self.spec.name} ({self.num_labels}); use a new --workdir")

  def _featurize(self, fp: str) -> None:
    d = self.config.data
    n_train, n_eval = int(d.get("max_train_examples", 0) or 0), int(d.get("max_eval_examples", 0) or 0)
    wanted = [("train", True, n_train)] + [(s, i == 0, n_eval) for i, s in enumerate(self.spec.dev_splits)]
    wanted += [(s, False, n_eval) for s in self.spec.test_splits]
    for split, required, limit in wanted:
      feats = self._load_split(split, required, fp, limit)
      if feats is not None:
        self.splits[split] = feats
    self.dev_splits = [s for s in self.spec.dev_splits if s in self.splits]
    self.test_splits = [s for s in self.spec.test_splits if s in self.splits]
    for s in ["train", self.dev_splits[0]]:
      if not len(self.splits[s]["labels"]):
        raise UserError(f"GLUE {self.spec.name} {s} split has no examples ({self._where(s)})")
    self.features = self.splits
    self.targets = {s: self.splits[s]["labels"] for s in ["train", *self.dev_splits]}

  def _log_data(self) -> None:
    filled = ", ".join(f"{s} {100 * float(np.mean(f['attention_mask'][:, -1])):.1f}%"
                       for s, f in self.splits.items())
    logging.info("GLUE %s: %s examples; tokenizer %s (%d tokens); main metric %s; examples filling all %d "
                 "tokens (maybe truncated): %s", self.spec.name,
                 ", ".join(f"{s} {len(f['labels'])}" for s, f in self.splits.items()), self.tok_source,
                 self.tok.get_vocab_size(), self.main_metric, self.config.data.max_seq_length, filled)
    if self.kind == "single":
      dev = self.targets[self.dev_splits[0]]
      logging.info("dev majority-class accuracy %.4f (a baseline to beat)",
                   np.bincount(dev, minlength=self.num_labels).max() / len(dev))

  def _where(self, split: str) -> str:
    d = self.config.data
    return str(glue.split_path(d.data_dir, d.task, split)) if d.data_dir else f"hub nyu-mll/glue/{d.task}"

  def _load_split(self, split: str, required: bool, fp: str, limit: int) -> dict[str, np.ndarray] | None:
    """Features of one split (first `limit` examples; 0 = all), from the cache or read and tokenized now."""
    d = self.config.data
    source = glue.split_source(d.data_dir, d.task, split, required)
    if source is None:
      return None
    key = json.dumps([_CACHE_VERSION, source, fp, d.max_seq_length, d.task, split, limit])

    def build() -> dict[str, np.ndarray]:
      examples = glue.read_examples(d.data_dir, d.task, split, required)
      if examples is None:
        raise _SplitMissing
      if limit:
        examples = examples[:limit]
      feats = glue.convert_examples(examples, self.tok, d.max_seq_length, self.spec.labels)
      feats["index"] = np.array([e.index for e in examples], np.int64)
      return feats

    try:
      return common.cached_arrays(common.cache_dir_of(self.config), "glue", key, build)
    except _SplitMissing:  # an optional hub split that could not be loaded: nothing cached
      return None

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _predictions(self, logits: np.ndarray) -> np.ndarray:
    """Class ids, or scores for STS-B."""
    return logits[:, 0] if self.kind == "regression" else logits.argmax(-1)

  def dev_metrics(self, split: str, logits: np.ndarray) -> dict[str, float]:
    return metrics.glue_metrics(self.spec.name, self._predictions(logits), self.targets[split])

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"num_labels": self.num_labels, "glue_task": self.spec.name, "label_names": list(self.label_names)}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, float]:
    """GLUE submission files (`<workdir>/predictions/SST-2.tsv`, ...) for each test split present."""
    out = {}
    for split in self.test_splits:
      preds = self._predictions(common.valid_rows(predict(self._batches(split)))["logits"])
      if jax.process_index() == 0:
        with paths.staged(paths.join(workdir, "predictions")) as folder:
          path = glue.write_submission(folder, self.spec.name, self.splits[split]["index"], preds, split)
        logging.info("wrote %d %s predictions to %s", len(preds), split,
                     paths.join(workdir, "predictions", os.path.basename(path)))
      out[f"{split}_predictions"] = float(len(preds))
    return out
