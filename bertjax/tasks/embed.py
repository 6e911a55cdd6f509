"""Sentence embeddings (`config.task="embedding"`, configs/embed.py): a bi-encoder trained as sentence-transformers
trains one, on `BertForSentenceEmbedding` (mean or [CLS] pooling, optional L2 normalisation).

Losses (`embedding.loss`): "cosine" on scored pairs, the squared error between cos(u, v) and the score divided by
`data.max_score` (sentence-transformers' CosineSimilarityLoss, STS-B style); "ranking" on (query, positive[,
negative]) tuples, cross-entropy of `embedding.scale` * cos(query, every positive and negative of the global
batch) with the query's own positive as the answer (in-batch negatives: MultipleNegativesRankingLoss); "auto"
picks cosine when the data has scores. Texts are packed, several a row (`data.packing`, on by default); the
negatives of the ranking loss are those of the whole global batch, on every process count.

Evaluation: scored dev pairs report the Pearson and Spearman correlation of cos(u, v) with the scores
(`spearman` is the main metric, as sentence-transformers' spearman_cosine); dev tuples without scores form a
retrieval set (queries, corpus, relevant texts; see bertjax.data.embed) and report recall@1/5/10 and MRR@10
(`mrr@10` main) over exact cosine search. After training, `<workdir>/predictions/dev.jsonl` holds each scored dev
pair's cosine, or each query's top 10.

The pooling and normalisation come from the starting model when it says (a sentence-transformers folder, an
embedding checkpoint), else mean pooling without normalisation; the checkpoint meta records them, and
`python -m bertjax.convert to_hf --format=sentence-transformers` exports a folder sentence-transformers loads.
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
from bertjax.artifacts import checkpoint, hf_io, st_format
from bertjax.data import embed as data, glue, loader, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import POOLING, BertForSentenceEmbedding
from bertjax.tasks import common, metrics
from bertjax.tasks.base import Task
from bertjax.tasks.common import cache_dir_of, valid_rows

LOSSES = ("auto", "cosine", "ranking")
RETRIEVAL_KS = (1, 5, 10)


def source_pooling(config: ConfigDict) -> dict[str, Any]:
  """What the starting model says about pooling: an embedding checkpoint's meta, or a sentence-transformers
  folder's modules ({} when it says nothing)."""
  if config.get("init_checkpoint"):
    meta = checkpoint.read_meta(checkpoint.resolve_step_dir(config.init_checkpoint))
    return {k: meta[k] for k in ("pooling", "normalize") if k in meta}
  if config.get("init_from_hf"):
    st = st_format.read_pooling(hf_io.resolve_source(config.init_from_hf))
    return {} if st is None else {"pooling": st["pooling"], "normalize": st["normalize"]}
  return {}


class EmbeddingTask(Task):
  name = "embedding"
  head = "sentence_embedding"
  main_metric = "spearman"
  predicts = True

  def __init__(self, config: ConfigDict, workdir: str):
    super().__init__(config, workdir)
    e = config.get("embedding") or ConfigDict()
    self.loss_name = e.get("loss", "auto") or "auto"
    if self.loss_name not in LOSSES:
      raise UserError(f"embedding.loss={self.loss_name!r} is unknown; choose one of {list(LOSSES)}")
    self.pooling_setting = e.get("pooling", "") or ""
    if self.pooling_setting not in ("", *POOLING):
      raise UserError(f"embedding.pooling={self.pooling_setting!r} is unknown; use mean, cls or '' (the starting "
                      "model's)")
    self.normalize_setting = e.get("normalize")
    self.scale = float(e.get("scale", 20.0))
    if int(config.training.get("grad_accum_steps", 1)) > 1:
      raise UserError("training.grad_accum_steps > 1 is not supported by the embedding task (the ranking loss's "
                      "negatives are the whole batch); lower training.global_batch_size or set model.remat=full")
    self.splits: dict[str, data.Split] = {}

  # -- data ---------------------------------------------------------------------------------------------
  def prepare(self) -> None:
    c = self.config
    common.check_seq_length(c)
    self._read()
    tok, self.tok_source = common.load_tokenizer(c, self.workdir)
    self.tok = glue.as_tokenizer(tok)
    glue.special_ids(self.tok)
    self.model_config = common.model_config(c, vocab_size=self.tok.get_vocab_size(), tokenizer=self.tok)
    said = source_pooling(c)
    self.pooling = self.pooling_setting or said.get("pooling", "mean")
    self.normalize = bool(self.normalize_setting if self.normalize_setting is not None
                          else said.get("normalize", False))
    fp = toklib.fingerprint(self.tok)
    L = c.data.max_seq_length
    self.tokens = {s: common.cached_arrays(cache_dir_of(c), "embed", f"embed-v1|{sp.key()}|{fp}|{L}",
                                           lambda sp=sp: data.encode(self.tok, sp.texts, L))
                   for s, sp in self.splits.items()}
    self._log_data()

  def _read(self) -> None:
    d, cache = self.config.data, cache_dir_of(self.config)
    if d.get("glue_task"):
      read = lambda split, req: data.read_glue(d.get("data_dir", ""), d.glue_task, split, req)  # noqa: E731
      self.splits = {"train": read("train", True)}
      dev = read("dev", False)
    else:
      fields = data.Fields(d.get("text_field", "sentence1"), d.get("text_pair_field", "sentence2"),
                           d.get("negative_field", "") or "", d.get("label_field", "") or "")
      if d.get("dataset"):
        self.splits = {"train": data.read_hub(d.dataset, d.get("train_split", "train"), fields, cache, True)}
        dev = data.read_hub(d.dataset, d.get("validation_split", "validation"), fields, cache, False)
      elif not d.get("train_file"):
        raise UserError("no training data: set data.glue_task (+ data.data_dir), data.train_file or data.dataset")
      else:
        self.splits = {"train": data.read_file(d.train_file, fields, cache, False)}
        dev = data.read_file(d.validation_file, fields, cache, True) if d.get("validation_file") else None
    if self.splits["train"] is None or not len(self.splits["train"]):
      raise UserError("the training data has no usable rows (a paraphrase task keeps its positive pairs only)")
    if dev is not None:
      self.splits["dev"] = dev
    train = self.splits["train"]
    self.kind = "cosine" if train.scores is not None else "ranking"
    if self.loss_name == "cosine" and train.scores is None:
      raise UserError("embedding.loss=cosine needs a score per pair; set data.label_field (or use loss=ranking)")
    if self.loss_name == "ranking":
      self.kind = "ranking"
    if self.kind == "cosine" and train.tuples.shape[1] != 2:
      raise UserError("embedding.loss=cosine takes pairs; drop data.negative_field")
    ms = float(d.get("max_score", 0.0) or 0.0)
    if train.scores is not None:
      top = float(np.max(train.scores))
      self.max_score = ms or (top if top > 1.0 else 1.0)
    limits = {"train": int(d.get("max_train_examples", 0) or 0), "dev": int(d.get("max_eval_examples", 0) or 0)}
    self.splits = {s: sp.take(limits[s]) for s, sp in self.splits.items()}
    self.main_metric = self._main_metric()

  def _main_metric(self) -> str:
    """`training.main_metric`, else spearman (scored dev pairs) / mrr@10 (a retrieval dev set); '' without dev."""
    dev = self.splits.get("dev")
    if dev is None:
      options = []
    elif dev.scores is not None:
      options = ["spearman", "pearson"]
    else:
      options = ["mrr@10"] + [f"recall@{k}" for k in RETRIEVAL_KS]
    main = self.config.training.get("main_metric") or (options[0] if options else "")
    if main and main not in options:
      raise UserError(f"training.main_metric={main!r} is not reported for this dev data; choose one of {options}")
    return main

  def _log_data(self) -> None:
    logging.info("embedding: %s loss (%s pooling%s); %s; tokenizer %s; main metric %s", self.kind, self.pooling,
                 ", normalized" if self.normalize else "",
                 ", ".join(f"{s} {len(sp)} examples / {len(sp.texts)} texts" for s, sp in self.splits.items()),
                 self.tok_source, self.main_metric or "none (no dev data)")

  def _packer(self, split: str, text_ids: np.ndarray, global_batch: int) -> data.TextPacker:
    c = self.config
    rows = math.lcm(jax.local_device_count(), max(1, global_batch // jax.process_count() // 8))
    texts = int(c.data.get("max_texts_per_row", 16)) if c.data.get("packing", True) else 1
    return data.TextPacker(self.tokens[split], text_ids, rows, texts)

  def train_source(self) -> loader.BatchSource:
    c, train = self.config, self.splits["train"]
    arrays = {"text_ids": train.tuples}
    if self.kind == "cosine":
      arrays["scores"] = train.scores / self.max_score
    gb = c.training.global_batch_size
    return loader.BatchSource(arrays, gb, c.seed, jax.process_index(), jax.process_count(), name="train",
                              packer=self._packer("train", train.tuples, gb))

  def _eval_texts(self, split: str) -> np.ndarray:
    """The text ids a split's evaluation encodes: every text of its pairs, or its queries + corpus."""
    sp = self.splits[split]
    if sp.scores is not None:
      return np.unique(sp.tuples.ravel()).astype(np.int32)
    return np.unique(np.concatenate([sp.queries, sp.corpus])).astype(np.int32)

  def _batches(self, split: str) -> list[loader.Batch]:
    c = self.config
    ids = self._eval_texts(split)[:, None]
    gb = c.training.eval_batch_size
    return loader.eval_batches({"text_ids": ids}, gb, None, c.seed, jax.process_index(), jax.process_count(),
                               packer=self._packer(split, ids, gb))

  def eval_batches(self) -> list[loader.Batch]:
    if "dev" not in self.splits:
      return []
    if not hasattr(self, "_eval"):
      self._eval = self._batches("dev")
    return self._eval

  # -- model ----------------------------------------------------------------------------------------------
  def build_model(self, rngs: nnx.Rngs) -> BertForSentenceEmbedding:
    return BertForSentenceEmbedding(self.model_config, rngs)

  def _embed(self, model, batch, rngs, deterministic) -> jax.Array:
    return model(batch["input_ids"], None, batch["attention_mask"], position_ids=batch["position_ids"],
                 segment_ids=batch["segment_ids"], slot_tokens=batch["slot_tokens"], text_slots=batch["text_slots"],
                 pooling=self.pooling, normalize=self.normalize, deterministic=deterministic, rngs=rngs)

  def loss_fn(self, model, batch, rngs, deterministic):
    emb = self._embed(model, batch, rngs, deterministic)  # [N, K, D] float32
    unit = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    w = batch.get("example_weights")
    w = jnp.ones(emb.shape[:1], jnp.float32) if w is None else w.astype(jnp.float32)
    if self.kind == "cosine":
      cos = jnp.sum(unit[:, 0] * unit[:, 1], -1)
      per = jnp.square(cos - batch["scores"])
      out = {"loss": (jnp.sum(per * w), jnp.sum(w))}
    else:
      queries = unit[:, 0]
      candidates = jnp.swapaxes(unit[:, 1:], 0, 1).reshape(-1, unit.shape[-1])  # positives, then negatives
      logits = self.scale * jnp.einsum("qd,cd->qc", queries, candidates)
      target = jnp.arange(queries.shape[0])
      per = optax.softmax_cross_entropy_with_integer_labels(logits, target)
      hit = (jnp.argmax(logits, -1) == target).astype(jnp.float32)
      out = {"loss": (jnp.sum(per * w), jnp.sum(w)), "in_batch_accuracy": (jnp.sum(hit * w), jnp.sum(w))}
    total, n = out["loss"]
    return total / jnp.maximum(n, 1e-9), out

  def predict_step(self, model, batch) -> dict[str, jax.Array]:
    emb = self._embed(model, batch, None, True)[:, 0]
    return {"embeddings": emb, "example_weights": batch["example_weights"]}

  # -- metrics and outputs --------------------------------------------------------------------------------
  def _text_embeddings(self, split: str, outputs) -> np.ndarray:
    """[U, D] float32: row t = text t of the split (texts not evaluated stay 0)."""
    sp = self.splits[split]
    emb = valid_rows(outputs)["embeddings"].astype(np.float32)
    table = np.zeros((len(sp.texts), emb.shape[-1]), np.float32)
    table[self._eval_texts(split)] = emb
    return table

  def report(self, split: str, table: np.ndarray) -> dict[str, Any]:
    sp = self.splits[split]
    unit = table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
    if sp.scores is not None:
      cos = np.sum(unit[sp.tuples[:, 0]] * unit[sp.tuples[:, 1]], -1)
      return {"spearman": metrics.spearman(cos, sp.scores), "pearson": metrics.pearson(cos, sp.scores),
              "cosine": cos}
    return metrics.retrieval(unit[sp.queries], unit[sp.corpus], [np.searchsorted(sp.corpus, r) for r in sp.relevant],
                             RETRIEVAL_KS)

  def compute_metrics(self, outputs) -> dict[str, float]:
    rep = self.report("dev", self._text_embeddings("dev", outputs))
    return {k: v for k, v in rep.items() if not isinstance(v, (np.ndarray, list))}

  def save_assets(self, workdir: str) -> None:
    toklib.save_to_workdir(self.tok, workdir, self.model_config.max_position_embeddings)

  def checkpoint_meta(self) -> dict[str, Any]:
    return {"pooling": self.pooling, "normalize": self.normalize, "loss": self.kind}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, Any]:
    """With the best params: the dev pairs' cosines, or each dev query's top 10, in predictions/dev.jsonl."""
    if "dev" not in self.splits:
      return {}
    sp = self.splits["dev"]
    rep = self.report("dev", self._text_embeddings("dev", predict(self.eval_batches())))
    if jax.process_index() == 0:
      with paths.staged(paths.join(workdir, "predictions")) as folder, \
          open(os.path.join(folder, "dev.jsonl"), "w") as f:
        if sp.scores is not None:
          for (a, b), gold, cos in zip(sp.tuples[:, :2], sp.scores, rep["cosine"]):
            f.write(json.dumps({"text": sp.texts[a], "text_pair": sp.texts[b], "score": float(gold),
                                "cosine": round(float(cos), 6)}) + "\n")
        else:
          for q, rel, top in zip(sp.queries, sp.relevant, rep["top"]):
            f.write(json.dumps({"query": sp.texts[q], "relevant": [sp.texts[r] for r in rel],
                                "top": [sp.texts[sp.corpus[i]] for i in top]}) + "\n")
      logging.info("wrote the dev predictions to %s", paths.join(workdir, "predictions", "dev.jsonl"))
    return {}

