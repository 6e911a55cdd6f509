"""Domain-adaptive pretraining (configs/dapt.py): a run from an HF folder or a bertjax run keeps the source's
vocabulary (same token ids, nothing trained) and weights at step 0, and a classifier fine-tuned from the domain run
starts from its encoder. A tiny bare `BertModel` (hidden 32, no MLM head) on 200 BBC News articles."""

import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bertjax.data import tokenizer as toklib
from bertjax.errors import UserError
from bertjax.train import checkpoint
from bertjax.train.trainer import Trainer, train_and_evaluate
from test_classify_data import ROWS, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import classify, dapt  # noqa: E402


def dapt_config(corpus, cache_dir, **init):
  c = dapt.get_config()
  c.update(init)
  c.data.update(corpus=corpus, cache_dir=cache_dir, max_seq_length=64, max_predictions_per_seq=10, num_proc=1)
  t = c.training
  t.global_batch_size, t.eval_batch_size = 16, 16
  t.num_train_steps, t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 1, 1, 100, 1
  t.async_checkpointing = False
  c.optimizer.update(learning_rate=1e-3, warmup_fraction=0.0)  # one step that moves the weights
  return c


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": np.asarray(v)})
  return out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bbc_tokenizer):
  """A bare HF `BertModel` (no MLM head) with a WordPiece tokenizer, and its weights."""
  transformers = pytest.importorskip("transformers")
  folder = tmp_path_factory.mktemp("hf")
  tok = bbc_tokenizer[0]
  hf = transformers.BertModel(transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                                      num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, max_position_embeddings=64))
  hf.save_pretrained(str(folder))
  toklib.save(tok, str(folder), True)
  return str(folder), {k: v.detach().numpy() for k, v in hf.state_dict().items()}


@pytest.fixture(scope="module")
def domain_run(hf_folder, small_corpus, cache_dir, tmp_path_factory):
  """One step of configs/dapt.py from the HF folder, with vocabulary training disabled."""
  wd = str(tmp_path_factory.mktemp("dapt"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(toklib, "train", refuse_training)
    train_and_evaluate(dapt_config(small_corpus, cache_dir, init_from_hf=hf_folder[0]), wd)
  return wd


def refuse_training(*a, **k):
  raise AssertionError("a vocabulary was trained")


def test_dapt_from_an_hf_folder_keeps_vocabulary_and_encoder(hf_folder, domain_run, small_corpus, cache_dir,
                                                             tmp_path, monkeypatch):
  folder, sd = hf_folder
  monkeypatch.setattr(toklib, "train", refuse_training)
  tr = Trainer(dapt_config(small_corpus, cache_dir, init_from_hf=folder), str(tmp_path / "dapt"))
  tr.setup()
  assert tr.task.tok.get_vocab() == toklib.load(folder).get_vocab() and tr.task.tok_source == folder
  assert tr.task.model_config.hidden_size == 32 and tr.task.model_config.num_hidden_layers == 2  # no preset
  p = tr.init_state().params
  np.testing.assert_array_equal(np.asarray(p["bert"]["embeddings"]["word_embeddings"]["embedding"]),
                                sd["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(np.asarray(p["bert"]["encoder"]["layer"][1]["output"]["dense"]["kernel"]),
                                sd["encoder.layer.1.output.dense.weight"].T)
  # the finished domain run wrote the same vocabulary, and its encoder moved
  assert toklib.load(os.path.join(domain_run, "tokenizer")).get_vocab() == toklib.load(folder).get_vocab()
  trained = flat(checkpoint.load_params(domain_run)[0])
  assert not np.array_equal(trained["bert/embeddings/word_embeddings/embedding"],
                            sd["embeddings.word_embeddings.weight"])


def test_continue_a_domain_run_and_finetune_from_it(domain_run, small_corpus, cache_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(toklib, "train", refuse_training)
  domain = flat(checkpoint.load_params(domain_run)[0])
  tr = Trainer(dapt_config(small_corpus, cache_dir, init_checkpoint=domain_run), str(tmp_path / "more"))
  tr.setup()
  assert tr.task.tok.get_vocab() == toklib.load(os.path.join(domain_run, "tokenizer")).get_vocab()
  start = flat(jax.device_get(tr.init_state().params))
  assert start.keys() == domain.keys()  # the MLM head too: a bertjax pretraining run has one
  for k in domain:
    np.testing.assert_array_equal(start[k], domain[k], err_msg=k)

  f = classify.get_config()
  f.init_from_hf, f.init_checkpoint = "", domain_run
  f.data.update(train_file=write(tmp_path / "t.jsonl", ROWS * 2), cache_dir=cache_dir, max_seq_length=16)
  f.training.update(global_batch_size=8, eval_batch_size=8)
  clf = Trainer(f, str(tmp_path / "clf"))
  clf.setup()
  got = flat(jax.device_get(clf.init_state().params))
  encoder = [k for k in domain if k.startswith("bert/")]
  assert encoder and set(encoder) <= set(got)
  for k in encoder:
    np.testing.assert_array_equal(got[k], domain[k], err_msg=k)
  assert not any(k.startswith("cls/") for k in got) and got["classifier/kernel"].shape[-1] == 3  # a fresh head


def test_dapt_refuses_another_vocabulary_and_never_trains_one(domain_run, small_corpus, cache_dir, tmp_path,
                                                              monkeypatch):
  monkeypatch.setattr(toklib, "train", refuse_training)
  other = tmp_path / "other.txt"  # the same tokens, two ids swapped
  words = open(os.path.join(domain_run, "tokenizer", "vocab.txt")).read().split("\n")
  words[10], words[11] = words[11], words[10]
  other.write_text("\n".join(words))
  c = dapt_config(small_corpus, cache_dir, init_checkpoint=domain_run)
  c.data.tokenizer = str(other)
  with pytest.raises(UserError, match="other token ids"):
    Trainer(c, str(tmp_path / "a")).setup()
  bare = tmp_path / "bare"  # a run without its tokenizer/ folder
  shutil.copytree(domain_run, bare, ignore=shutil.ignore_patterns("tokenizer"))
  with pytest.raises(UserError, match="comes without a tokenizer"):
    Trainer(dapt_config(small_corpus, cache_dir, init_checkpoint=str(bare)), str(tmp_path / "b")).setup()
  with pytest.raises(UserError, match="vocab_size=0"):
    Trainer(dapt_config(small_corpus, cache_dir), str(tmp_path / "c")).setup()


def test_dapt_needs_a_corpus(cache_dir, tmp_path):
  with pytest.raises(UserError, match="data.corpus is empty"):
    Trainer(dapt_config("", cache_dir, init_from_hf="unused"), str(tmp_path)).setup()
