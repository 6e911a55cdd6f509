"""Masking statistics, NSP pairs, sharded on-disk pair arrays and the preprocessing caches on BBC News."""

import gc
import glob
import logging
import os
import sys

import numpy as np
import pytest

from bertjax.data import cache, corpus, pretraining as pt, tokenizer as toklib
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
  # Provenance names documents by their row in the tokenized dataset.
  docs = [np.concatenate([np.asarray(s, np.int32) for s in d]) if d else None for d in tokenized["ids"]]
  offs = [np.cumsum([0] + [len(s) for s in d]) for d in tokenized["ids"]]
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


# -- sharded pairs on disk, caches -------------------------------------------------------------------------------
def _pairs(tokenized, tok, cache_dir, num_proc=None, **cfg):
  cfg = pt.PairConfig(**{"max_seq_length": 64, "seed": 3, **cfg})
  return pt.create_pairs(tokenized, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), cfg, cache_dir, num_proc)


def test_sharded_pairs_are_memory_mapped_and_independent_of_num_proc(pairs, tmp_path):
  tok, tokenized, whole = pairs
  assert all(isinstance(v, np.memmap) and not v.flags.writeable for v in whole.values())
  one = _pairs(tokenized, tok, str(tmp_path / "a"), shard_docs=100)  # 400 documents -> 4 shards of 100
  two = _pairs(tokenized, tok, str(tmp_path / "b"), num_proc=2, shard_docs=100)
  assert set(one) == set(two) == set(pt.PAIR_COLUMNS)
  for k in one:
    np.testing.assert_array_equal(one[k], two[k])
  prov = one["provenance"]
  shard_a, shard_b = prov[:, 0] // 100, prov[:, 3] // 100
  np.testing.assert_array_equal(shard_a, shard_b)  # B, random or not, comes from A's shard
  np.testing.assert_array_equal(shard_a, np.sort(shard_a))  # shards in order, each with its pairs
  assert np.unique(shard_a).tolist() == [0, 1, 2, 3]
  assert 0.45 <= one["nsp_labels"].mean() <= 0.62
  # Shard 0 keeps the single-stream seed: its pairs are exactly those of an unsharded run over its documents.
  first = _pairs(tokenized.select(range(100)), tok, str(tmp_path / "c"))
  n0 = int((shard_a == 0).sum())
  assert n0 == len(first["nsp_labels"])
  np.testing.assert_array_equal(one["input_ids"][:n0], first["input_ids"])


def test_unreadable_pair_cache_is_rebuilt(pairs, tmp_path, caplog):
  tok, tokenized, _ = pairs
  small = tokenized.select(range(60))
  first = {k: np.array(v) for k, v in _pairs(small, tok, str(tmp_path)).items()}
  (folder,) = glob.glob(str(tmp_path / "pairs" / "*"))
  with open(os.path.join(folder, "input_ids.npy"), "r+b") as f:
    f.truncate(os.path.getsize(f.name) // 2)
  with caplog.at_level(logging.WARNING):
    again = _pairs(small, tok, str(tmp_path))
  assert "unreadable" in caplog.text and "mmap length" in caplog.text
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  assert glob.glob(str(tmp_path / "pairs" / "*")) == [folder]  # no temporary or broken folders left behind


def test_store_publish_keeps_the_first_finished_copy(tmp_path, caplog):
  folder = str(tmp_path / "store")

  def build(value):
    tmp = cache.new_build_folder(folder)
    np.save(os.path.join(tmp, "x.npy"), np.full(3, value))
    return tmp

  a, b = build(1), build(2)  # two processes building the same store at once
  cache.publish(a, folder, ["x"], 3)
  cache.publish(b, folder, ["x"], 3)  # finds a finished store: drops its own copy
  assert cache.open_store(folder)["x"].tolist() == [1, 1, 1]
  assert os.listdir(tmp_path) == ["store"]
  os.remove(os.path.join(folder, "meta.json"))  # a broken store is replaced by the next finished build
  with caplog.at_level(logging.WARNING):
    assert cache.open_store(folder) is None
    cache.publish(build(3), folder, ["x"], 3)
  assert cache.open_store(folder)["x"].tolist() == [3, 3, 3]
  assert os.listdir(tmp_path) == ["store"] and "meta.json" in caplog.text


def _mlm_config(corpus_spec, cache_dir):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs import mlm
  c = mlm.get_config()
  c.data.corpus, c.data.cache_dir, c.data.vocab_size, c.data.max_seq_length = corpus_spec, cache_dir, 1000, 64
  c.model.max_position_embeddings = 64
  return c


def test_prepare_rebuilds_every_corrupt_cache(small_corpus, tmp_path, caplog):
  """Truncated tokenized-documents and pair caches: prepare() warns and rebuilds the same pairs; a truncated
  tokenizer is trained again."""
  import datasets
  from bertjax.tasks.pretraining import PretrainingTask

  def prepare(workdir):
    task = PretrainingTask(_mlm_config(small_corpus, str(tmp_path / "cache")), str(tmp_path / workdir))
    task.prepare()
    return task

  def truncate(paths):
    for path in paths:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)

  first = prepare("w1")
  # Copies: truncating a file under a live memory map would be a bus error (published cache files are never
  # modified in place, only replaced by a rename).
  expected = {s: {k: np.array(v) for k, v in getattr(first, s).items()} for s in ("train_pairs", "eval_pairs")}
  first_tok = toklib.fingerprint(first.tok)
  del first
  gc.collect()
  arrow = glob.glob(str(tmp_path / "cache" / "datasets" / "**" / "cache-*.arrow"), recursive=True)
  tokenized = [f for f in arrow if "word_starts" in datasets.Dataset.from_file(f).column_names]
  pair_files = glob.glob(str(tmp_path / "cache" / "pairs" / "*" / "input_ids.npy"))
  assert len(tokenized) == len(pair_files) == 2  # train and eval
  truncate(tokenized + pair_files)
  with caplog.at_level(logging.WARNING):
    again = prepare("w2")
  assert caplog.text.count("tokenized-documents cache") == 2, caplog.text
  assert caplog.text.count("pairs") >= 2 and caplog.text.count("rebuilding it") == 4
  assert toklib.fingerprint(again.tok) == first_tok
  for split, arrays in expected.items():
    for k, v in arrays.items():
      np.testing.assert_array_equal(v, getattr(again, split)[k])
  del again
  gc.collect()

  (tok_file,) = glob.glob(str(tmp_path / "cache" / "tokenizers" / "*" / "tokenizer.json"))
  truncate([tok_file])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    third = prepare("w3")
  assert "cached tokenizer is unreadable" in caplog.text
  assert toklib.fingerprint(toklib.load(tok_file)) == toklib.fingerprint(third.tok)  # the cache holds it again
  assert len(third.train_pairs["nsp_labels"]) > 1000


def test_tokenizer_save_replaces_files_atomically(bbc_tokenizer, tmp_path):
  tok, _ = bbc_tokenizer
  folder = tmp_path / "tok"
  folder.mkdir()
  (folder / "tokenizer.json").write_text("{truncated")
  toklib.save(tok, str(folder))
  assert sorted(os.listdir(tmp_path)) == ["tok"]  # the temporary folder is gone
  assert sorted(os.listdir(folder)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                        "vocab.txt"]
  assert toklib.fingerprint(toklib.load(str(folder))) == toklib.fingerprint(tok)


def test_corpus_by_url(small_corpus, tmp_path):
  local = corpus.load_documents(small_corpus, str(tmp_path / "a"))
  by_url = corpus.load_documents("file://" + small_corpus, str(tmp_path / "b"))
  glob_url = corpus.load_documents(f"file://{small_corpus}/00*.txt", str(tmp_path / "c"))
  assert by_url["text"] == local["text"] and len(local) == 203
  assert glob_url["text"] == local["text"][:10]
  for url, msg in [("nosuchscheme://bucket/corpus/*.txt", "Protocol not known: nosuchscheme"),
                   (f"file://{tmp_path}/missing/*.txt", "matches no .txt/.json/.jsonl/.parquet files")]:
    with pytest.raises(UserError, match=msg) as e:
      corpus.load_documents(url, str(tmp_path / "d"))
    assert "\n" not in str(e.value) and url in str(e.value)


_BUILD_PAIRS = """
import hashlib, sys
import numpy as np
from bertjax.data import corpus, pretraining as pt, tokenizer as toklib
corpus_dir, cache_dir, tok_file = sys.argv[1:]
tok = toklib.load(tok_file)
docs = corpus.load_documents(corpus_dir, cache_dir)
tokenized = pt.tokenize_documents(docs, tok, toklib.fingerprint(tok))
out = pt.create_pairs(tokenized, 2, 3, pt.PairConfig(max_seq_length=64, shard_docs=50), cache_dir)
digest = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes() for v in out.values())).hexdigest()
print(len(out["nsp_labels"]), digest)
"""


def test_processes_sharing_a_cache_build_it_once(bbc_tokenizer, small_corpus, tmp_path):
  """Two processes preparing the same pairs at once: both get identical arrays, one published cache folder."""
  import subprocess
  tok_file = str(tmp_path / "tokenizer.json")
  bbc_tokenizer[0].save(tok_file)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), ".."),
                                                     os.environ.get("PYTHONPATH", "")]))
  cmd = [sys.executable, "-c", _BUILD_PAIRS, small_corpus, str(tmp_path / "cache"), tok_file]
  procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
  results = [o[0].split() for o in outs]
  assert results[0] == results[1] and int(results[0][0]) > 1000
  assert len(os.listdir(tmp_path / "cache" / "pairs")) == 1  # one folder, no temporary ones left
