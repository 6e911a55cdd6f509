"""Sequence packing for pretraining: first-fit rows of several NSP pairs, and a packed row giving each pair
exactly the outputs and losses it has alone (segment-restricted attention, restarting positions, NSP at each
pair's [CLS]); <= 1e-5."""

import numpy as np
import pytest

from bertjax.data import loader, pretraining as pt


def reference_first_fit(lengths, capacity, k):
  rows = []
  for i, n in enumerate(lengths):
    for r in rows:
      if len(r) < k and capacity - sum(lengths[j] for j in r) >= n:
        r.append(i)
        break
    else:
      rows.append([i])
  return rows


def synthetic_pairs(lengths, L, seed=0):
  """[CLS]=2 A [SEP]=3 B [SEP] rows of the given lengths, ids from 5 up."""
  rng = np.random.default_rng(seed)
  n = len(lengths)
  ids, types = np.zeros((n, L), np.int32), np.zeros((n, L), np.int32)
  for r, m in enumerate(lengths):
    la = int(rng.integers(1, m - 3)) if m > 4 else 1
    ids[r, :m] = rng.integers(5, 60, m)
    ids[r, 0], ids[r, la + 1], ids[r, m - 1] = 2, 3, 3
    types[r, la + 2:m] = 1
  return {"input_ids": ids, "token_type_ids": types, "word_starts": ids > 0,
          "nsp_labels": rng.integers(0, 2, n).astype(np.int32), "lengths": np.asarray(lengths, np.int32)}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_first_fit_rows(k):
  lengths = np.random.default_rng(k).integers(5, 33, 300)
  assert loader.first_fit(lengths, 32, k) == reference_first_fit(list(lengths), 32, k)
  pairs = synthetic_pairs(lengths, 32)
  p = pt.pack_pairs(pairs, k)
  used = p["pair_index"][p["pair_index"] >= 0]
  assert sorted(used.tolist()) == list(range(300))  # every pair exactly once
  assert (p["lengths"] <= 32).all() and (p["nsp_slots"].sum(1) <= k).all()
  assert p["lengths"].sum() == lengths.sum()
  for r in range(len(p["lengths"])):
    for s, i in enumerate(p["pair_index"][r]):
      if i < 0:
        continue
      cols = np.flatnonzero(p["segment_ids"][r] == s + 1)
      n = lengths[i]
      assert len(cols) == n and cols[0] == p["cls_positions"][r, s] and np.all(np.diff(cols) == 1)
      np.testing.assert_array_equal(p["input_ids"][r, cols], pairs["input_ids"][i, :n])
      np.testing.assert_array_equal(p["token_type_ids"][r, cols], pairs["token_type_ids"][i, :n])
      np.testing.assert_array_equal(p["position_ids"][r, cols], np.arange(n))
      assert p["nsp_labels"][r, s] == pairs["nsp_labels"][i]
  if k > 1:
    assert pt.padding_share(p["lengths"], 32) < pt.padding_share(lengths, 32)


def test_packed_row_equals_each_pair_alone():
  """Hidden states, MLM and NSP logits, and the task's loss sums: packed row vs each pair alone (padded)."""
  import jax.numpy as jnp
  from flax import nnx
  from ml_collections import ConfigDict
  from bertjax.models.bert import BertConfig
  from bertjax.models.heads import BertForPreTraining
  from bertjax.tasks.pretraining import PretrainingTask

  L, lengths = 32, [11, 7, 12]
  cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=L)
  model = BertForPreTraining(cfg, nnx.Rngs(0))
  pairs = synthetic_pairs(lengths, L, seed=1)
  packed = pt.pack_pairs(pairs, 4)
  assert packed["input_ids"].shape == (1, L) and packed["nsp_slots"].sum() == 3
  # choose 3 MLM positions per pair (its own columns), the same ones in the packed row
  choose = [np.array([1, 4, n - 2]) for n in lengths]
  offsets = packed["cls_positions"][0, :3]
  kw = dict(masked_positions=None, deterministic=True)
  seq_p, _ = model.bert(jnp.asarray(packed["input_ids"]), jnp.asarray(packed["token_type_ids"]),
                        position_ids=jnp.asarray(packed["position_ids"]),
                        segment_ids=jnp.asarray(packed["segment_ids"]))
  mlm_p, nsp_p = model(jnp.asarray(packed["input_ids"]), jnp.asarray(packed["token_type_ids"]),
                       position_ids=jnp.asarray(packed["position_ids"]),
                       segment_ids=jnp.asarray(packed["segment_ids"]),
                       cls_positions=jnp.asarray(packed["cls_positions"]), **kw)
  assert nsp_p.shape == (1, 4, 2)
  task = PretrainingTask(ConfigDict({"data": {"cache_dir": "unused"}}), "")
  labels = np.zeros((1, 9), np.int32)
  single_totals = {}
  for s, n in enumerate(lengths):
    row = {k: jnp.asarray(pairs[k][s:s + 1]) for k in ("input_ids", "token_type_ids")}
    mask = jnp.asarray((pairs["input_ids"][s:s + 1] != 0).astype(np.int32))
    seq_1, _ = model.bert(row["input_ids"], row["token_type_ids"], mask)
    np.testing.assert_allclose(seq_p[0, offsets[s]:offsets[s] + n], seq_1[0, :n], atol=1e-5)
    mlm_1, nsp_1 = model(row["input_ids"], row["token_type_ids"], mask, **kw)
    np.testing.assert_allclose(mlm_p[0, offsets[s]:offsets[s] + n], mlm_1[0, :n], atol=1e-5)
    np.testing.assert_allclose(nsp_p[0, s], nsp_1[0], atol=1e-5)
    lab = pairs["input_ids"][s, choose[s]][None].astype(np.int32)
    labels[0, 3 * s:3 * s + 3] = lab[0]
    batch = {**row, "attention_mask": mask, "masked_positions": jnp.asarray(choose[s][None].astype(np.int32)),
             "masked_labels": jnp.asarray(lab), "masked_weights": jnp.ones((1, 3)),
             "masked_kinds": jnp.full((1, 3), pt.KIND_MASK), "nsp_labels": jnp.asarray(pairs["nsp_labels"][s:s + 1]),
             "nsp_weights": jnp.ones((1,))}
    _, m = task.loss_fn(model, batch, None, True)
    for name, (total, count) in m.items():
      t, c = single_totals.get(name, (0.0, 0.0))
      single_totals[name] = (t + float(total), c + float(count))
  pos = np.concatenate([choose[s] + offsets[s] for s in range(3)])[None].astype(np.int32)
  batch = {"input_ids": packed["input_ids"], "token_type_ids": packed["token_type_ids"],
           "attention_mask": (packed["input_ids"] != 0).astype(np.int32), "masked_positions": pos,
           "masked_labels": labels, "masked_weights": np.ones((1, 9), np.float32),
           "masked_kinds": np.full((1, 9), pt.KIND_MASK), "nsp_labels": packed["nsp_labels"],
           "nsp_weights": packed["nsp_slots"], "segment_ids": packed["segment_ids"],
           "position_ids": packed["position_ids"], "cls_positions": packed["cls_positions"]}
  _, m = task.loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, True)
  for name in ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "mlm_loss_mask"):
    np.testing.assert_allclose([float(x) for x in m[name]], single_totals[name], atol=1e-5, err_msg=name)
  assert single_totals["nsp_loss"][1] == 3.0 and single_totals["mlm_loss"][1] == 9.0


def test_masker_keeps_packing_fields():
  pairs = synthetic_pairs([11, 7, 12, 30, 9], 32)
  packed = pt.pack_pairs(pairs, 3)
  masker = pt.Masker(pt.MaskConfig(mask_prob=0.2, max_predictions=8), 64, [0, 1, 2, 3, 4], 4)
  out = masker({k: v for k, v in packed.items()}, np.random.default_rng(0))
  for k in ("segment_ids", "position_ids", "cls_positions", "nsp_labels"):
    np.testing.assert_array_equal(out[k], packed[k])
  np.testing.assert_array_equal(out["nsp_weights"], packed["nsp_slots"])
  chosen = np.take_along_axis(packed["input_ids"], out["masked_positions"], 1)[out["masked_weights"] > 0]
  assert chosen.size and (chosen >= 5).all()  # never [CLS] / [SEP] / padding
