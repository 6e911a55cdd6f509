"""Optimizer pieces: schedules, the weight-decay mask, freezing, LAMB, and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from bertjax.config import base_config
from bertjax.data import ner
from bertjax.errors import UserError
from bertjax.train import optim
from bertjax.train.trainer import Trainer, freeze_patterns


def params():
  return {"bert": {"embeddings": {"LayerNorm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                                  "word_embeddings": {"embedding": jnp.ones((8, 4))}},
                   "encoder": {"layer": {0: {"output": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}},
                                         1: {"output": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}}}}}}


def opt_cfg(**kw) -> ConfigDict:
  c = base_config().optimizer
  c.update(kw)
  return c


def test_warmup_then_linear_or_polynomial_decay():
  s = optim.schedule(opt_cfg(learning_rate=1.0, warmup_steps=10, schedule="linear"), 110)
  np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  p = optim.schedule(opt_cfg(learning_rate=1.0, warmup_steps=10, schedule="polynomial", power=2.0), 110)
  np.testing.assert_allclose([p(10), p(60), p(110)], [1.0, 0.25, 0.0], atol=1e-6)
  f = optim.schedule(opt_cfg(learning_rate=1.0, warmup_fraction=0.1, schedule="linear"), 200)
  np.testing.assert_allclose([f(10), f(20)], [0.5, 1.0], atol=1e-6)
  with pytest.raises(UserError, match="schedule"):
    optim.schedule(opt_cfg(schedule="cosine-ish"), 10)


def test_no_weight_decay_on_layernorm_and_biases():
  mask = optim.decay_mask(params())
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == ["['bert']['embeddings']['word_embeddings']['embedding']",
                     "['bert']['encoder']['layer'][0]['output']['dense']['kernel']",
                     "['bert']['encoder']['layer'][1]['output']['dense']['kernel']"]


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_zero_gradient_moves_only_decayed_weights(name):
  p = params()
  tx, _ = optim.make(opt_cfg(name=name, learning_rate=0.1, weight_decay=0.5, warmup_steps=0), p, 100)
  zero = jax.tree_util.tree_map(jnp.zeros_like, p)
  updates, _ = tx.update(zero, tx.init(p), p)
  assert float(jnp.abs(updates["bert"]["embeddings"]["LayerNorm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(updates["bert"]["encoder"]["layer"][0]["output"]["dense"]["bias"]).max()) == 0.0
  assert float(jnp.abs(updates["bert"]["encoder"]["layer"][0]["output"]["dense"]["kernel"]).max()) > 0.0


def test_sgd_first_update_is_minus_lr_times_gradient():
  p = params()
  tx, _ = optim.make(opt_cfg(name="sgd", learning_rate=0.1, weight_decay=0.0, warmup_steps=0,
                             schedule="constant", max_grad_norm=0.0), p, 100)
  g = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.3), p)
  updates, _ = tx.update(g, tx.init(p), p)
  for u in jax.tree_util.tree_leaves(updates):
    np.testing.assert_allclose(np.asarray(u), -0.03, rtol=1e-6)


def test_freezing_embeddings_and_first_layers():
  t = base_config().training
  t.freeze_embeddings, t.freeze_layers = True, 1
  p = params()
  tx, _ = optim.make(opt_cfg(learning_rate=0.1, warmup_steps=0), p, 100, freeze_patterns(t))
  ones = jax.tree_util.tree_map(jnp.ones_like, p)
  updates, _ = tx.update(ones, tx.init(p), p)
  assert float(jnp.abs(updates["bert"]["embeddings"]["word_embeddings"]["embedding"]).max()) == 0.0
  assert float(jnp.abs(updates["bert"]["encoder"]["layer"][0]["output"]["dense"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(updates["bert"]["encoder"]["layer"][1]["output"]["dense"]["kernel"]).max()) > 0.0


def one_step_updates(make_config, tmp_path, accum: int):
  """The parameter change of one SGD step (lr 1: minus the gradient) and the metrics, with `accum` micro-batches."""
  c = make_config(accum)
  c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.0
  c.optimizer.max_grad_norm = 0.0
  # SGD: the update is lr x gradient, so this compares gradients (Adam's first step is ~lr x sign(gradient),
  # which turns summation-order noise in a near-zero gradient into an lr-sized difference)
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.b1 = "sgd", 1.0, 0.0
  tr = Trainer(c, str(tmp_path / str(accum)))
  tr.setup()
  st = tr.init_state()
  host = tr.task.train_source().batch(0)
  b = tr.put_batch(host)
  init = jax.tree_util.tree_map(np.asarray, st.params)  # before the step: its input buffers are donated
  p, _, m = tr.train_step(st.params, st.opt_state, b, np.int32(0), st.rng)
  return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, p, init), m.compute(), host


def accumulation_error(make_config, tmp_path):
  """The relative difference of the gradients of accum 4 and of one batch (max over tensors of max |diff| / max
  |one batch|, and the whole gradient's norm |diff| / |one batch|), the metrics, the host batch."""
  (p1, m1, host), (p4, m4, _) = (one_step_updates(make_config, tmp_path, a) for a in (1, 4))
  for k in m1:
    assert abs(float(m1[k]) - float(m4[k])) <= 1e-5 * max(1.0, abs(float(m1[k]))), (k, m1[k], m4[k])
  u1, u4 = jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)  # the updates = -gradients
  # the floor covers attention key biases, whose gradient is exactly zero in theory (softmax ignores a
  # per-query constant) and ~1e-12 in float32
  rel = [np.abs(a - b).max() / max(np.abs(a).max(), 1e-6) for a, b in zip(u1, u4)]
  d = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(u1, u4)) / sum(np.sum(a ** 2) for a in u1))
  return max(rel), d, m1, host


def test_gradient_accumulation_matches_one_big_batch(small_corpus, cache_dir, tmp_path):
  """Pretraining: the 4 micro-batches hold different numbers of masked tokens, and still accumulating gives the
  big-batch gradient (each micro-batch's sums are divided by the whole step's masked-token / pair counts)."""
  from test_trainer import tiny_config
  def config(accum):
    c = tiny_config(small_corpus, cache_dir, grad_accum_steps=accum, global_batch_size=32)
    c.data.max_predictions_per_seq, c.data.short_seq_prob = 32, 0.5  # rows of many lengths, none at the cap:
    # the masked-token count (15% of a row) differs between micro-batches
    return c

  worst, rel, m, host = accumulation_error(config, tmp_path)
  counts = host["masked_weights"].reshape(4, -1).sum(1)
  assert len(set(counts.tolist())) > 1, counts  # else averaging micro-batch means would pass too
  assert float(m["mlm_loss"]) > 1.0
  # measured: norm 1.9e-7, worst tensor 5e-6 (float32 summation order); averaging micro-batch means: 1.5e-2 / 2.3e-2
  assert rel < 1e-6 and worst < 1e-4, (rel, worst)


def test_gradient_accumulation_matches_one_big_batch_ner(tmp_path):
  """A fine-tuning task through the default weight (the "loss" metric's count): NER's loss is per real token,
  and the 4 micro-batches hold different token counts."""
  from conftest import shared_data_dir
  from test_ner_squad_tasks import tiny, write_conll
  shared = shared_data_dir()
  if shared is None or not (shared / "conll2003" / "train.txt").is_file():
    pytest.skip("needs ../shared/data/conll2003 (set BERTJAX_SHARED_DATA)")
  data = tmp_path / "conll"
  data.mkdir()
  sentences = ner.read_conll(shared / "conll2003" / "train.txt")[:64]
  for split in ("train", "dev", "test"):
    write_conll(data / f"{split}.txt", sentences)

  def config(accum):
    c = tiny("ner", tmp_path / "cache", data_dir=str(data), max_seq_length=32)
    c.training.global_batch_size, c.training.grad_accum_steps, c.training.num_train_steps = 32, accum, 1
    return c

  worst, rel, m, host = accumulation_error(config, tmp_path)
  counts = (host["labels"] != ner.IGNORE_INDEX).reshape(4, -1).sum(1)
  assert len(set(counts.tolist())) > 1, counts
  assert float(m["loss"]) > 1.0
  # measured: norm 2.2e-7, worst tensor 3.3e-5; averaging micro-batch means: the grad norms alone differ by 9e-4 (7.4713 vs 7.4643)
  assert rel < 1e-6 and worst < 1e-4, (rel, worst)
