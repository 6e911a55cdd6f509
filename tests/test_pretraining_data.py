"""Masking statistics, NSP pairs and the tokenization cache on the real BBC News corpus."""

import numpy as np
import pytest

from bertjax.data import pretraining as pt, tokenizer as toklib
from bertjax.errors import UserError


@pytest.fixture(scope="module")
def pairs(bbc_tokenizer, cache_dir):
  tok, docs = bbc_tokenizer
  sub = docs.select(range(400))
  tokenized = pt.tokenize_documents(sub, tok, toklib.fingerprint(tok))
  cfg = pt.PairConfig(max_seq_length=64, short_seq_prob=0.1, nsp_probability=0.5, seed=3)
  out = pt.create_pairs(tokenized, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), cfg, cache_dir)
  return tok, tokenized, out


def _masker(tok, **kw):
  special = [tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]
  return pt.Masker(pt.MaskConfig(**kw), tok.get_vocab_size(), special, tok.token_to_id("[MASK]"))


def test_pair_layout_and_nsp_balance(pairs):
  tok, _, p = pairs
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  ids, types, n = p["input_ids"], p["token_type_ids"], len(p["nsp_labels"])
  assert n > 1000
  assert (ids[:, 0] == cls).all()
  assert ((ids == sep).sum(1) == 2).all()  # [CLS] A [SEP] B [SEP]
  assert (p["lengths"] <= 64).all() and (p["lengths"] >= 5).all()
  # Segment B (type 1) runs from after the first [SEP] through the second [SEP].
  for r in range(0, n, 97):
    s1, s2 = np.flatnonzero(ids[r] == sep)
    assert (types[r, :s1 + 1] == 0).all() and (types[r, s1 + 1:s2 + 1] == 1).all() and (types[r, s2 + 1:] == 0).all()
  frac_random = p["nsp_labels"].mean()
  assert 0.45 <= frac_random <= 0.62, frac_random  # 50% by coin + single-sentence chunks forced random


def test_positive_pairs_are_consecutive(pairs):
  tok, tokenized, p = pairs
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  prov, ids = p["provenance"], p["input_ids"]
  docs = [np.concatenate([np.asarray(s, np.int32) for s in d]) for d in tokenized["ids"] if d]
  offs = [np.cumsum([0] + [len(s) for s in d]) for d in tokenized["ids"] if d]
  n_pos = 0
  for r, (d, a0, a1, bd, b0, b1, label, as0, as1, bs0, bs1) in enumerate(prov):
    s1, s2 = np.flatnonzero(ids[r] == sep)
    np.testing.assert_array_equal(ids[r, 1:s1], docs[d][a0:a1])  # A is a contiguous span of its document
    np.testing.assert_array_equal(ids[r, s1 + 1:s2], docs[bd][b0:b1])
    if label == 0:
      n_pos += 1
      assert bd == d and bs0 == as1, "B must start at the sentence right after A's last sentence"
      # Untruncated boundary: A ends where B begins in the document, up to truncation at A's back/B's front.
      assert a1 <= offs[d][as1] <= b0
    else:
      assert bd != d
  assert n_pos > 300


def test_masking_statistics(pairs):
  tok, _, p = pairs
  m = _masker(tok, mask_prob=0.15, max_predictions=20)
  special = np.zeros(tok.get_vocab_size(), bool)
  special[[tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]] = True
  n_cand = n_masked = n_mask_tok = n_random = n_kept = 0
  rng = np.random.default_rng(0)
  for start in range(0, 2048, 256):
    b = {k: v[start:start + 256] for k, v in p.items()}
    out = m(b, rng)
    orig = b["input_ids"]
    w = out["masked_weights"] > 0
    pos = out["masked_positions"]
    rows = np.arange(len(orig))[:, None].repeat(pos.shape[1], 1)
    assert not special[orig[rows[w], pos[w]]].any(), "special tokens must never be masked"
    np.testing.assert_array_equal(out["masked_labels"][w], orig[rows[w], pos[w]])
    new = out["input_ids"][rows[w], pos[w]]
    n_mask_tok += (new == tok.token_to_id("[MASK]")).sum()
    n_kept += (new == orig[rows[w], pos[w]]).sum()
    n_random += ((new != orig[rows[w], pos[w]]) & (new != tok.token_to_id("[MASK]"))).sum()
    changed = out["input_ids"] != orig
    hit = np.zeros_like(orig, bool)
    hit[rows[w], pos[w]] = True
    assert not (changed & ~hit).any(), "only selected positions may change"
    n_cand += (~special[orig]).sum()
    n_masked += w.sum()
  assert abs(n_masked / n_cand - 0.15) < 0.01, n_masked / n_cand
  assert abs(n_mask_tok / n_masked - 0.8) < 0.02
  # A random replacement equal to the original counts as kept: expected 0.1 * (1 - 1/|vocab|).
  assert abs(n_random / n_masked - 0.1) < 0.015
  assert abs(n_kept / n_masked - 0.1) < 0.015


def test_max_predictions_caps_masks(pairs):
  tok, _, p = pairs
  b = {k: v[:128] for k, v in p.items()}
  out = _masker(tok, mask_prob=0.5, max_predictions=7)(b, np.random.default_rng(1))
  assert out["masked_positions"].shape == (128, 7)
  assert out["masked_weights"].sum(1).max() == 7


def test_whole_word_masking_never_splits_a_word(pairs):
  tok, _, p = pairs
  m = _masker(tok, mask_prob=0.15, max_predictions=20, whole_word=True)
  special = np.zeros(tok.get_vocab_size(), bool)
  special[[tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]] = True
  rng = np.random.default_rng(5)
  multi_piece_words_masked = 0
  n_cand = n_masked = 0
  for start in range(0, 1024, 256):
    b = {k: v[start:start + 256] for k, v in p.items()}
    out = m(b, rng)
    masked = np.zeros_like(b["input_ids"], bool)
    w = out["masked_weights"] > 0
    rows = np.arange(len(masked))[:, None].repeat(w.shape[1], 1)
    masked[rows[w], out["masked_positions"][w]] = True
    cand = ~special[b["input_ids"]]
    word = np.cumsum(b["word_starts"] | ~cand, axis=1)
    for r in range(len(masked)):
      for wid in np.unique(word[r][masked[r]]):
        members = (word[r] == wid) & cand[r]
        assert masked[r][members].all(), "a word is masked whole or not at all"
        multi_piece_words_masked += members.sum() > 1
    n_cand += cand.sum()
    n_masked += masked.sum()
  assert multi_piece_words_masked > 50
  assert 0.12 < n_masked / n_cand <= 0.15 + 1e-3


def test_word_starts_follow_tokenizer_word_ids(bbc_tokenizer):
  tok, _ = bbc_tokenizer
  enc = tok.encode("Unbelievably, the transformers tokenised everything.", add_special_tokens=False)
  from datasets import Dataset
  ds = Dataset.from_dict({"text": ["Unbelievably, the transformers tokenised everything."]})
  out = pt.tokenize_documents(ds, tok, toklib.fingerprint(tok))
  starts = out["word_starts"][0][0]
  expected = [int(i == 0 or w != enc.word_ids[i - 1]) for i, w in enumerate(enc.word_ids)]
  assert starts == expected and sum(starts) < len(starts)  # some words span several pieces


def test_tokenization_is_cached(bbc_tokenizer, cache_dir):
  """A rerun with the same tokenizer loads the cached map result instead of tokenizing again."""
  from bertjax.data import corpus
  tok, _ = bbc_tokenizer
  docs = corpus.load_documents("bbc_news", cache_dir).select(range(50))
  first = pt.tokenize_documents(docs, tok, toklib.fingerprint(tok))

  class Poisoned:
    def encode_batch(self, *a, **k):
      raise AssertionError("tokenized again despite the cache")

  second = pt.tokenize_documents(docs, Poisoned(), toklib.fingerprint(tok))
  assert second.cache_files and second.cache_files == first.cache_files
  assert second["ids"][:3] == first["ids"][:3]
  with pytest.raises(Exception, match="tokenized again"):  # a different fingerprint really recomputes
    pt.tokenize_documents(docs, Poisoned(), "another-tokenizer")


def test_masker_rejects_bad_fractions(bbc_tokenizer):
  tok, _ = bbc_tokenizer
  with pytest.raises(UserError, match="mask_prob"):
    _masker(tok, mask_prob=1.5)
  with pytest.raises(UserError, match="frac"):
    _masker(tok, mask_token_frac=0.9, random_token_frac=0.2)
