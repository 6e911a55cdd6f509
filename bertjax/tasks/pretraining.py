"""BERT pretraining: masked LM + next-sentence prediction on a document corpus."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict
from tokenizers import Tokenizer

from bertjax.artifacts import factory
from bertjax.data import cache, corpus, loader, pretraining as pt, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import BertForPreTraining
from bertjax.tasks import common, losses
from bertjax.tasks.base import Task


class PretrainingTask(Task):
  name = "pretraining"
  head = "pretraining"
  main_metric = ""  # no best-checkpoint tracking for pretraining

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.cache_dir = config.data.cache_dir or corpus.default_cache_dir()
    self.tok = None

  # -- data ---------------------------------------------------------------------------------------------
  def prepare(self) -> None:
    c, d = self.config, self.config.data
    common.check_seq_length(c)
    if not d.corpus:
      raise UserError("data.corpus is empty; set it to your text: a file, folder or glob of .txt/.json/.jsonl/"
                      ".parquet, a URL or a hub dataset")
    docs = corpus.load_documents(d.corpus, self.cache_dir, d.text_column, d.sample_by)
    if len(docs) < 4:
      raise UserError(f"data.corpus {d.corpus} has {len(docs)} documents; pretraining needs at least 4 "
                      "(two for NSP in each of train and eval)")
    n_eval = max(2, int(round(len(docs) * d.eval_fraction)))
    split = docs.train_test_split(test_size=n_eval, seed=c.seed, shuffle=True)
    self.tok, self.tok_source = self._tokenizer(split["train"])
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    fp = toklib.fingerprint(self.tok)
    pair_cfg = pt.PairConfig(d.max_seq_length, d.short_seq_prob, d.nsp_probability, c.seed)
    cls_id, sep_id = self.tok.token_to_id("[CLS]"), self.tok.token_to_id("[SEP]")
    num_proc = d.num_proc if d.num_proc > 1 else None
    # Every process builds (or finds in its cache) the same full pair set, memory-mapped from disk; the loader
    # reads each process's rows of each global batch from it.
    train_tok = pt.tokenize_documents(split["train"], self.tok, fp, num_proc)
    eval_tok = pt.tokenize_documents(split["test"], self.tok, fp, num_proc)
    self.train_pairs = pt.create_pairs(train_tok, cls_id, sep_id, pair_cfg, self.cache_dir, num_proc)
    self.eval_pairs = pt.create_pairs(eval_tok, cls_id, sep_id, dataclasses.replace(pair_cfg, seed=c.seed + 1),
                                      self.cache_dir, num_proc)
    special = [self.tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]
    self.masker = pt.Masker(pt.MaskConfig(d.mask_prob, d.max_predictions_per_seq, d.mask_token_frac,
                                          d.random_token_frac, d.whole_word_masking),
                            self.tok.get_vocab_size(), special, self.tok.token_to_id("[MASK]"),
                            self.tok.token_to_id("[PAD]"))
    logging.info("corpus %s: %d train / %d eval documents -> %d train / %d eval pairs of <= %d tokens "
                 "(%.1f%% NSP random); tokenizer %s (%d tokens)", d.corpus, len(split["train"]), n_eval,
                 len(self.train_pairs["nsp_labels"]), len(self.eval_pairs["nsp_labels"]), d.max_seq_length,
                 100 * self.train_pairs["nsp_labels"].mean(), self.tok_source, self.tok.get_vocab_size())

  def _tokenizer(self, train_docs) -> tuple[Any, str]:
    tok, source = self._find_or_train_tokenizer(train_docs)
    return one_vocabulary(tok), source

  def _find_or_train_tokenizer(self, train_docs) -> tuple[Any, str]:
    d = self.config.data
    tok, source = toklib.for_run(self.workdir, lambda: tokenizer_source(self.config), d.lowercase)
    if tok is not None:
      return tok, source
    if int(d.vocab_size) <= 0:
      raise UserError("data.vocab_size=0 trains no vocabulary but the run has no tokenizer; start from "
                      "--config.init_from_hf or --config.init_checkpoint, or set data.tokenizer")
    key = hashlib.sha256(f"{train_docs._fingerprint}/{d.vocab_size}/{d.lowercase}".encode()).hexdigest()[:16]
    folder = os.path.join(self.cache_dir, "tokenizers", key)
    cached = os.path.join(folder, "tokenizer.json")
    if os.path.exists(cached):
      try:
        return toklib.load(cached), f"trained on the corpus (cached {cached})"
      except UserError as e:  # truncated / corrupt: train again
        logging.warning("cached tokenizer is unreadable (%s); training it again", e)
    texts = (t for b in train_docs.select_columns(["text"]).iter(batch_size=1000) for t in b["text"])
    tok = toklib.train(texts, d.vocab_size, d.lowercase)
    # Training is not deterministic: processes sharing the cache all use the first finished vocabulary.
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = cache.new_build_folder(folder)
    toklib.save(tok, tmp, d.lowercase)
    cache.publish_folder(tmp, folder, lambda: toklib.readable(cached))
    return toklib.load(cached), f"trained on the corpus ({d.vocab_size} requested)"

  def _rows(self, pairs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The training rows: the pairs, or with `data.packing` several pairs per row (`pt.PackedPairs`: each process
    packs only the rows it reads)."""
    d = self.config.data
    if not d.get("packing", False):
      return pairs
    packed = pt.PackedPairs(pairs, int(d.get("max_segments_per_row", 4)))
    width = pairs["input_ids"].shape[1]
    logging.info("packing: %d pairs -> %d rows of %d tokens (at most %d pairs each); padding %.1f%% -> %.1f%%",
                 len(pairs["lengths"]), len(packed["lengths"]), width, packed["cls_positions"].shape[1],
                 100 * pt.padding_share(pairs["lengths"], width), 100 * pt.padding_share(packed["lengths"], width))
    return packed

  def train_source(self) -> loader.BatchSource:
    c, d = self.config, self.config.data
    full = loader.BatchSource(self._rows(self.train_pairs), c.training.global_batch_size, c.seed,
                              jax.process_index(), jax.process_count(), self.masker, "train")
    short_len, fraction = int(d.get("short_seq_length", 0) or 0), float(d.get("short_seq_fraction", 0.0) or 0.0)
    if not short_len or fraction <= 0:
      return full
    if not 8 <= short_len or fraction >= 1:
      raise UserError(f"data.short_seq_length={short_len} / data.short_seq_fraction={fraction}: use a length of at "
                      f"least 8 (0: no short phase) and a fraction in (0, 1)")
    if short_len >= d.max_seq_length:  # e.g. the default's 32-token phase under --config.data.max_seq_length=32
      logging.info("no short-sequence phase: data.short_seq_length=%d is not below data.max_seq_length=%d",
                   short_len, d.max_seq_length)
      return full
    rows = c.training.global_batch_size * (d.max_seq_length // short_len)  # about the same tokens per step
    m = self.masker  # as many prediction slots per row as the shorter rows need
    masker = pt.Masker(dataclasses.replace(m.cfg, max_predictions=-(-m.cfg.max_predictions * short_len //
                                                                     d.max_seq_length)),
                       len(m.special), np.flatnonzero(m.special).tolist(), m.mask_id, m.pad_id)
    short = loader.BatchSource(self._rows(crop_pairs(self.train_pairs, short_len)), rows, c.seed + 7,
                               jax.process_index(), jax.process_count(), masker, "train")
    until = int(round(fraction * c.training.num_train_steps))
    logging.info("sequence length %d (batches of %d) for steps [0, %d), then %d", short_len, rows, until,
                 d.max_seq_length)
    return PhasedSource(short, full, until)

  def eval_batches(self) -> list[loader.Batch]:
    if not hasattr(self, "_eval"):
      self._eval = loader.eval_batches(self.eval_pairs, self.config.training.eval_batch_size, self.masker,
                                       self.config.seed, jax.process_index(), jax.process_count())
    return self._eval

  def eval_summary(self, metrics: Mapping[str, float]) -> Mapping[str, float]:
    """Baselines on exactly the eval positions the metrics count (see `mlm_baselines`), and NSP's majority share."""
    if not hasattr(self, "_baselines"):  # over the whole eval set, not this process's slice of it
      self._baselines = mlm_baselines(loader.eval_batches(self.eval_pairs, self.config.training.eval_batch_size,
                                                          self.masker, self.config.seed))
    return self._baselines

  # -- model ----------------------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> BertForPreTraining:
    return BertForPreTraining(self.model_config, rngs)

  def loss_fn(self, model, batch, rngs, deterministic):
    return losses.pretraining(model, batch, rngs, deterministic, pt.KINDS,
                              float(self.config.data.get("nsp_loss_weight", 1.0)))

  def loss_weights(self, batch):
    return losses.pretraining_weights(batch)

  # -- outputs --------------------------------------------------------------------------------------------
  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)


def tokenizer_source(config: ConfigDict) -> str | None:
  """Where a new run's tokenizer comes from: `data.tokenizer`, else the one of `init_checkpoint` / `init_from_hf`,
  else None (train one). A run that starts from a checkpoint keeps its vocabulary: a checkpoint without a tokenizer
  needs `data.tokenizer`, and a `data.tokenizer` with other token ids than the checkpoint's is refused (the
  embeddings would be read under the wrong ids)."""
  d = config.data
  start = next((k for k in ("init_checkpoint", "init_from_hf") if config.get(k)), "")
  if not start:
    return d.tokenizer or None
  own = factory.pretrained_tokenizer_dir(config)
  if not (d.tokenizer or own):
    raise UserError(f"{start}={config[start]} comes without a tokenizer, and a run from a checkpoint never trains "
                    "its own; set data.tokenizer to the checkpoint's vocabulary (vocab.txt / tokenizer.json)")
  if d.tokenizer and own and toklib.load(d.tokenizer, d.lowercase).get_vocab() != toklib.load(own).get_vocab():
    raise UserError(f"data.tokenizer={d.tokenizer} has other token ids than the tokenizer of {start}={config[start]}; "
                    "leave data.tokenizer empty to keep the checkpoint's vocabulary")
  return d.tokenizer or own


def mlm_baselines(batches: list[loader.Batch]) -> dict[str, float]:
  """What needs no context, on exactly the chosen positions of `batches` (weight > 0).

  `mlm_baseline_frequent[_mask]`: always the most frequent label of these positions, scored at all of them
  (comparable with `mlm_accuracy`) and at the [MASK] ones (with `mlm_accuracy_mask`).
  `mlm_baseline_copy_kept`: the input token where it was kept, else the most frequent one (all positions).
  `nsp_majority_baseline`: the share of the more frequent NSP label (with `nsp_accuracy`).
  """
  labels, kinds, nsp = [], [], []
  for b in batches:
    w = b["masked_weights"] > 0
    labels.append(b["masked_labels"][w])
    kinds.append(b["masked_kinds"][w])
    nsp.append(b["nsp_labels"][b["nsp_weights"] > 0])
  labels, kinds, nsp = np.concatenate(labels), np.concatenate(kinds), np.concatenate(nsp)
  top = int(np.bincount(labels).argmax()) if len(labels) else 0
  hit = labels == top
  at_mask = kinds == pt.KIND_MASK
  copy = np.where(kinds == pt.KIND_KEPT, True, hit)

  def share(x):
    return float(x.mean()) if len(x) else 0.0

  return {"mlm_baseline_frequent": share(hit), "mlm_baseline_frequent_mask": share(hit[at_mask]),
          "mlm_baseline_copy_kept": share(copy), "mlm_majority_token_id": top,
          "nsp_majority_baseline": max(share(nsp == 0), share(nsp == 1))}


class PhasedSource:
  """Batches of `short` (cropped pairs) for steps < `until`, then `full`; like a BatchSource, a pure function of
  the step, so a resumed run sees the same batches. The trainer's jitted step compiles once per shape."""

  def __init__(self, short: loader.BatchSource, full: loader.BatchSource, until: int):
    self.short, self.full, self.until = short, full, until
    self.steps_per_epoch = full.steps_per_epoch

  def batch(self, step: int) -> loader.Batch:
    return self.short.batch(step) if step < self.until else self.full.batch(step - self.until)


def crop_pairs(pairs: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """[CLS] A [SEP] B [SEP] rows cut to `length`: the end of A and the start of B, about half each (more of one
  side when the other is short), so the A|B boundary, and with it the NSP label, stays meaningful."""
  ids, types = pairs["input_ids"], pairs["token_type_ids"]
  n, L = ids.shape
  la = ((types == 0) & (ids != 0)).sum(1) - 2  # A tokens (without [CLS] and the first [SEP])
  lb = (types == 1).sum(1) - 1  # B tokens (without the last [SEP])
  room = length - 3
  ka = np.minimum(la, np.maximum(room // 2, room - lb))
  kb = np.minimum(lb, room - ka)
  j = np.arange(length)[None, :]
  ka_, kb_, la_, lb_ = ka[:, None], kb[:, None], la[:, None], lb[:, None]
  src = np.select([j == 0, j <= ka_, j == ka_ + 1, j <= ka_ + kb_ + 1, j == ka_ + kb_ + 2],
                  [0, la_ - ka_ + j, la_ + 1, la_ + 2 + (j - ka_ - 2), la_ + lb_ + 2], default=-1)
  valid = src >= 0
  src = np.clip(src, 0, L - 1)
  out = {k: v for k, v in pairs.items() if k not in ("input_ids", "token_type_ids", "word_starts", "lengths")}
  out["input_ids"] = np.where(valid, np.take_along_axis(ids, src, 1), 0).astype(ids.dtype)
  out["token_type_ids"] = ((j >= ka_ + 2) & valid).astype(types.dtype)
  starts = np.take_along_axis(pairs["word_starts"], src, 1) & valid
  starts[:, 1] = True  # a cut front still starts a (partial) word
  starts[np.arange(n), ka + 2] = True
  out["word_starts"] = starts
  out["lengths"] = (ka + kb + 3).astype(np.int32)
  return out


def one_vocabulary(tok: Tokenizer) -> Tokenizer:
  """Process 0's tokenizer on every process. WordPiece training is not deterministic (a few of 4,096 ids differ
  between two trainings on the same text), so hosts that each train or cache their own would silently train on
  different token ids."""
  if jax.process_count() == 1:
    return tok
  data = np.frombuffer(tok.to_str().encode(), np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros(n, np.uint8)
  if jax.process_index() == 0:
    buf[:] = data
  return Tokenizer.from_str(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())
