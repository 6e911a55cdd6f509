"""Multi-process preprocessing never forks a process whose JAX runtime is up (JAX warns that it can deadlock)."""

import warnings

import jax
import numpy as np

from bertjax.data import cache, corpus, pretraining as pt, tokenizer as toklib


def test_worker_pools_spawn_after_jax_started_and_give_the_same_pairs(bbc_tokenizer, cache_dir, tmp_path):
  tok, _ = bbc_tokenizer
  docs = corpus.load_documents("bbc_news", cache_dir).select(range(120))
  jax.devices()  # the runtime is up, as it is when the trainer prepares data
  cfg = pt.PairConfig(max_seq_length=64, seed=3, shard_docs=60)
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tokenized = pt.tokenize_documents(docs, tok, toklib.fingerprint(tok) + "-spawned", num_proc=2)
    two = pt.create_pairs(tokenized, cls_id, sep_id, cfg, str(tmp_path / "two"), num_proc=2)
  forks = [str(w.message) for w in caught if "os.fork()" in str(w.message)]
  assert not forks, forks
  one = pt.create_pairs(pt.tokenize_documents(docs, tok, toklib.fingerprint(tok)), cls_id, sep_id, cfg,
                        str(tmp_path / "one"))
  for k in pt.PAIR_COLUMNS:
    np.testing.assert_array_equal(one[k], two[k])


def test_the_start_method_comes_back():
  import multiprocess
  before = multiprocess.get_start_method(allow_none=True)
  with cache.spawned_workers(2):
    assert multiprocess.get_start_method() == "spawn"
  assert multiprocess.get_start_method(allow_none=True) == before
  with cache.spawned_workers(1):
    assert multiprocess.get_start_method(allow_none=True) == before
