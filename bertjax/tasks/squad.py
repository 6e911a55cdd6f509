"""SQuAD v1.1 / v2.0 span extraction: start/end logits over `[CLS] question [SEP] context-window [SEP]`.

Data: `data.train_file` / `dev_file` (official SQuAD JSON), or `data.data_dir` holding
`train-v<version>.json` / `dev-v<version>.json`, or else the hub dataset `squad` / `squad_v2`.
Long contexts become several windows (`doc_stride`); windows without the answer (and v2.0's unanswerable
questions) point at [CLS]. Eval scores the dev file with the official metrics; after training the best
model's answers go to `<workdir>/predictions/predictions.json` (+ `null_odds.json` for v2.0).
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
from bertjax.data import loader, squad, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import BertForQuestionAnswering
from bertjax.tasks import common, metrics
from bertjax.tasks.base import Task
from bertjax.tasks.common import MODEL_KEYS, cache_dir_of, file_key, valid_rows

_POSITIONS = ("start_positions", "end_positions")
_HOST_KEYS = ("example_index", "offsets", "token_is_max_context")  # post-processing only; never on device


class SquadTask(Task):
  name = "squad"
  head = "question_answering"
  main_metric = "f1"
  predicts = True

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.tok, self.tok_source = None, ""
    self.examples: dict[str, list[squad.SquadExample]] = {}
    self.features: dict[str, dict[str, np.ndarray]] = {}

  @property
  def version_2(self) -> bool:
    return str(self.config.data.get("version", "1.1")) == "2.0"

  # -- data ---------------------------------------------------------------------------------------------
  def _check_config(self) -> None:
    d = self.config.data
    if str(d.get("version", "1.1")) not in ("1.1", "2.0"):
      raise UserError(f"config.data.version={d.version!r}: use '1.1' or '2.0'")
    common.check_seq_length(self.config)
    if d.max_seq_length < d.max_query_length + 4 or d.doc_stride < 1 or d.max_query_length < 1:
      raise UserError(f"data.max_seq_length={d.max_seq_length} must exceed data.max_query_length="
                      f"{d.max_query_length} + 3, and data.doc_stride={d.doc_stride} must be >= 1")
    if d.n_best_size < 1 or d.max_answer_length < 1:
      raise UserError(f"data.n_best_size={d.n_best_size} and data.max_answer_length={d.max_answer_length} "
                      "must be >= 1")

  def _read(self) -> tuple[dict[str, list[squad.SquadExample]], dict[str, str]]:
    d, version = self.config.data, str(self.config.data.get("version", "1.1"))
    if d.get("train_file") or d.get("dev_file"):
      if not (d.get("train_file") and d.get("dev_file")):
        raise UserError("set both config.data.train_file and config.data.dev_file (SQuAD JSON files)")
      files = {"train": d.train_file, "dev": d.dev_file}
    elif d.get("data_dir"):
      files = {s: os.path.join(d.data_dir, f"{s}-v{version}.json") for s in ("train", "dev")}
    else:
      name = "squad_v2" if self.version_2 else "squad"
      try:
        examples = {s: squad.load_hub_split(name, s) for s in ("train", "dev")}
      except UserError:
        raise
      except Exception as e:  # network, offline cache miss
        raise UserError(f"could not load {name!r} from the hub ({type(e).__name__}); set config.data.train_file "
                        "and config.data.dev_file to SQuAD JSON files") from None
      return examples, {s: f"hub:{name}:{s}" for s in examples}
    examples = {s: squad.read_squad(p) for s, p in files.items()}
    for split, exs in examples.items():
      if not exs:
        raise UserError(f"{files[split]}: no questions")
      bad = next((e for e in exs if e.is_impossible), None)
      if bad is not None and not self.version_2:
        raise UserError(f"{files[split]}: question id '{bad.id}' is marked is_impossible, which SQuAD v1.1 "
                        "does not have; set config.data.version=2.0")
    return examples, {s: file_key(p) for s, p in files.items()}

  def prepare(self) -> None:
    c, d = self.config, self.config.data
    self._check_config()
    examples, keys = self._read()
    limits = {"train": int(d.get("max_train_examples", 0) or 0), "dev": int(d.get("max_eval_examples", 0) or 0)}
    self.examples = {s: v[:limits[s]] if limits[s] else v for s, v in examples.items()}
    self.tok, self.tok_source = common.load_tokenizer(c, self.workdir)
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    fp = toklib.fingerprint(self.tok)
    for split, exs in self.examples.items():
      key = (f"squad-v1|{split}|{keys[split]}|{fp}|{d.max_seq_length}|{d.doc_stride}|{d.max_query_length}|"
             f"{len(exs)}")
      train = split == "train"

      def build(exs=exs, train=train):
        f = squad.convert_examples_to_features(exs, self.tok, d.max_seq_length, d.doc_stride, d.max_query_length,
                                               is_training=True)  # dev too: its positions give an eval loss
        return {k: v for k, v in f.items() if not (train and k in _HOST_KEYS)}

      self.features[split] = common.cached_arrays(cache_dir_of(c), "squad", key, build)
      n_feat = len(self.features[split]["input_ids"])
      logging.info("SQuAD v%s %s: %d questions -> %d windows of <= %d tokens (%d answerable)", d.version, split,
                   len(exs), n_feat, d.max_seq_length, sum(not e.is_impossible for e in exs))
    logging.info("tokenizer %s (%d tokens)", self.tok_source, self.tok.get_vocab_size())

  def _model_arrays(self, split: str) -> dict[str, np.ndarray]:
    return {k: self.features[split][k] for k in (*MODEL_KEYS, *_POSITIONS)}

  def train_source(self) -> loader.BatchSource:
    c = self.config
    return loader.BatchSource(self._model_arrays("train"), c.training.global_batch_size, c.seed, jax.process_index(),
                              jax.process_count(), buckets=loader.data_buckets(c.data))

  def eval_batches(self) -> list[loader.Batch]:
    if not hasattr(self, "_eval"):
      c = self.config
      self._eval = loader.eval_batches(self._model_arrays("dev"), c.training.eval_batch_size, None, c.seed,
                                       jax.process_index(), jax.process_count(), loader.data_buckets(c.data))
    return self._eval

  # -- model ----------------------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> BertForQuestionAnswering:
    return BertForQuestionAnswering(self.model_config, rngs)

  @staticmethod
  def _logits_and_losses(model, batch, rngs, deterministic) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Start/end logits (padding masked out) and each row's (start CE + end CE) / 2."""
    start, end = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                       deterministic=deterministic, rngs=rngs)
    pad = batch["attention_mask"] == 0
    start = jnp.where(pad, -1e9, start.astype(jnp.float32))
    end = jnp.where(pad, -1e9, end.astype(jnp.float32))
    losses = (optax.softmax_cross_entropy_with_integer_labels(start, batch["start_positions"])
              + optax.softmax_cross_entropy_with_integer_labels(end, batch["end_positions"])) / 2
    return start, end, losses

  def loss_fn(self, model, batch, rngs, deterministic):
    _, _, losses = self._logits_and_losses(model, batch, rngs, deterministic)
    n = jnp.asarray(losses.shape[0], jnp.float32)
    return jnp.mean(losses), {"loss": (jnp.sum(losses), n)}

  def predict_step(self, model, batch) -> dict[str, jax.Array]:
    start, end, losses = self._logits_and_losses(model, batch, None, True)
    return {"start_logits": start, "end_logits": end, "loss": losses, "example_weights": batch["example_weights"]}

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _answers(self, rows: Mapping[str, np.ndarray]) -> tuple[dict[str, str], dict[str, float]]:
    d = self.config.data
    return squad.postprocess_predictions(self.examples["dev"], self.features["dev"], rows["start_logits"],
                                         rows["end_logits"], d.n_best_size, d.max_answer_length, self.version_2,
                                         float(d.null_score_diff_threshold))

  def compute_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """The official exact / f1 (v2.0: HasAns_* / NoAns_* and best_* thresholds too) and the span loss."""
    rows = valid_rows(outputs, self.config.data.max_seq_length)
    preds, null_odds = self._answers(rows)
    m = metrics.squad_metrics(self.examples["dev"], preds, self.version_2,
                              null_odds if self.version_2 else None,
                              float(self.config.data.null_score_diff_threshold))
    return {**m, "loss": float(np.mean(rows["loss"]))}

  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"squad_version": str(self.config.data.version)}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, float]:
    """`<workdir>/predictions/predictions.json` ({id: answer}) and, for v2.0, `null_odds.json`."""
    preds, null_odds = self._answers(valid_rows(predict(self.eval_batches()), self.config.data.max_seq_length))
    if jax.process_index() == 0:
      with paths.staged(paths.join(workdir, "predictions")) as folder:
        squad.write_predictions(os.path.join(folder, "predictions.json"), preds)
        if self.version_2:
          squad.write_predictions(os.path.join(folder, "null_odds.json"), null_odds)
      logging.info("wrote %d answers to %s", len(preds), paths.join(workdir, "predictions"))
    return {}
