"""Honest MLM metrics: what the masker did at each chosen position, per-kind accuracy/loss, and the baselines."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from bertjax.data import pretraining as pt, tokenizer as toklib
from bertjax.tasks.pretraining import PretrainingTask, mlm_baselines


@pytest.fixture(scope="module")
def masked(bbc_tokenizer, cache_dir):
  """256 real BBC pairs of <= 64 tokens, masked 30% (split 70/20/10), with the original ids."""
  tok, docs = bbc_tokenizer
  tokenized = pt.tokenize_documents(docs.select(range(150)), tok, toklib.fingerprint(tok))
  cfg = pt.PairConfig(max_seq_length=64, short_seq_prob=0.1, nsp_probability=0.5, seed=5)
  pairs = pt.create_pairs(tokenized, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), cfg, cache_dir)
  b = {k: v[:256] for k, v in pairs.items()}
  special = [tok.token_to_id(t) for t in toklib.SPECIAL_TOKENS]
  m = pt.Masker(pt.MaskConfig(0.3, 24, 0.7, 0.2), tok.get_vocab_size(), special, tok.token_to_id("[MASK]"))
  return tok, b["input_ids"], m(b, np.random.default_rng(0))


def test_masked_kinds_say_what_the_input_holds(masked):
  tok, orig, out = masked
  w, kinds, pos = out["masked_weights"] > 0, out["masked_kinds"], out["masked_positions"]
  assert w.shape == kinds.shape == (256, 24)
  np.testing.assert_array_equal(kinds == 0, ~w)  # unused slots (and only they) have kind 0
  rows = np.arange(256)[:, None].repeat(24, 1)
  new, old = out["input_ids"][rows[w], pos[w]], orig[rows[w], pos[w]]
  k = kinds[w]
  mask_id = tok.token_to_id("[MASK]")
  np.testing.assert_array_equal(new == mask_id, k == pt.KIND_MASK)
  np.testing.assert_array_equal(new[k == pt.KIND_KEPT], old[k == pt.KIND_KEPT])
  # A random replacement equals the original with probability 1/|non-special vocab| only.
  assert (new[k == pt.KIND_RANDOM] != old[k == pt.KIND_RANDOM]).mean() > 0.99
  n = len(k)
  assert n > 3000
  shares = [np.mean(k == kind) for kind in (pt.KIND_MASK, pt.KIND_RANDOM, pt.KIND_KEPT)]
  # The 70/20/10 split within ~3 binomial standard deviations (sd <= 0.0084 at n > 3000).
  np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.025)


def test_baselines_by_hand():
  # Two eval batches; weight-0 slots (padding rows, unused slots) must not count.
  M, R, K = pt.KIND_MASK, pt.KIND_RANDOM, pt.KIND_KEPT
  b1 = {"masked_labels": np.array([[7, 7, 9, 0], [5, 7, 9, 3]]),
        "masked_kinds": np.array([[M, M, K, 0], [R, K, M, M]]),
        "masked_weights": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32),
        "nsp_labels": np.array([1, 0]), "nsp_weights": np.array([1, 1], np.float32)}
  b2 = {"masked_labels": np.array([[7, 3, 0, 0], [7, 7, 7, 7]]),
        "masked_kinds": np.array([[M, K, 0, 0], [M, M, M, M]]),
        "masked_weights": np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.float32),  # second row is eval padding
        "nsp_labels": np.array([1, 1]), "nsp_weights": np.array([1, 0], np.float32)}
  got = mlm_baselines([b1, b2])
  # 9 chosen positions: labels 7 7 9 5 7 9 3 7 3 -> most frequent 7 (4 of 9).
  assert got["mlm_majority_token_id"] == 7
  assert got["mlm_baseline_frequent"] == pytest.approx(4 / 9)
  # [MASK] positions: labels 7 7 9 3 7 -> 3 of 5 are 7.
  assert got["mlm_baseline_frequent_mask"] == pytest.approx(3 / 5)
  # Kept positions (9, 7, 3) copied right, the rest answer 7: 7 7 . 5x 9x 3x 7 -> 3 kept + 3 sevens = 6 of 9.
  assert got["mlm_baseline_copy_kept"] == pytest.approx(6 / 9)
  assert got["nsp_majority_baseline"] == pytest.approx(2 / 3)


def test_loss_fn_reports_each_kind():
  # A stand-in model with fixed logits over a vocabulary of 4; the loss_fn only needs it to be callable.
  M, R, K = pt.KIND_MASK, pt.KIND_RANDOM, pt.KIND_KEPT
  logits = np.log(np.array([[[.7, .1, .1, .1], [.1, .7, .1, .1], [.1, .1, .7, .1]],
                            [[.25, .25, .25, .25], [.1, .1, .1, .7], [.7, .1, .1, .1]]], np.float32))
  batch = {"input_ids": None, "token_type_ids": None, "attention_mask": None, "masked_positions": None,
           "masked_labels": jnp.array([[0, 2, 2], [1, 3, 1]]), "masked_kinds": jnp.array([[M, M, K], [R, K, 0]]),
           "masked_weights": jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32),
           "nsp_labels": jnp.array([0, 1]), "nsp_weights": jnp.array([1, 1], jnp.float32)}
  model = lambda *a, **k: (jnp.asarray(logits), jnp.array([[1.0, 0.0], [1.0, 0.0]]))  # noqa: E731
  task = types.SimpleNamespace(config=ConfigDict({"data": {}}))  # loss_fn reads only data.nsp_loss_weight
  _, m = PretrainingTask.loss_fn(task, model, batch, None, True)
  ratio = {k: float(t) / float(c) for k, (t, c) in m.items() if float(c) > 0}
  # [MASK]: (label 0, argmax 0) right, (label 2, argmax 1) wrong; random: (label 1, uniform row -> argmax 0)
  # wrong; kept: (label 2, argmax 2) and (label 3, argmax 3) right; the weight-0 slot does not count.
  assert ratio["mlm_accuracy_mask"] == pytest.approx(0.5)
  assert ratio["mlm_accuracy_random"] == 0.0
  assert ratio["mlm_accuracy_kept"] == 1.0
  assert ratio["mlm_accuracy"] == pytest.approx(3 / 5)
  assert ratio["mlm_loss_mask"] == pytest.approx(-(np.log(.7) + np.log(.1)) / 2, rel=1e-5)
  assert ratio["mlm_loss_random"] == pytest.approx(-np.log(.25), rel=1e-5)
  assert ratio["mlm_loss_kept"] == pytest.approx(-np.log(.7), rel=1e-5)
  assert ratio["mlm_loss"] == pytest.approx(-(3 * np.log(.7) + np.log(.1) + np.log(.25)) / 5, rel=1e-5)
  assert ratio["nsp_accuracy"] == 0.5
