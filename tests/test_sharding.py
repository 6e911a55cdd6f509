"""Mesh from config (topology-aware, DCN axis), replication fallback, placement onto shardings, 2x2x2 parallelism."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bertjax.errors import UserError
from bertjax.train import sharding


def test_mesh_from_config():
  m = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  assert dict(m.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  m = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, dcn_shape={"data": -1})  # one slice here
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.process_batch_rows(m, 16) == (0, 16)
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  assert one.devices.size == 1
  for shape, dcn, msg in [({"data": -1, "fsdp": -1}, None, "at most one axis may be -1"),
                          ({"data": 3, "fsdp": 1}, None, "needs 3 devices, but 8 are available"),
                          ({"data": -1, "fsdp": 3}, None, "does not divide the 8 devices"),
                          ({"data": -1, "pipe": 2}, None, "unknown axes"),
                          ({"data": -1}, {"data": 2}, "mesh.dcn_shape .* needs 2 slices, but 1 are available")]:
    with pytest.raises(UserError, match=msg):
      sharding.make_mesh(shape, dcn_shape=dcn)


def test_indivisible_dimension_is_replicated_and_logged(caplog):
  m = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = [("vocab", "tensor"), ("embed", "fsdp")]
  with caplog.at_level(logging.INFO):
    spec = sharding.logical_to_spec(("vocab", "embed"), (1001, 128), m, rules, "bert/word_embeddings")
  assert spec == P(None, "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (1000, 128), m, rules) == P("tensor", "fsdp")
  logged = [r.getMessage() for r in caplog.records if "word_embeddings" in r.getMessage()]
  assert logged == ["bert/word_embeddings: dimension 0 (vocab, size 1001) is not divisible by mesh axes tensor (2); "
                    "replicated"]


def _tiny_hf(folder, num_labels=3):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=98, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
  model = transformers.BertForSequenceClassification(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(str(folder))


def _fresh_sharded(cfg, head, num_labels, mesh):
  """Randomly initialised params of `head`, sharded by the default rules, as the trainer makes them."""
  from flax import nnx

  from bertjax.config import base_config
  from bertjax.convert import hf
  rules = [tuple(r) for r in base_config().mesh.logical_axis_rules]
  abstract = nnx.eval_shape(lambda: hf.build_model(cfg, head, num_labels, seed=1))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  init = lambda: nnx.to_pure_dict(nnx.state(hf.build_model(cfg, head, num_labels, seed=1), nnx.Param))
  return jax.jit(init, out_shardings=shardings)(), shardings


def _assert_same(placed, host, shardings):
  flat_p, flat_h, flat_s = (jax.tree_util.tree_leaves_with_path(t) for t in (placed, host, shardings))
  assert [k for k, _ in flat_p] == [k for k, _ in flat_h]
  for (k, a), (_, b), (_, s) in zip(flat_p, flat_h, flat_s):
    assert a.sharding == s, k
    assert np.asarray(a).dtype == b.dtype and np.array_equal(np.asarray(a), b), k


def test_placement_from_hf_and_checkpoint_equals_host_loading(tmp_path):
  """place.from_hf / from_checkpoint build each shard from its slice: the same values and report as the numpy
  loaders, already on the target shardings (fsdp x tensor, with a replicated odd intermediate size)."""
  from bertjax.artifacts import place
  from bertjax.convert import commands, hf
  _tiny_hf(tmp_path / "src")
  cfg = hf.read_config(str(tmp_path / "src"))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  fresh, shardings = _fresh_sharded(cfg, "sequence_classification", 5, mesh)  # 5 labels: a fresh classifier
  kernel = fresh["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  host = jax.tree_util.tree_map(np.asarray, fresh)

  placed, report = place.from_hf(fresh, str(tmp_path / "src"))
  ref, ref_report = hf.init_from_hf(host, str(tmp_path / "src"))
  assert report == ref_report and report.fresh == ["classifier.bias", "classifier.weight"]
  assert any("initialised fresh" in n for n in report.notes)
  _assert_same(placed, ref, shardings)

  commands.from_hf(str(tmp_path / "src"), str(tmp_path / "work"), log=lambda _: None)
  fresh, shardings = _fresh_sharded(cfg, "question_answering", None, mesh)
  host = jax.tree_util.tree_map(np.asarray, fresh)
  placed, report = place.from_checkpoint(fresh, str(tmp_path / "work"))
  ref, ref_report = hf.init_from_checkpoint(host, str(tmp_path / "work"))
  assert report == ref_report and report.fresh == ["qa_outputs.bias", "qa_outputs.weight"]
  assert report.unused == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                           "classifier.weight"]
  _assert_same(placed, ref, shardings)


def test_data_fsdp_tensor_step_equals_single_device(small_corpus, cache_dir, tmp_path):
  """A 2 x 2 x 2 (data x fsdp x tensor) SGD step gives one device's loss and update (tensor parallelism)."""
  from test_trainer import tiny_config

  from bertjax.train.trainer import Trainer

  def cfg(mesh):
    c = tiny_config(small_corpus, cache_dir)
    c.mesh.shape = mesh
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.b1 = "sgd", 1.0, 0.9
    return c
  par = Trainer(cfg({"data": 2, "fsdp": 2, "tensor": 2}), str(tmp_path / "a"))
  par.setup()
  one = Trainer(cfg({"data": 1, "fsdp": 1, "tensor": 1}), str(tmp_path / "b"), devices=jax.devices()[:1])
  one.setup()
  sp, s1 = par.init_state(), one.init_state()
  layer = sp.params["bert"]["encoder"]["layer"][0]
  assert layer["attention"]["self"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["intermediate"]["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["output"]["dense"]["kernel"].sharding.spec == P("tensor", "fsdp")
  init = [np.asarray(x) for x in jax.tree_util.tree_leaves(s1.params)]
  b = par.task.train_source().batch(0)
  pp, _, mp = par.train_step(sp.params, sp.opt_state, par.put_batch(b), np.int32(0), sp.rng)
  p1, _, m1 = one.train_step(s1.params, s1.opt_state, one.put_batch(b), np.int32(0), s1.rng)
  lp, l1 = float(mp.compute()["loss"]), float(m1.compute()["loss"])
  assert abs(lp - l1) <= 1e-5 * abs(l1), (lp, l1)
  moved = 0.0
  for a, c, i in zip(jax.tree_util.tree_leaves(pp), jax.tree_util.tree_leaves(p1), init):
    a, c = np.asarray(a), np.asarray(c)
    moved = max(moved, float(np.abs(c - i).max()))
    # as in test_trainer: updates agree to 5e-4 of the tensor's largest update; a sharding bug is of order 1
    np.testing.assert_allclose(a - i, c - i, rtol=0, atol=5e-4 * max(np.abs(c - i).max(), 1e-6))
  assert moved > 1e-3
