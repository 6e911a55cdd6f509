"""GLUE fine-tuning: sequence (pair) classification, or regression for STS-B, on `BertForSequenceClassification`.

Data comes from a GLUE-layout folder (`config.data.data_dir`, see `bertjax.data.glue`) or, when that is
empty, the `nyu-mll/glue` hub dataset. Tokenized splits are cached (`common.cached_arrays`) keyed by the source file
(path, mtime, size), the tokenizer fingerprint and `max_seq_length`, so reruns skip tokenization. After
training, the best parameters predict every test split present and write GLUE submission files into
`<workdir>/predictions/`.
"""

from __future__ import annotations

import json
import logging
import math
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
from bertjax.data import corpus, glue, loader, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import BertForSequenceClassification
from bertjax.tasks import common, metrics
from bertjax.tasks.base import Task

MODEL_ARRAYS = (*glue.MODEL_KEYS, "labels")  # what the jitted steps receive
_CACHE_VERSION = 1


class _SplitMissing(Exception):
  """An optional split is unavailable (raised inside the cache builder, so nothing is cached)."""


class GlueTask(Task):
  name = "glue"
  head = "sequence_classification"
  main_metric = "accuracy"  # replaced by the GLUE task's selection metric in __init__
  predicts = True

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    d = config.data
    self.spec = glue.get_task(d.task)
    self.main_metric = self.spec.metric
    self.regression = self.spec.is_regression
    self.num_labels = 1 if self.regression else len(self.spec.labels)
    self.cache_dir = d.get("cache_dir") or corpus.default_cache_dir()
    self.splits: dict[str, dict[str, np.ndarray]] = {}  # split -> features (+ "index")

  # -- data ---------------------------------------------------------------------------------------------
  def prepare(self) -> None:
    c, d = self.config, self.config.data
    common.check_seq_length(c)
    self._check_resume()
    tok, self.tok_source = self._tokenizer()
    self.tok = glue.as_tokenizer(tok)
    glue.special_ids(self.tok)  # [CLS]/[SEP]/[PAD] present
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    fp = toklib.fingerprint(self.tok)
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
    filled = ", ".join(f"{s} {100 * float(np.mean(f['attention_mask'][:, -1])):.1f}%"
                       for s, f in self.splits.items())
    logging.info("GLUE %s: %s examples; tokenizer %s (%d tokens); main metric %s; examples filling all %d "
                 "tokens (maybe truncated): %s", self.spec.name,
                 ", ".join(f"{s} {len(f['labels'])}" for s, f in self.splits.items()), self.tok_source,
                 self.tok.get_vocab_size(), self.main_metric, d.max_seq_length, filled)
    if not self.regression:
      dev = self.splits[self.dev_splits[0]]["labels"]
      logging.info("dev majority-class accuracy %.4f (a baseline to beat)",
                   np.bincount(dev, minlength=self.num_labels).max() / len(dev))

  def _check_resume(self) -> None:
    """Refuse a workdir whose checkpoint holds another GLUE task's classifier (before writing anything)."""
    meta = checkpoint.latest_meta(self.workdir)
    old = (meta.get("glue_task"), meta.get("num_labels"))
    if meta.get("task") == self.name and old != (self.spec.name, self.num_labels):
      raise UserError(f"workdir {self.workdir} holds a checkpoint of GLUE task {old[0]} ({old[1]} labels), not "
                      f"{self.spec.name} ({self.num_labels}); use a new --workdir")

  def _tokenizer(self) -> tuple[Any, str]:
    return common.load_tokenizer(self.config, self.workdir)

  def _where(self, split: str) -> str:
    d = self.config.data
    return str(glue.split_path(d.data_dir, d.task, split)) if d.data_dir else f"hub nyu-mll/glue/{d.task}"

  def _load_split(self, split: str, required: bool, fp: str, limit: int) -> dict[str, np.ndarray] | None:
    """Features of one split (first `limit` examples; 0 = all), from the cache or tokenized now."""
    d = self.config.data
    if d.data_dir:
      path = glue.split_path(d.data_dir, d.task, split)
      if not path.is_file():
        if not required:
          return None
        glue.read_split(d.data_dir, d.task, split)  # raises the reader's "file not found" error
      st = path.stat()
      source = [str(path.resolve()), st.st_mtime_ns, st.st_size]
    else:
      source = ["hub", "nyu-mll/glue", d.task, split]
    key = json.dumps([_CACHE_VERSION, source, fp, d.max_seq_length, d.task, split, limit])

    def build() -> dict[str, np.ndarray]:
      examples = self._read(split, required)
      if examples is None:
        raise _SplitMissing
      if limit:
        examples = examples[:limit]
      feats = glue.convert_examples(examples, self.tok, d.max_seq_length, self.spec.labels)
      feats["index"] = np.array([e.index for e in examples], np.int64)
      return feats

    try:
      return common.cached_arrays(self.cache_dir, "glue", key, build)
    except _SplitMissing:  # an optional hub split that could not be loaded: nothing cached
      return None

  def _read(self, split: str, required: bool) -> list[glue.Example] | None:
    d = self.config.data
    if d.data_dir:
      return glue.read_split(d.data_dir, d.task, split)
    try:
      return glue.load_hub_split(d.task, split)
    except UserError:
      raise
    except Exception as e:  # network, offline cache miss, missing split
      if not required:
        logging.warning("GLUE %s %s split not loaded from the hub (%s); skipping it", d.task, split, e)
        return None
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f"could not load GLUE {d.task} {split} from the hub nyu-mll/glue ({msg}); set "
                      "config.data.data_dir to a local GLUE-layout folder") from None

  def _arrays(self, split: str) -> dict[str, np.ndarray]:
    return {k: self.splits[split][k] for k in MODEL_ARRAYS}

  def train_source(self) -> loader.BatchSource:
    return loader.BatchSource(self._arrays("train"), self.config.training.global_batch_size, self.config.seed,
                              jax.process_index(), jax.process_count(), name="train",
                              buckets=loader.data_buckets(self.config.data),
                              pack_rows=self._pack_rows(self.config.training.global_batch_size))

  def _batches(self, split: str) -> list[loader.Batch]:
    return loader.eval_batches(self._arrays(split), self.config.training.eval_batch_size, None, self.config.seed,
                               jax.process_index(), jax.process_count(), loader.data_buckets(self.config.data),
                               self._pack_rows(self.config.training.eval_batch_size))

  def _pack_rows(self, global_batch: int) -> int:
    """`data.packing`: several examples per row (loader.Packer), rows in multiples of this; 0 = off."""
    if not self.config.data.get("packing", False):
      return 0
    if int(self.config.training.get("grad_accum_steps", 1)) > 1:
      raise UserError("data.packing=True does not combine with training.grad_accum_steps > 1; turn one off")
    return math.lcm(jax.local_device_count(), max(1, global_batch // jax.process_count() // 8))

  def eval_batches(self) -> list[loader.Batch]:
    """The main dev split's batches, then those of the other dev splits (MNLI mismatched)."""
    if not hasattr(self, "_eval"):
      per_split = [self._batches(s) for s in self.dev_splits]
      self._eval_counts = [len(b) for b in per_split]
      self._eval = [b for bs in per_split for b in bs]
    return self._eval

  # -- model ----------------------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> BertForSequenceClassification:
    return BertForSequenceClassification(self.model_config, self.num_labels, rngs)

  def loss_fn(self, model, batch, rngs, deterministic):
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                   deterministic=deterministic, rngs=rngs, **loader.packed_inputs(batch))
    labels = batch["labels"]
    w = batch.get("example_weights")
    w = jnp.ones(labels.shape, jnp.float32) if w is None else w.astype(jnp.float32)
    n = jnp.sum(w)
    if self.regression:
      per_example = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
      out = {}
    else:
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      out = {"accuracy": (jnp.sum((jnp.argmax(logits, -1) == labels) * w), n)}
    total = jnp.sum(per_example * w)
    return total / jnp.maximum(n, 1.0), {"loss": (total, n), **out}

  def predict_step(self, model, batch) -> dict[str, jax.Array]:
    logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], deterministic=True,
                   **loader.packed_inputs(batch))
    return {"logits": logits, "labels": batch["labels"], "example_weights": batch["example_weights"]}

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _predictions(self, outputs: list[Mapping[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of the real rows: class ids, or scores for STS-B."""
    keep = np.concatenate([np.asarray(o["example_weights"]) for o in outputs]) > 0
    logits = np.concatenate([np.asarray(o["logits"]) for o in outputs])[keep]
    labels = np.concatenate([np.asarray(o["labels"]) for o in outputs])[keep]
    return (logits[:, 0] if self.regression else logits.argmax(-1)), labels

  def compute_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    self.eval_batches()
    out, start = {}, 0
    for split, count in zip(self.dev_splits, self._eval_counts):
      preds, labels = self._predictions(outputs[start:start + count])
      start += count
      prefix = "" if split == self.dev_splits[0] else split.replace("dev_", "") + "_"
      out.update({prefix + k: v for k, v in metrics.glue_metrics(self.spec.name, preds, labels).items()})
    return out

  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"num_labels": self.num_labels, "glue_task": self.spec.name,
            "label_names": ["score"] if self.regression else list(self.spec.labels)}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, float]:
    """GLUE submission files (`<workdir>/predictions/SST-2.tsv`, ...) for each test split present."""
    out = {}
    for split in self.test_splits:
      preds, _ = self._predictions(predict(self._batches(split)))
      if jax.process_index() == 0:
        with paths.staged(paths.join(workdir, "predictions")) as folder:
          path = glue.write_submission(folder, self.spec.name, self.splits[split]["index"], preds, split)
        logging.info("wrote %d %s predictions to %s", len(preds), split,
                     paths.join(workdir, "predictions", os.path.basename(path)))
      out[f"{split}_predictions"] = float(len(preds))
    return out
