"""Task heads on `BertModel`, named 1:1 like transformers' `BertFor*` classes.

The MLM decoder is tied to the word embeddings without sharing a submodule (NNX tree mode stays valid): the
head receives the embedding matrix as an argument. Logits come out in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bertjax.models import partitioning
from bertjax.models.bert import BertConfig, BertModel, activation, dense, layer_norm
from bertjax.models.dropout import Dropout


class BertPredictionHeadTransform(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs)
    self.hidden_act = cfg.hidden_act
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)

  def __call__(self, x):
    return self.LayerNorm(activation(self.hidden_act)(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
  """dense + GELU + LayerNorm, then the tied decoder (word embeddings transposed) plus an output bias."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.transform = BertPredictionHeadTransform(cfg, rngs)
    init = nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",), eager_sharding=False)
    self.bias = nnx.Param(init(rngs.params(), (cfg.vocab_size,), jnp.float32))

  def __call__(self, x, word_embeddings):
    h = self.transform(x)
    logits = jnp.einsum("...d,vd->...v", h, word_embeddings.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.bias[...]


class BertOnlyMLMHead(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.predictions = BertLMPredictionHead(cfg, rngs)


class BertPreTrainingHeads(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.predictions = BertLMPredictionHead(cfg, rngs)
    self.seq_relationship = dense(cfg, cfg.hidden_size, 2, ("embed", None), rngs)


def gather_positions(x, positions):
  """x[b, positions[b, p]] for x [B, T, D], positions [B, P] -> [B, P, D]."""
  return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


def pool_at(bert: BertModel, seq, pooled, cls_positions):
  """The pooler output at [CLS] (position 0: `pooled`), or at each packed segment's [CLS]: `cls_positions`
  [B, k] columns per row -> [B, k, D], or [N] flat indices row * T + column over all rows -> [N, D]."""
  if cls_positions is None:
    return pooled
  if cls_positions.ndim == 1:
    return bert.pooler.pool(seq.reshape(-1, seq.shape[-1])[cls_positions])
  return bert.pooler.pool(gather_positions(seq, cls_positions))


class BertForPreTraining(nnx.Module):
  """MLM + NSP. With `masked_positions` [B, P] the MLM head runs only at those positions. Packed rows (several
  pairs per row) pass `segment_ids` / `position_ids` and the column of each pair's [CLS], `cls_positions` [B, k]:
  the NSP logits are then [B, k, 2]."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs)
    self.cls = BertPreTrainingHeads(cfg, rngs)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None, *,
               position_ids=None, segment_ids=None, cls_positions=None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, position_ids=position_ids,
                            segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)
    pooled = pool_at(self.bert, seq, pooled, cls_positions)
    if masked_positions is not None:
      seq = gather_positions(seq, masked_positions)
    emb = self.bert.embeddings.word_embeddings.embedding[...]
    mlm_logits = self.cls.predictions(seq, emb)
    nsp_logits = self.cls.seq_relationship(pooled).astype(jnp.float32)
    return mlm_logits, nsp_logits


class BertForMaskedLM(nnx.Module):
  """MLM only (no pooler, no NSP), like transformers' `BertForMaskedLM`."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs, add_pooling_layer=False)
    self.cls = BertOnlyMLMHead(cfg, rngs)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, masked_positions=None, *,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    seq, _ = self.bert(input_ids, token_type_ids, attention_mask, deterministic=deterministic, rngs=rngs)
    if masked_positions is not None:
      seq = gather_positions(seq, masked_positions)
    return self.cls.predictions(seq, self.bert.embeddings.word_embeddings.embedding[...])


class BertForSequenceClassification(nnx.Module):
  """Pooler -> dropout -> linear. `num_labels == 1` is regression (STS-B)."""

  def __init__(self, cfg: BertConfig, num_labels: int, rngs: nnx.Rngs, classifier_dropout: float | None = None):
    self.num_labels = num_labels
    self.bert = BertModel(cfg, rngs)
    rate = cfg.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
    self.dropout = Dropout(rate)
    self.classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", None), rngs)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               cls_positions=None, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Logits [B, num_labels]; packed rows (`segment_ids`, `position_ids`, `cls_positions`): see `pool_at`."""
    seq, pooled = self.bert(input_ids, token_type_ids, attention_mask, position_ids=position_ids,
                            segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)
    pooled = pool_at(self.bert, seq, pooled, cls_positions)
    pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
    return self.classifier(pooled).astype(jnp.float32)


class BertForTokenClassification(nnx.Module):
  """Per-token linear classifier on the last hidden state (no pooler)."""

  def __init__(self, cfg: BertConfig, num_labels: int, rngs: nnx.Rngs, classifier_dropout: float | None = None):
    self.num_labels = num_labels
    self.bert = BertModel(cfg, rngs, add_pooling_layer=False)
    rate = cfg.hidden_dropout_prob if classifier_dropout is None else classifier_dropout
    self.dropout = Dropout(rate)
    self.classifier = dense(cfg, cfg.hidden_size, num_labels, ("embed", None), rngs)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Logits [B, T, num_labels]; packed rows pass `segment_ids` / `position_ids` (see `BertModel`)."""
    seq, _ = self.bert(input_ids, token_type_ids, attention_mask, position_ids=position_ids,
                       segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)
    seq = self.dropout(seq, deterministic=deterministic, rngs=rngs)
    return self.classifier(seq).astype(jnp.float32)


class BertForQuestionAnswering(nnx.Module):
  """Span extraction: start and end logits [B, T] from one linear layer (no pooler)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs, add_pooling_layer=False)
    self.qa_outputs = dense(cfg, cfg.hidden_size, 2, ("embed", None), rngs)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    seq, _ = self.bert(input_ids, token_type_ids, attention_mask, deterministic=deterministic, rngs=rngs)
    logits = self.qa_outputs(seq).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


POOLING = ("mean", "cls")


def pool_tokens(seq, member, pooling: str, counts=None):
  """Pool `seq` [B, T, D] over the tokens each slot holds: `member` [B, S, T] (True where token t belongs to
  slot s) -> [B, S, D] float32. "mean": the average of the slot's tokens (as sentence-transformers' mean pooling,
  the count clamped at 1e-9); "cls": its first token. `counts` [B, S]: the slot's token count if known."""
  if pooling == "cls":
    first = jnp.argmax(member, axis=-1)  # [B, S]: the first token of each slot (0 for an empty slot)
    return gather_positions(seq, first).astype(jnp.float32)
  if pooling != "mean":
    raise ValueError(f"pooling={pooling!r}; use one of {POOLING}")
  sums = jnp.einsum("bst,btd->bsd", member.astype(seq.dtype), seq, preferred_element_type=jnp.float32)
  counts = member.sum(-1) if counts is None else counts
  return sums / jnp.maximum(counts.astype(jnp.float32), 1e-9)[..., None]


class BertForSentenceEmbedding(nnx.Module):
  """Sentence embeddings, as sentence-transformers' Transformer + Pooling (+ Normalize) modules: the encoder
  (no pooler), then mean or [CLS] pooling of the last hidden state in float32, optionally L2-normalised.

  Plain rows: one text a row, `attention_mask` marks its tokens -> [B, D]. Packed rows (several texts a row,
  each its own `segment_ids` value 1..S with `position_ids` restarting): `slot_tokens` [B, S] holds each slot's
  token count (S, the most texts a row, is its width) and `text_slots` [...] the flat index row * S + slot (over
  all rows of the global batch) of each text wanted -> [..., D] in `text_slots`' shape.
  """

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.bert = BertModel(cfg, rngs, add_pooling_layer=False)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               slot_tokens=None, text_slots=None, pooling: str = "mean", normalize: bool = False,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    seq, _ = self.bert(input_ids, token_type_ids, attention_mask, position_ids=position_ids,
                       segment_ids=segment_ids, deterministic=deterministic, rngs=rngs)
    if segment_ids is None:
      mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
      emb = pool_tokens(seq, mask[:, None, :], pooling)[:, 0]
    else:
      slots = jnp.arange(1, slot_tokens.shape[1] + 1, dtype=segment_ids.dtype)
      member = segment_ids[:, None, :] == slots[None, :, None]
      emb = pool_tokens(seq, member, pooling, slot_tokens)
      # the slots of every text, replicated once: left batch-sharded, the partitioner re-gathers the indices in
      # every fusion that reads them (dozens of small all-gathers a step on a TPU slice)
      text_slots = partitioning.constrain(text_slots, (None,) * text_slots.ndim)
      emb = emb.reshape(-1, emb.shape[-1])[text_slots]
    if normalize:  # torch.nn.functional.normalize(p=2, eps=1e-12), as sentence-transformers' Normalize
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


HEADS = {
    "pretraining": BertForPreTraining,
    "masked_lm": BertForMaskedLM,
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "question_answering": BertForQuestionAnswering,
    "sentence_embedding": BertForSentenceEmbedding,
}
