"""One sequence-classification stack: GLUE is the classification task with GLUE's data hooks, and classification
packs examples (`data.packing`) the way GLUE does: a packed batch gives the same loss as the plain one."""

import numpy as np

from test_classify_data import ROWS, config, write


def test_glue_is_the_classification_task():
  from bertjax.tasks.classify import ClassificationTask
  from bertjax.tasks.glue import GlueTask
  assert issubclass(GlueTask, ClassificationTask)
  shared = ("prepare", "build_model", "train_source", "eval_batches", "loss_fn", "predict_step", "compute_metrics",
            "save_assets")
  assert [m for m in shared if getattr(GlueTask, m) is not getattr(ClassificationTask, m)] == []


def packed_and_plain(tmp_path, cache_dir, name: str, labels, **data):
  """(packed batch, plain batch, packed (loss, metrics), plain (loss, metrics)) of batch 0 of a one-layer model."""
  import jax.numpy as jnp
  from flax import nnx
  from bertjax.tasks.classify import ClassificationTask
  rows = [(f"{t}{' very' * i}", labels(label)) for i in range(3) for t, label in ROWS]  # 18 rows of 3 to 7 tokens
  train = write(tmp_path / f"{name}.jsonl", rows)
  c = config(tmp_path, cache_dir, train_file=train, validation_file=train, **data)
  assert c.data.packing  # the default
  c.training.update(global_batch_size=16, eval_batch_size=16)
  c.model.update(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  task = ClassificationTask(c, str(tmp_path / name))
  task.prepare()
  packed = task.train_source().batch(0)
  c.data.packing = False
  plain = task.train_source().batch(0)
  np.testing.assert_array_equal(packed["labels"], plain["labels"])
  model = task.build_model(nnx.Rngs(0))
  return (packed, plain, *(task.loss_fn(model, {k: jnp.asarray(v) for k, v in b.items()}, None, True)
                           for b in (packed, plain)))


def test_packed_classification_loss_equals_plain(tmp_path, cache_dir):
  packed, plain, (lp, mp), (lu, mu) = packed_and_plain(tmp_path, cache_dir, "single", lambda label: label)
  assert plain["input_ids"].shape == (16, 16) and packed["input_ids"].shape == (8, 16)  # 16 examples in 8 rows
  assert float(lu) > 0.5  # three classes, an untrained head: about log 3
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
  assert [float(x) for x in mp["accuracy"]] == [float(x) for x in mu["accuracy"]] and float(mu["accuracy"][1]) == 16


def test_multi_label_rows_pack_too(tmp_path, cache_dir):
  """Their [N, K] label rows stay per example, whatever K is."""
  packed, plain, (lp, _), (lu, _) = packed_and_plain(tmp_path, cache_dir, "multi", lambda label: [label],
                                                     multi_label=True)
  assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0] and packed["labels"].ndim == 2
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)


def test_regression_rows_pack_too(tmp_path, cache_dir):
  scores = {"pos": 4.5, "neg": 0.5, "neu": 2.5}
  packed, plain, (lp, _), (lu, _) = packed_and_plain(tmp_path, cache_dir, "regression", lambda label: scores[label],
                                                     problem_type="regression")
  assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0] and packed["labels"].dtype == np.float32
  assert float(lu) > 0.5  # MSE of an untrained head against scores 0.5-4.5
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
