"""One sequence-classification stack: GLUE is the classification task with GLUE's data hooks, and classification
packs examples (`data.packing`) the way GLUE does: a packed batch gives the same loss as the plain one."""

import numpy as np
import pytest

from test_classify_data import ROWS, config, write


def test_glue_is_the_classification_task():
  from bertjax.tasks.classify import ClassificationTask
  from bertjax.tasks.glue import GlueTask
  assert issubclass(GlueTask, ClassificationTask)
  shared = ("prepare", "build_model", "train_source", "eval_batches", "loss_fn", "predict_step", "compute_metrics",
            "save_assets")
  assert [m for m in shared if getattr(GlueTask, m) is not getattr(ClassificationTask, m)] == []


def test_packed_classification_loss_equals_plain(tmp_path, cache_dir):
  import jax.numpy as jnp
  from flax import nnx
  from bertjax.errors import UserError
  from bertjax.tasks.classify import ClassificationTask
  rows = [(f"{t}{' very' * i}", label) for i in range(3) for t, label in ROWS]  # 18 rows of 3 to 7 tokens
  train = write(tmp_path / "t.jsonl", rows)
  c = config(tmp_path, cache_dir, train_file=train, validation_file=train, packing=True)
  c.training.update(global_batch_size=16, eval_batch_size=16)
  c.model.update(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  task = ClassificationTask(c, str(tmp_path / "wd"))
  task.prepare()
  packed = task.train_source().batch(0)
  c.data.packing = False
  plain = task.train_source().batch(0)
  assert plain["input_ids"].shape == (16, 16) and packed["input_ids"].shape == (8, 16)  # 16 examples in 8 rows
  np.testing.assert_array_equal(packed["labels"], plain["labels"])
  model = task.build_model(nnx.Rngs(0))
  (lp, mp), (lu, mu) = (task.loss_fn(model, {k: jnp.asarray(v) for k, v in b.items()}, None, True)
                        for b in (packed, plain))
  assert float(lu) > 0.5  # three classes, an untrained head: about log 3
  np.testing.assert_allclose(float(lp), float(lu), rtol=1e-5)
  assert [float(x) for x in mp["accuracy"]] == [float(x) for x in mu["accuracy"]] and float(mu["accuracy"][1]) == 16

  multi = write(tmp_path / "m.jsonl", [(t, [label]) for t, label in ROWS])
  with pytest.raises(UserError, match=r"data.packing=True does not combine with data.multi_label=True"):
    ClassificationTask(config(tmp_path, cache_dir, train_file=multi, multi_label=True, packing=True), str(tmp_path))
