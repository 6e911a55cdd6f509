"""benchmarks/pretrain_throughput.py's packed rows: built as `data.packing=True` builds them, and the benchmark's
step on them computes the loss each pair has alone (so the packed timing is of the same work, not of a step that
lets attention cross pairs or drops NSP slots)."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from accelerator import train_step_fn  # noqa: E402
from pretrain_throughput import packed_batch  # noqa: E402

from bertjax.models.bert import BertConfig  # noqa: E402
from bertjax.models.heads import BertForPreTraining  # noqa: E402

T, P = 64, 6


def _pairs(n: int = 60, seed: int = 0) -> dict:
  r = np.random.RandomState(seed)
  lengths = r.randint(8, 40, n)
  ids = np.zeros((n, T), np.int32)
  types = np.zeros((n, T), np.int32)
  for i, m in enumerate(lengths):
    ids[i, :m] = r.randint(5, 100, m)
    types[i, m // 2:m] = 1
  return {"input_ids": ids, "token_type_ids": types, "word_starts": ids > 0,
          "nsp_labels": r.randint(0, 2, n).astype(np.int32), "lengths": lengths.astype(np.int32)}


def test_packed_rows_keep_each_pair_apart_and_mask_only_real_non_cls_tokens():
  cfg = BertConfig.from_preset("tiny", vocab_size=128, max_position_embeddings=T)
  b = {k: np.asarray(v) for k, v in packed_batch(cfg, _pairs(), 4, P, 4).items()}
  seg, cls, w = b["segment_ids"], b["cls_positions"], b["nsp_weights"]
  assert (b["attention_mask"] == (seg > 0)).all()
  assert (w.sum(1) >= 2).any() and (w.sum(1) <= 4).all()  # several pairs share some rows, never more than 4
  for r in range(4):
    used = np.flatnonzero(w[r])
    assert [int(seg[r, cls[r, s]]) for s in used] == [s + 1 for s in used]  # each slot's [CLS] opens its pair
    assert (b["position_ids"][r, cls[r, used]] == 0).all()  # positions restart at every pair
    assert seg[r, b["masked_positions"][r]].min() > 0  # masked positions are real tokens ...
    assert not set(b["masked_positions"][r]) & set(cls[r, used])  # ... and never a [CLS]
    assert (b["masked_labels"][r] == b["input_ids"][r, b["masked_positions"][r]]).all()


def test_packed_step_loss_equals_each_pair_alone():
  cfg = BertConfig.from_preset("tiny", vocab_size=128, max_position_embeddings=T, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
  batch = packed_batch(cfg, _pairs(), 4, P, 4)
  run_one, _, _ = train_step_fn(cfg, batch)
  packed_loss = float(run_one())  # the loss before the first update, at the Rngs(0) initialisation

  # The same pairs, one per row, unpacked, through a model with the same initialisation.
  b = {k: np.asarray(v) for k, v in batch.items()}
  rows = {k: [] for k in ("ids", "types", "mask", "pos", "labels", "nsp", "row_of")}
  for r in range(4):
    for s in np.flatnonzero(b["nsp_weights"][r]):
      start = b["cls_positions"][r, s]
      n = int((b["segment_ids"][r] == s + 1).sum())
      mine = (b["masked_positions"][r] >= start) & (b["masked_positions"][r] < start + n)
      pad = lambda x: np.pad(x[start:start + n], (0, T - n))
      rows["ids"].append(pad(b["input_ids"][r]))
      rows["types"].append(pad(b["token_type_ids"][r]))
      rows["mask"].append(np.arange(T) < n)
      rows["pos"].append(b["masked_positions"][r][mine] - start)
      rows["labels"].append(b["masked_labels"][r][mine])
      rows["nsp"].append(b["nsp_labels"][r, s])
  model = BertForPreTraining(cfg, nnx.Rngs(0))
  mlm, nsp = model(jnp.asarray(np.stack(rows["ids"])), jnp.asarray(np.stack(rows["types"])),
                   jnp.asarray(np.stack(rows["mask"]).astype(np.int32)), None, deterministic=True)
  mlm_xent = [optax.softmax_cross_entropy_with_integer_labels(mlm[i, pos], lab)
              for i, (pos, lab) in enumerate(zip(rows["pos"], rows["labels"]))]
  assert sum(len(x) for x in mlm_xent) == 4 * P  # every masked position belongs to exactly one pair
  nsp_xent = optax.softmax_cross_entropy_with_integer_labels(nsp, jnp.asarray(rows["nsp"]))
  alone = float(jnp.concatenate(mlm_xent).mean() + nsp_xent.mean())
  assert abs(packed_loss - alone) <= 1e-5 * max(1.0, abs(alone)), (packed_loss, alone)
