"""Memory / compile options. model.scan_layers / model.remat: the same parameter tree, outputs and gradients as the
plain layer loop, and HF import -> forward -> export stays exact with the layers scanned; the persistent XLA
compilation cache: on by default under the bertjax cache, a folder or 'off' from the config or the environment."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bertjax.artifacts.mapping import canonical_hf_state, from_hf_state, to_hf_state
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig, BertModel

CFG = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(seed=0, b=3, t=16):
  r = np.random.RandomState(seed)
  ids = r.randint(1, 99, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, 10:], mask[2, 5:] = 0, 0
  types = (np.arange(t)[None] >= t // 2).astype(np.int32).repeat(b, 0)
  return jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask)


def _outputs_and_grads(cfg, params):
  graphdef, _ = nnx.split(BertModel(cfg, nnx.Rngs(1)), nnx.Param)
  ids, types, mask = _batch()

  def loss(p):
    seq, pooled = nnx.merge(graphdef, p)(ids, types, mask, deterministic=False, rngs=nnx.Rngs(dropout=0))
    return (seq * mask[..., None]).sum() + pooled.sum(), seq
  (_, seq), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return seq, grads


def test_scan_and_remat_give_the_plain_loop_outputs_and_gradients():
  model = BertModel(CFG, nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  ref_seq, ref_grads = _outputs_and_grads(CFG, params)
  for kw in (dict(scan_layers=True), dict(remat="full"), dict(remat="dots", scan_layers=True)):
    cfg = dataclasses.replace(CFG, **kw)
    # the same parameter tree (paths, shapes): checkpoints and HF conversion are unaffected by the option
    other = nnx.state(BertModel(cfg, nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(other) == jax.tree.structure(params)
    seq, grads = _outputs_and_grads(cfg, params)
    np.testing.assert_allclose(np.asarray(seq), np.asarray(ref_seq), atol=1e-6, rtol=0, err_msg=str(kw))
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) and max(float(jnp.abs(g).max()) for g in ref_flat) > 1e-2
    for g, r in zip(flat, ref_flat):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5, err_msg=str(kw))


def test_scan_refuses_layers_of_different_shapes():
  model = BertModel(dataclasses.replace(CFG, scan_layers=True), nnx.Rngs(0))
  layer = model.encoder.layer[1].intermediate
  layer.dense = nnx.Linear(32, 8, rngs=nnx.Rngs(0))  # e.g. a pruned layer
  model.encoder.layer[1].output.dense = nnx.Linear(8, 32, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"^model.scan_layers=True needs .*set model.scan_layers=False$"):
    model(*_batch())


def test_hf_import_forward_export_exact_with_scan():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64)
  hf_model = transformers.BertModel(hf_cfg).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  state, _ = canonical_hf_state({k: v.numpy() for k, v in hf_model.state_dict().items()})
  model = BertModel(dataclasses.replace(CFG, scan_layers=True), nnx.Rngs(0))
  graphdef, template = nnx.split(model, nnx.Param)
  params, missing, unused = from_hf_state({"bert": nnx.to_pure_dict(template)}, state)
  assert missing == [] and unused == []
  nnx.replace_by_pure_dict(template, params["bert"])
  ids, types, mask = _batch()
  seq, pooled = jax.jit(lambda p: nnx.merge(graphdef, p)(ids, types, mask))(template)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                   token_type_ids=torch.tensor(np.asarray(types), dtype=torch.long),
                   attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long))
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(seq)[real], ref.last_hidden_state.numpy()[real], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
  back = to_hf_state({"bert": nnx.to_pure_dict(template)})
  assert back.keys() == state.keys()
  for k, v in state.items():
    assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k


def test_compilation_cache_default_override_and_off(monkeypatch, tmp_path):
  from bertjax import main
  from bertjax.config import base_config
  before = jax.config.jax_compilation_cache_dir
  try:
    config = base_config()
    config.data.cache_dir = str(tmp_path / "cache")
    monkeypatch.delenv("BERTJAX_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert main.compilation_cache(config) == str(tmp_path / "cache" / "xla_compilation_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "xla_compilation_cache")
    monkeypatch.setenv("BERTJAX_COMPILATION_CACHE", str(tmp_path / "env"))
    assert main.compilation_cache(config) == str(tmp_path / "env")
    config.compilation_cache = str(tmp_path / "cfg")  # the config wins over the environment
    assert main.compilation_cache(config) == str(tmp_path / "cfg")
    jax.config.update("jax_compilation_cache_dir", before)
    config.compilation_cache = "off"
    assert main.compilation_cache(config) is None and jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
