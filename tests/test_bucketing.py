"""Length bucketing: batches cut to the smallest bucket holding their longest example drop only padding columns.

The loader keeps the same rows in the same order (any process count), the jitted steps see only the planned
widths, and a tiny GLUE fine-tune (dropout off) has the same losses, eval logits and parameters bucketed as unbucketed
(<= 1e-5).
"""

import numpy as np
import pytest

from bertjax.data import loader
from bertjax.errors import UserError


def padded_rows(n=96, full=40, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, full + 1, n)
  lengths[rng.random(n) < 0.97] //= 4  # mostly short rows, a few long ones
  lengths = np.maximum(lengths, 2)
  mask = (np.arange(full)[None, :] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(5, 100, (n, full)), 0).astype(np.int32)
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": mask,
          "labels": rng.integers(0, 2, n)}, lengths


def test_bucket_lengths_spec():
  assert loader.bucket_lengths("auto", 64) == (16, 32, 48, 64)
  assert loader.bucket_lengths("auto", 384) == (16, 32, 48, 64, 128, 256, 384)
  assert loader.bucket_lengths("24, 8,100", 64) == (8, 24, 64)
  assert loader.bucket_lengths("", 64) == () == loader.bucket_lengths("off", 64)
  with pytest.raises(UserError, match="bucket_lengths"):
    loader.bucket_lengths("short", 64)


@pytest.mark.parametrize("processes", [1, 2])
def test_same_rows_same_order_only_padding_cut(processes):
  ex, lengths = padded_rows()
  widths = (8, 16, 24, 40)
  seen = set()
  for step in range(3 * (96 // 16)):  # three epochs
    plain = loader.BatchSource(ex, 16, seed=3).batch(step)
    parts = [loader.BatchSource(ex, 16, 3, p, processes, buckets=widths).batch(step) for p in range(processes)]
    w = parts[0]["input_ids"].shape[1]
    assert all(p["input_ids"].shape[1] == w for p in parts)  # every process cuts the global batch's width
    need = lengths[loader.BatchSource(ex, 16, seed=3).global_indices(step)].max()
    assert w == min(x for x in widths if x >= need)  # the smallest bucket that fits
    seen.add(w)
    for k in ex:
      got = np.concatenate([p[k] for p in parts])
      np.testing.assert_array_equal(got, plain[k][:, :w] if plain[k].ndim == 2 else plain[k])
    assert not plain["attention_mask"][:, w:].any() and not plain["input_ids"][:, w:].any()
  assert seen == set(loader.BatchSource(ex, 16, 3, buckets=widths).bucket_plan(0, 18))
  assert len(seen) >= 2
  src = loader.BatchSource(ex, 16, 3, buckets=widths)
  assert src.bucket_plan(7, 9) == sorted({src.batch(s)["input_ids"].shape[1] for s in (7, 8)})
  assert {k: v.shape for k, v in src.warmup_batch(24).items()} == {
      "input_ids": (16, 24), "token_type_ids": (16, 24), "attention_mask": (16, 24), "labels": (16,)}


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_batches_bucketed(processes):
  ex, lengths = padded_rows(n=70)
  plain = loader.eval_batches(ex, 16, None, 0)
  parts = [loader.eval_batches(ex, 16, None, 0, p, processes, buckets=(8, 16, 40)) for p in range(processes)]
  for i, b in enumerate(plain):
    w = parts[0][i]["input_ids"].shape[1]
    assert w == min(x for x in (8, 16, 40) if x >= lengths[16 * i:16 * (i + 1)].max())
    for k in b:
      got = np.concatenate([p[i][k] for p in parts])
      np.testing.assert_array_equal(got, b[k][:, :w] if b[k].ndim == 2 else b[k])


def test_predict_outputs_padded_back_to_one_width():
  from bertjax.tasks.ner import valid_rows
  outs = [{"start_logits": np.ones((2, 3), np.float32), "predictions": np.full((2, 3), 7), "loss": np.ones(2),
           "example_weights": np.ones(2)},
          {"start_logits": np.ones((2, 5), np.float32), "predictions": np.full((2, 5), 7), "loss": np.ones(2),
           "example_weights": np.array([1.0, 0.0])}]
  rows = valid_rows(outs)
  assert rows["start_logits"].shape == (3, 5) and rows["loss"].shape == (3,)
  assert valid_rows(outs[:1], 6)["predictions"].shape == (2, 6)  # one bucket for all: still the full width
  np.testing.assert_array_equal(rows["start_logits"][:2, 3:], -1e9)
  np.testing.assert_array_equal(rows["predictions"][:2, 3:], 0)
  np.testing.assert_array_equal(rows["predictions"][2], 7)


WORDS = "the a of to and in is was cat sat mat dog ran far away quick brown fox jumps over lazy river".split()


def tiny_glue(tmp_path):
  """An SST-2 folder of sentences of 1-12 words (two of 25 and 28) and a whole-word vocabulary."""
  (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
  rng = np.random.default_rng(0)
  for split, n in (("train", 64), ("dev", 40)):
    lens = np.where(rng.random(n) < 0.8, rng.integers(1, 6, n), rng.integers(6, 13, n))
    lens[[3, 9]] = 25, 28  # two long rows: only their batches need all 32 columns
    rows = [" ".join(rng.choice(WORDS, k)) + f"\t{int(rng.integers(2))}" for k in lens]
    (tmp_path / "SST-2").mkdir(exist_ok=True)
    (tmp_path / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
  return tmp_path


def test_bucketed_and_packed_finetune_equal_unbucketed(tmp_path, cache_dir):
  """Same losses per step, eval logits and parameters after 4 AdamW steps, bucketed, packed (several examples
  per row, each classified from its own [CLS]) or neither (dropout off)."""
  import jax
  from configs import glue
  from bertjax.train import metrics as mlib
  from bertjax.train.trainer import Trainer, warm_up
  data = tiny_glue(tmp_path)

  def run(buckets, packing=False):
    c = glue.get_config()
    c.init_from_hf, c.model.preset, c.model.num_hidden_layers = "", "tiny", 1
    c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.0
    c.data.update(task="sst2", data_dir=str(data), cache_dir=cache_dir, tokenizer=str(data / "vocab.txt"),
                  max_seq_length=32, bucket_lengths=buckets, packing=packing)
    c.training.update(global_batch_size=16, eval_batch_size=16)
    c.optimizer.update(learning_rate=1e-3, warmup_fraction=0.0)
    tr = Trainer(c, str(tmp_path / f"wd{buckets}{packing}"))
    tr.setup()
    st = tr.init_state()
    params, opt = st.params, st.opt_state
    warm_up(tr, params, opt, st.rng, 0, 4)
    losses, widths = [], []
    for s in range(4):
      b = tr.source.batch(s)
      widths.append(b["input_ids"].shape[0 if packing else 1])
      params, opt, m = tr.train_step(params, opt, tr.put_batch(b), np.int32(s), st.rng)
      losses.append(mlib.scalars(m)["loss"])
    logits = np.concatenate([o["logits"] for o in tr.predict(params, tr.task.eval_batches())])
    eval_widths = [b["input_ids"].shape[0 if packing else 1] for b in tr.task.eval_batches()]
    return losses, logits, jax.device_get(params), widths, eval_widths

  l0, g0, p0, w0, e0 = run("")
  l1, g1, p1, w1, e1 = run("16,24")
  assert w0 == [32] * 4 and e0 == [32] * 3
  assert e1 == [32, 16, 16] and 32 in w1 and 16 in w1  # several shapes compiled
  np.testing.assert_allclose(l1, l0, atol=1e-5)
  np.testing.assert_allclose(g1, g0, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p0)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  l2, g2, p2, rows, eval_rows = run("", packing=True)
  assert set(rows) == {8} and set(eval_rows) == {8}  # 16 examples in 8 rows (a multiple of the 8 devices)
  np.testing.assert_allclose(l2, l0, atol=1e-5)
  np.testing.assert_allclose(g2, g0, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(p0)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_batches_hold_every_example_once(processes):
  """Fine-tuning packing: each example's tokens sit contiguously at its flat [CLS] index in the global rows, with
  its own segment id and positions 0..n-1; every process uses the same row count."""
  ex, lengths = padded_rows(n=64, full=40)
  for step in range(4):
    parts = [loader.BatchSource(ex, 16, 3, p, processes, packer=loader.Packer(ex, 2)).batch(step) for p in range(processes)]
    assert len({b["input_ids"].shape for b in parts}) == 1 and parts[0]["input_ids"].shape[0] % 2 == 0
    rows = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    flat = {k: rows[k].reshape(-1) for k in ("input_ids", "segment_ids", "position_ids")}
    plain = loader.BatchSource(ex, 16, seed=3).batch(step)
    np.testing.assert_array_equal(rows["labels"], plain["labels"])
    assert rows["input_ids"].shape[0] < 16 and (rows["attention_mask"].sum() == plain["attention_mask"].sum())
    for i, c in enumerate(rows["cls_positions"]):
      n = int(plain["attention_mask"][i].sum())
      np.testing.assert_array_equal(flat["input_ids"][c:c + n], plain["input_ids"][i, :n])
      np.testing.assert_array_equal(flat["position_ids"][c:c + n], np.arange(n))
      assert len(set(flat["segment_ids"][c:c + n])) == 1 and flat["segment_ids"][c] > 0
      assert c // 40 == (c + n - 1) // 40  # within one row
