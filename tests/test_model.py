"""BERT modules: padding invariance, parity with transformers, dtypes, logical axes, tree mode, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bertjax.artifacts.mapping import to_hf_state
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig, PRESETS
from bertjax.models.heads import HEADS, BertForPreTraining


def tiny(**kw):
  return BertConfig.from_preset("tiny", vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, **kw)


def batch(rng=0, b=3, t=20):
  r = np.random.RandomState(rng)
  ids = r.randint(5, 97, (b, t)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, t // 2:] = 1
  return ids, types


def test_padding_does_not_change_outputs_at_real_positions():
  model = BertForPreTraining(tiny(), nnx.Rngs(0))
  ids, types = batch()
  mask = np.ones_like(ids)
  seq, pooled = model.bert(ids, types, mask)
  pad = 9
  ids_p = np.concatenate([ids, np.zeros((3, pad), np.int32)], 1)
  types_p = np.concatenate([types, np.zeros((3, pad), np.int32)], 1)
  mask_p = np.concatenate([mask, np.zeros((3, pad), np.int32)], 1)
  seq_p, pooled_p = model.bert(ids_p, types_p, mask_p)
  np.testing.assert_allclose(seq_p[:, :20], seq, atol=2e-6)
  np.testing.assert_allclose(pooled_p, pooled, atol=2e-6)
  # ...while a mask that lets padding in does change them (the test can fail).
  seq_bad, _ = model.bert(ids_p, types_p, np.ones_like(mask_p))
  assert np.abs(np.asarray(seq_bad[:, :20]) - np.asarray(seq)).max() > 1e-3


def test_masked_positions_head_equals_full_head_gathered():
  model = BertForPreTraining(tiny(), nnx.Rngs(1))
  ids, types = batch(1)
  full, nsp = model(ids, types)
  pos = np.array([[1, 4, 7], [2, 2, 0], [19, 3, 5]], np.int32)
  part, nsp2 = model(ids, types, None, pos)
  np.testing.assert_allclose(part, np.take_along_axis(np.asarray(full), pos[..., None], 1), atol=1e-5)
  np.testing.assert_allclose(nsp, nsp2, atol=1e-6)


def test_matches_transformers_bert_for_pretraining():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = tiny()
  model = BertForPreTraining(cfg, nnx.Rngs(2))
  hf_cfg = transformers.BertConfig(vocab_size=97, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=512, max_position_embeddings=64)
  hf = transformers.BertForPreTraining(hf_cfg).eval()
  state = {k: torch.tensor(v) for k, v in to_hf_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
  missing, unexpected = hf.load_state_dict(state, strict=False)
  assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  hf.tie_weights()
  ids, types = batch(2)
  mask = np.ones_like(ids)
  mask[1, 14:] = 0
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), token_type_ids=torch.tensor(types, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long))
  mlm, nsp = model(ids, types, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(mlm)[real], out.prediction_logits.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(nsp, out.seq_relationship_logits.numpy(), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
  m32 = BertForPreTraining(tiny(), nnx.Rngs(3))
  m16 = BertForPreTraining(tiny(dtype="bfloat16"), nnx.Rngs(3))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(m16, nnx.Param)))
  ids, types = batch(3)
  seq32, _ = m32.bert(ids, types)
  seq16, _ = m16.bert(ids, types)
  assert seq16.dtype == jnp.bfloat16
  mlm16, nsp16 = m16(ids, types)
  assert mlm16.dtype == jnp.float32 and nsp16.dtype == jnp.float32  # logits (and so losses) in float32
  diff = np.abs(np.asarray(seq16, np.float32) - np.asarray(seq32)).max()
  assert 0 < diff < 0.1, diff


def test_every_parameter_has_logical_axis_names():
  model = BertForPreTraining(tiny(), nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == v.ndim, (path, names)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_heads_build_and_run_in_tree_mode(head):
  cls = HEADS[head]
  args = (tiny(), 3) if head in ("sequence_classification", "token_classification") else (tiny(),)
  model = cls(*args, rngs=nnx.Rngs(0))
  with nnx.set_graph_mode(False):
    graphdef, state = nnx.split(model)
    model2 = nnx.merge(graphdef, state)
  ids, types = batch()
  out1, out2 = model(ids, types), model2(ids, types)
  for a, b in zip(jax.tree_util.tree_leaves(out1), jax.tree_util.tree_leaves(out2)):
    np.testing.assert_array_equal(a, b)


def test_dropout_uses_explicit_keys():
  cfg = BertConfig.from_preset("tiny", vocab_size=97, max_position_embeddings=64)
  model = BertForPreTraining(cfg, nnx.Rngs(0))
  ids, types = batch()
  run = lambda k: model(ids, types, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(k)))[1]
  np.testing.assert_array_equal(run(1), run(1))
  assert np.abs(np.asarray(run(1)) - np.asarray(run(2))).max() > 0


def test_presets_match_published_shapes():
  assert {k: (v["num_hidden_layers"], v["hidden_size"]) for k, v in PRESETS.items()} == {
      "tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768),
      "large": (24, 1024)}
  base = BertConfig.from_preset("base")
  assert (base.intermediate_size, base.num_attention_heads, base.layer_norm_eps) == (3072, 12, 1e-12)


def test_config_errors_are_user_errors():
  with pytest.raises(UserError, match="not divisible"):
    BertConfig(hidden_size=100, num_attention_heads=3)
  with pytest.raises(UserError, match="preset"):
    BertConfig.from_preset("huge")
