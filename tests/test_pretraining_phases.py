"""The short-sequence phase of the pretraining recipe: pairs cut to a shorter length, then full-length batches."""

import numpy as np
import pytest

from bertjax.data import loader, pretraining as pt, tokenizer as toklib
from bertjax.tasks.pretraining import PhasedSource, crop_pairs


@pytest.fixture(scope="module")
def pairs(bbc_tokenizer, cache_dir):
  tok, docs = bbc_tokenizer
  tokenized = pt.tokenize_documents(docs.select(range(150)), tok, toklib.fingerprint(tok))
  cfg = pt.PairConfig(max_seq_length=128, short_seq_prob=0.1, nsp_probability=0.5, seed=9)
  return tok, pt.create_pairs(tokenized, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), cfg, cache_dir)


def _segments(ids, types):
  n = (ids != 0).sum()
  a = ids[1:np.flatnonzero(types[:n] == 1)[0] - 1]
  b = ids[np.flatnonzero(types[:n] == 1)[0]:n - 1]
  return a, b


def test_crop_keeps_the_end_of_a_and_the_start_of_b(pairs):
  tok, p = pairs
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  c = crop_pairs(p, 32)
  assert c["input_ids"].shape == (len(p["input_ids"]), 32)
  np.testing.assert_array_equal(c["nsp_labels"], p["nsp_labels"])
  np.testing.assert_array_equal(c["lengths"], (c["input_ids"] != 0).sum(1))
  cut = 0
  for i in range(len(p["input_ids"])):
    ids, types = c["input_ids"][i], c["token_type_ids"][i]
    n = c["lengths"][i]
    assert ids[0] == cls and ids[n - 1] == sep and (ids[n:] == 0).all() and (types[n:] == 0).all()
    assert (ids[1:n] != cls).all() and (ids[1:n - 1] == sep).sum() == 1
    a, b = _segments(ids, types)
    a0, b0 = _segments(p["input_ids"][i], p["token_type_ids"][i])
    assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) == min(29, len(a0) + len(b0))
    np.testing.assert_array_equal(a, a0[len(a0) - len(a):])  # the end of A ...
    np.testing.assert_array_equal(b, b0[:len(b)])  # ... and the start of B meet at the boundary
    if len(a0) >= 14 and len(b0) >= 15:
      assert (len(a), len(b)) == (14, 15)  # half each when both sides are long enough
    cut += len(a) + len(b) < len(a0) + len(b0)
  assert cut > 0.9 * len(p["input_ids"])
  assert c["word_starts"][:, 1].all()


def test_phased_source_switches_at_the_step(pairs):
  tok, p = pairs
  special = [tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]
  m = pt.Masker(pt.MaskConfig(0.2, 26), tok.get_vocab_size(), special, tok.token_to_id("[MASK]"))
  short = loader.BatchSource(crop_pairs(p, 64), 16, 0, transform=m)
  full = loader.BatchSource(p, 8, 0, transform=m)
  src = PhasedSource(short, full, until=5)
  assert src.batch(4)["input_ids"].shape == (16, 64) and src.batch(5)["input_ids"].shape == (8, 128)
  np.testing.assert_array_equal(src.batch(5)["input_ids"], full.batch(0)["input_ids"])
  np.testing.assert_array_equal(src.batch(3)["masked_labels"], short.batch(3)["masked_labels"])
  assert src.steps_per_epoch == full.steps_per_epoch
