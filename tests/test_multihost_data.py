"""The global batch (rows and masking) is a pure function of (seed, step), whatever the process count."""

import numpy as np
import pytest

from bertjax.data import loader, pretraining as pt


def pairs(n=61, length=24, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (n, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "word_starts": rng.random((n, length)) < 0.7,
          "nsp_labels": rng.integers(0, 2, n).astype(np.int32)}


def masker(whole_word=False):
  return pt.Masker(pt.MaskConfig(max_predictions=5, whole_word=whole_word), 50, [0, 1, 2, 3, 4], 4, 0)


def concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("whole_word", [False, True])
def test_train_batches_do_not_depend_on_the_process_count(count, whole_word):
  data = pairs()
  one = loader.BatchSource(data, 8, seed=3, transform=masker(whole_word))
  many = [loader.BatchSource(data, 8, 3, i, count, masker(whole_word)) for i in range(count)]
  assert one.steps_per_epoch == many[0].steps_per_epoch == 61 // 8
  for step in (0, 5, 7, 8, 20):  # crosses epochs
    ref = one.batch(step)
    got = concat([m.batch(step) for m in many])
    assert set(ref) == set(got)
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} at step {step}")
    assert ref["masked_weights"].sum() > 0
  assert not np.array_equal(one.batch(0)["input_ids"], one.batch(1)["input_ids"])


def test_a_process_reads_only_its_rows():
  data = pairs()
  src = loader.BatchSource(data, 8, 3, 1, 2)
  glob = src.global_indices(4)
  np.testing.assert_array_equal(src.indices(4), glob[4:])
  np.testing.assert_array_equal(src.batch(4)["input_ids"], data["input_ids"][glob[4:]])


def test_memmap_rows_equal_in_memory_rows(tmp_path):
  data = pairs()
  mm = {}
  for k, v in data.items():
    mm[k] = np.lib.format.open_memmap(tmp_path / f"{k}.npy", "w+", v.dtype, v.shape)
    mm[k][:] = v
  a = loader.BatchSource(data, 8, 3, 0, 2, masker()).batch(9)
  b = loader.BatchSource(mm, 8, 3, 0, 2, masker()).batch(9)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("count", [2, 4])
def test_eval_batches_do_not_depend_on_the_process_count(count):
  data = pairs(n=21)
  ref = loader.eval_batches(data, 8, masker(), 5)
  parts = [loader.eval_batches(data, 8, masker(), 5, i, count) for i in range(count)]
  assert len(ref) == 3 and all(len(p) == 3 for p in parts)
  for j, r in enumerate(ref):
    got = concat([p[j] for p in parts])
    for k in r:
      np.testing.assert_array_equal(got[k], r[k], err_msg=f"{k} in eval batch {j}")
  assert ref[-1]["nsp_weights"].tolist() == [1.0] * 5 + [0.0] * 3


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_draws_and_masks_only_its_rows(count):
  """Host work per process is 1/count of the batch: the masker sees only the process's rows, and the generator
  computes only their random numbers (the whole batch's numbers were drawn on every process before)."""
  data = pairs()

  def counting(seen):
    def transform(b, rng):
      out = masker()(b, rng)
      seen.append((len(b["input_ids"]), rng.drawn))
      return out
    return transform

  whole, parts = [], []
  loader.BatchSource(data, 8, 3, transform=counting(whole)).batch(2)
  for i in range(count):
    loader.BatchSource(data, 8, 3, i, count, counting(parts)).batch(2)
  (rows, drawn), = whole
  assert rows == 8 and drawn == 3 * 8 * 24  # three [rows, length] draws: choice keys, kinds, random tokens
  assert parts == [(8 // count, drawn // count)] * count


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_packs_only_its_rows(count):
  """Packed pretraining rows (data.packing): the same global batches for any process count, and a process builds
  only the packed rows it reads (before, every process packed the whole corpus)."""
  data = pairs(n=120)
  lengths = np.random.default_rng(1).integers(6, 16, 120)
  data["input_ids"][np.arange(24)[None] >= lengths[:, None]] = 0
  data["lengths"] = lengths.astype(np.int32)

  def source(i, n):
    packed = pt.PackedPairs(data, 3)
    return packed, loader.BatchSource(packed, 8, 3, i, n, masker())

  whole, one = source(0, 1)
  parts = [source(i, count) for i in range(count)]
  assert len(whole.lengths) < 60  # 120 pairs of 6-15 tokens in rows of 24: about 2 a row
  for step in (0, 3):
    ref = one.batch(step)
    got = concat([s.batch(step) for _, s in parts])
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} at step {step}")
    assert (ref["nsp_weights"].sum(1) >= 2).any()  # rows really hold several pairs
  assert whole.rows_built == 2 * 8 and [p.rows_built for p, _ in parts] == [2 * 8 // count] * count


def test_row_random_numbers():
  """The counter-based stream: uniform floats and integers, fresh numbers per draw and per seed, a local draw
  equal to the rows of the global one, and scalars / other shapes the same on every process."""
  g = loader.RowRandom([3, 1, 0, 1], 8, 0, 8)
  u = g.random((8, 20000))
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size) and 0 <= u.min() and u.max() < 1
  k = g.integers(0, 7, size=(8, 7000))
  counts = np.bincount(k.ravel(), minlength=7)
  assert k.min() == 0 and k.max() == 6 and np.abs(counts / k.size - 1 / 7).max() < 5 * np.sqrt(1 / 7 / k.size)
  again = loader.RowRandom([3, 1, 0, 1], 8, 0, 8)
  np.testing.assert_array_equal(again.random((8, 20000)), u)
  assert not np.array_equal(again.random((8, 20000)), u)  # the next draw is another stream
  assert not np.array_equal(loader.RowRandom([3, 2, 0, 1], 8, 0, 8).random((8, 20000)), u)
  local = loader.RowRandom([3, 1, 0, 1], 8, 2, 4)
  np.testing.assert_array_equal(local.random((2, 20000)), u[2:4])
  assert local.drawn == 2 * 20000
  first = loader.RowRandom([3, 1, 0, 1], 8, 0, 8)
  first.random((8, 20000))
  np.testing.assert_array_equal(local.random(3), first.random(3))  # not a row draw: whole on every process


def test_a_transform_that_draws_unsupported_numbers_fails_loudly():
  data = pairs()
  src = loader.BatchSource(data, 8, 3, 0, 2, lambda b, rng: {"x": rng.permutation(4)})
  with pytest.raises(AttributeError, match="process count"):
    src.batch(0)
