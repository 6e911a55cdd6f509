"""Named-entity recognition (CoNLL-2003 style) as token classification on each word's first sub-token.

Data: `data.train_file` / `dev_file` / `test_file`, or `data.data_dir` holding train.txt, dev.txt and an
optional test.txt, or else the hub dataset `data.hub_dataset`. The label list comes from the training file
(kept in the checkpoint meta). After training the best model's tags are written as `token gold pred` lines
to `<workdir>/predictions/{dev,test}.txt` (conlleval's input).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.artifacts import checkpoint
from bertjax.data import loader, ner, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import BertForTokenClassification
from bertjax.tasks import common, metrics
from bertjax.tasks.base import Task
from bertjax.tasks.common import MODEL_KEYS, cache_dir_of, file_key, valid_rows

# -- the task ----------------------------------------------------------------------------------------------


class NerTask(Task):
  name = "ner"
  head = "token_classification"
  main_metric = "f1"
  predicts = True

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.tok, self.tok_source = None, ""
    self.sentences: dict[str, list[ner.NerSentence]] = {}
    self.features: dict[str, dict[str, np.ndarray]] = {}

  # -- data ---------------------------------------------------------------------------------------------
  def _files(self) -> dict[str, str] | None:
    """{split: path} of the local CoNLL files, or None for the hub dataset."""
    d = self.config.data
    if d.get("train_file") or d.get("dev_file"):
      if not (d.get("train_file") and d.get("dev_file")):
        raise UserError("set both config.data.train_file and config.data.dev_file (CoNLL files)")
      files = {"train": d.train_file, "dev": d.dev_file}
      if d.get("test_file"):
        files["test"] = d.test_file
      return files
    if d.get("data_dir"):
      files = {s: os.path.join(d.data_dir, f"{s}.txt") for s in ("train", "dev", "test")}
      if not os.path.isfile(files["test"]):
        del files["test"]
      return files
    return None

  def _read(self) -> tuple[dict[str, list[ner.NerSentence]], list[str], dict[str, str]]:
    files = self._files()
    if files is None:
      name = self.config.data.get("hub_dataset") or "eriktks/conll2003"
      sents = {s: _hub_sentences(name, s) for s in ("train", "dev", "test")}
      return sents, ner.label_list_from(sents["train"]), {s: f"hub:{name}:{s}" for s in sents}
    train = ner.read_conll(files["train"])
    if not train:
      raise UserError(f"{files['train']}: no sentences; expected 'token TAG' lines")
    labels = ner.label_list_from(train)
    sents = {"train": train}
    for split in ("dev", "test"):
      if split in files:
        sents[split] = ner.read_conll(files[split], labels)
    if not sents["dev"]:
      raise UserError(f"{files['dev']}: no sentences; expected 'token TAG' lines")
    return sents, labels, {s: file_key(p) for s, p in files.items()}

  def _resume_labels(self, labels: list[str]) -> list[str]:
    """A resumed run keeps the checkpoint's label order; a training file with other tags is refused."""
    old = checkpoint.latest_meta(self.workdir).get("label_names")
    if not old:
      return labels
    if not set(labels) <= set(old):
      raise UserError(f"workdir {self.workdir} holds a checkpoint with labels {old}, but the training file "
                      f"has tags {sorted(set(labels) - set(old))} it lacks; use a new --workdir")
    return list(old)

  def prepare(self) -> None:
    c, d = self.config, self.config.data
    common.check_seq_length(c)
    sents, labels, keys = self._read()
    self.label_names = self._resume_labels(labels)
    limits = {"train": int(d.get("max_train_examples", 0) or 0), "dev": int(d.get("max_eval_examples", 0) or 0)}
    self.sentences = {s: v[:limits[s]] if limits.get(s) else v for s, v in sents.items()}
    self.tok, self.tok_source = common.load_tokenizer(c, self.workdir)
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    fp = toklib.fingerprint(self.tok)
    to_id = {t: i for i, t in enumerate(self.label_names)}
    for split, sentences in self.sentences.items():
      key = f"ner-v1|{keys[split]}|{fp}|{d.max_seq_length}|{self.label_names}|{len(sentences)}"
      self.features[split] = common.cached_arrays(cache_dir_of(c), "ner", key, lambda s=sentences: ner.convert_examples(
          s, self.tok, d.max_seq_length, to_id))
      n_words = sum(len(s.tokens) for s in sentences)
      cut = n_words - int((self.features[split]["word_index"] >= 0).sum())
      logging.info("NER %s: %d sentences, %d words (%d past max_seq_length=%d, predicted 'O')", split,
                   len(sentences), n_words, cut, d.max_seq_length)
    logging.info("NER labels %s; tokenizer %s (%d tokens)", self.label_names, self.tok_source,
                 self.tok.get_vocab_size())

  def _model_arrays(self, split: str) -> dict[str, np.ndarray]:
    return {k: self.features[split][k] for k in (*MODEL_KEYS, "labels")}

  def _packer(self, arrays: Mapping[str, np.ndarray], global_batch: int) -> loader.Packer | None:
    """Packed rows carry the per-token labels with the tokens (the ignored label where no example sits)."""
    return common.packer(self.config, arrays, global_batch, (*MODEL_KEYS, "labels"), {"labels": ner.IGNORE_INDEX})

  def train_source(self) -> loader.BatchSource:
    c = self.config
    arrays = self._model_arrays("train")
    return loader.BatchSource(arrays, c.training.global_batch_size, c.seed, jax.process_index(),
                              jax.process_count(), buckets=loader.data_buckets(c.data),
                              packer=self._packer(arrays, c.training.global_batch_size))

  def _batches(self, split: str) -> list[loader.Batch]:
    c = self.config
    arrays = self._model_arrays(split)
    return loader.eval_batches(arrays, c.training.eval_batch_size, None, c.seed, jax.process_index(),
                               jax.process_count(), loader.data_buckets(c.data),
                               packer=self._packer(arrays, c.training.eval_batch_size))

  def eval_batches(self) -> list[loader.Batch]:
    if not hasattr(self, "_eval"):
      self._eval = self._batches("dev")
    return self._eval

  # -- model ----------------------------------------------------------------------------------------------
  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  def build_model(self, rngs: nnx.Rngs) -> BertForTokenClassification:
    return BertForTokenClassification(self.model_config, self.num_labels, rngs)

  @staticmethod
  def _token_losses(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy, correctness and weight (0 where the label is ignored)."""
    w = (labels != ner.IGNORE_INDEX).astype(jnp.float32)
    safe = jnp.where(labels != ner.IGNORE_INDEX, labels, 0)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe) * w
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * w
    return xent, correct, w

  @staticmethod
  def _logits(model, batch, deterministic: bool = True, rngs=None) -> jax.Array:
    packed = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], deterministic=deterministic,
                 rngs=rngs, **packed)

  def loss_fn(self, model, batch, rngs, deterministic):
    logits = self._logits(model, batch, deterministic, rngs)  # packed rows: the same tokens, the same labels
    xent, correct, w = self._token_losses(logits, batch["labels"])
    n = jnp.sum(w)
    loss = jnp.sum(xent) / jnp.maximum(n, 1.0)
    return loss, {"loss": (jnp.sum(xent), n), "accuracy": (jnp.sum(correct), n)}

  def predict_step(self, model, batch) -> dict[str, jax.Array]:
    logits, labels = self._logits(model, batch), batch["labels"]
    if "cls_positions" in batch:  # packed: back to one row per example, as unpacked batches give them
      logits, labels = unpack_tokens(logits, labels, batch["position_ids"], batch["cls_positions"])
    xent, correct, w = self._token_losses(logits, labels)
    return {"predictions": jnp.argmax(logits, -1).astype(jnp.int32), "example_weights": batch["example_weights"],
            "loss_sum": xent.sum(-1), "correct": correct.sum(-1), "count": w.sum(-1)}

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _tags(self, split: str, rows: Mapping[str, np.ndarray]) -> list[list[str]]:
    return ner.align_predictions(rows["predictions"], self.features[split]["word_index"], self.sentences[split],
                                 self.label_names)

  def _score(self, split: str, rows: Mapping[str, np.ndarray]) -> dict[str, float]:
    m = metrics.ner_f1([s.tags for s in self.sentences[split]], self._tags(split, rows))
    n = max(float(rows["count"].sum()), 1.0)
    return {"precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
            "loss": float(rows["loss_sum"].sum()) / n, "accuracy": float(rows["correct"].sum()) / n}

  def compute_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 on the dev file (plus token loss and accuracy)."""
    return self._score("dev", valid_rows(outputs, self.config.data.max_seq_length))

  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"num_labels": self.num_labels, "label_names": list(self.label_names)}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, float]:
    """Writes `<workdir>/predictions/{dev,test}.txt` with the best params; returns the test scores."""
    out: dict[str, float] = {}
    for split in ("dev", "test"):
      if split not in self.sentences:
        continue
      rows = valid_rows(predict(self.eval_batches() if split == "dev" else self._batches(split)),
                        self.config.data.max_seq_length)
      if split == "test":
        out.update({f"test_{k}": v for k, v in self._score(split, rows).items()})
      if jax.process_index() == 0:
        with paths.staged(paths.join(workdir, "predictions")) as folder:
          ner.write_conll(os.path.join(folder, f"{split}.txt"), self.sentences[split], self._tags(split, rows))
        logging.info("wrote %s predictions to %s", split, paths.join(workdir, "predictions", f"{split}.txt"))
    return out


def unpack_tokens(logits: jax.Array, labels: jax.Array, position_ids: jax.Array, starts: jax.Array):
  """Per-token logits [R, L, C] and labels [R, L] of packed rows -> [B, L, C] and [B, L], one row per example:
  example i's tokens start at flat index `starts[i]` (row * L + column over all rows) and are the next columns
  whose position ids count 0, 1, 2, ...; the columns past its end get the ignored label."""
  R, L = labels.shape
  idx = jnp.minimum(starts[:, None] + jnp.arange(L)[None, :], R * L - 1)
  own = position_ids.reshape(-1)[idx] == jnp.arange(L)[None, :]
  own = jnp.cumprod(own, axis=1).astype(bool)  # stop at the first column that is not the example's
  out_logits = logits.reshape(R * L, -1)[idx]
  out_labels = jnp.where(own, labels.reshape(-1)[idx], ner.IGNORE_INDEX)
  return out_logits, out_labels


def _hub_sentences(name: str, split: str) -> list[ner.NerSentence]:
  """A CoNLL-2003-layout hub dataset (tokens, ner_tags as ClassLabel) -> sentences (needs network/cache)."""
  try:
    ds = datasets.load_dataset(name, split="validation" if split == "dev" else split)
  except Exception as e:  # network, unknown dataset, offline cache miss
    raise UserError(f"could not load the NER dataset {name!r} {split} from the hub ({type(e).__name__}); set "
                    "config.data.data_dir to a folder with CoNLL train.txt / dev.txt") from None
  names = ds.features["ner_tags"].feature.names
  return [ner.NerSentence(list(r["tokens"]), [names[t] for t in r["ner_tags"]], f"{name}:{split}:{i}")
          for i, r in enumerate(ds) if r["tokens"]]
