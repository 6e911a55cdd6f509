"""Attention kernels: splash (Pallas interpreter on CPU) equals XLA in float32, outputs and gradients; packed
segments attend only within themselves; `auto` picks XLA on CPU and says so; fused kernels fail in one line."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from bertjax.errors import UserError
from bertjax.models import attention
from bertjax.models.bert import BertConfig, BertModel

B, T, H, D = 2, 128, 2, 16


def _qkv(seed=0):
  r = np.random.RandomState(seed)
  return [jnp.asarray(r.randn(B, T, H, D).astype(np.float32)) for _ in range(3)]


def _segments():
  seg = np.zeros((B, T), np.int32)
  seg[0, :100] = 1  # one example, 28 padding tokens
  seg[1, :30], seg[1, 30:75], seg[1, 75:120] = 1, 2, 3  # three packed examples, 8 padding tokens
  return jnp.asarray(seg)


def _loss_and_grads(impl, q, k, v, weights, **masks):
  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, implementation=impl, interpret=impl == "splash", **masks)
    return (out * weights).sum(), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("form", ["padding", "segments"])
def test_splash_equals_xla_outputs_and_gradients(form):
  q, k, v = _qkv()
  seg = _segments()
  masks = {"key_mask": seg > 0} if form == "padding" else {"segment_ids": seg}
  # the loss reads only real tokens: padding queries' outputs are unused (and differ by design between kernels)
  weights = jnp.asarray(np.random.RandomState(1).randn(B, T, H, D).astype(np.float32)) * (seg > 0)[..., None, None]
  out_x, g_x = _loss_and_grads("xla", q, k, v, weights, **masks)
  out_s, g_s = _loss_and_grads("splash", q, k, v, weights, **masks)
  real = np.asarray(seg > 0)
  np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], atol=1e-5, rtol=0)
  for name, a, b in zip("qkv", g_s, g_x):
    assert float(jnp.abs(a).max()) > 1e-3, name  # gradients that can differ
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_packed_segments_equal_each_example_alone():
  cfg = BertConfig.from_preset("tiny", vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  graphdef, state = nnx.split(BertModel(cfg, nnx.Rngs(0)))
  run = jax.jit(lambda state, *a, **kw: nnx.merge(graphdef, state)(*a, **kw))
  model = lambda *a, **kw: run(state, *a, **kw)
  r = np.random.RandomState(0)
  lengths = [5, 9, 4]
  t = 24
  ids, types, seg, pos = (np.zeros((1, t), np.int32) for _ in range(4))
  alone = []
  start = 0
  for i, n in enumerate(lengths):
    x = r.randint(1, 64, n)
    tt = (np.arange(n) >= n // 2).astype(np.int32)
    ids[0, start:start + n], types[0, start:start + n] = x, tt
    seg[0, start:start + n], pos[0, start:start + n] = i + 1, np.arange(n)
    one = np.zeros((1, t), np.int32)
    one[0, :n] = x
    one_types = np.zeros((1, t), np.int32)
    one_types[0, :n] = tt
    out, _ = model(jnp.asarray(one), jnp.asarray(one_types), jnp.asarray(one > 0))
    alone.append(np.asarray(out)[0, :n])
    start += n
  packed, _ = model(jnp.asarray(ids), jnp.asarray(types), position_ids=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  start = 0
  for n, ref in zip(lengths, alone):
    np.testing.assert_allclose(np.asarray(packed)[0, start:start + n], ref, atol=1e-5, rtol=0)
    start += n
  # without segment ids the same row mixes the examples (the test above could not pass by accident)
  mixed, _ = model(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(seg > 0), position_ids=jnp.asarray(pos))
  assert float(np.abs(np.asarray(mixed)[0, :5] - alone[0]).max()) > 1e-2


def test_auto_picks_xla_on_cpu_and_logs_it(caplog):
  attention._logged.clear()
  with caplog.at_level(logging.INFO):
    for _ in range(3):  # logged once
      assert attention.choose("auto", dtype=jnp.bfloat16, dropout=0.0, seq_len=128, head_dim=64) == "xla"
  lines = [r.getMessage() for r in caplog.records if "model.attention" in r.getMessage()]
  assert lines == ["model.attention=auto: using xla (no fused attention kernel on cpu)"]
  assert attention.choose("xla", dtype=jnp.float32, dropout=0.1, seq_len=7, head_dim=3) == "xla"


def test_fused_kernels_refused_on_cpu_in_one_line():
  for impl, kernel_need in (("cudnn", "needs an NVIDIA GPU"), ("splash", "needs a TPU")):
    with pytest.raises(UserError) as e:
      attention.choose(impl, dtype=jnp.bfloat16, dropout=0.0, seq_len=128, head_dim=64)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.attention='{impl}' {kernel_need}") and "'xla'" in msg
  with pytest.raises(UserError, match=r"^model.attention='flash' is not one of"):
    BertConfig(attention="flash")
  with pytest.raises(UserError, match=r"^model.remat='some' is not one of"):
    BertConfig(remat="some")
  # through the task config: refused before any data is read or anything written
  from bertjax.config import base_config
  from bertjax.tasks import common
  config = base_config()
  config.model.preset, config.model.attention = "tiny", "cudnn"
  with pytest.raises(UserError, match=r"^model.attention='cudnn' needs an NVIDIA GPU \(this run has cpu"):
    common.check_config(config)


def test_fused_kernel_checks_dtype_shape_and_dropout(monkeypatch):
  monkeypatch.setattr(attention, "_platform", lambda: ("gpu", "NVIDIA H100 80GB HBM3"))
  args = dict(seq_len=128, head_dim=64)
  assert attention.choose("cudnn", dtype=jnp.bfloat16, dropout=0.0, **args) == "cudnn"
  with pytest.raises(UserError, match=r"needs model.dtype bfloat16 or float16 \(got float32\)"):
    attention.choose("cudnn", dtype=jnp.float32, dropout=0.0, **args)
  with pytest.raises(UserError, match=r"does no attention-probability dropout; set model.attention_probs_drop"):
    attention.choose("cudnn", dtype=jnp.bfloat16, dropout=0.1, **args)
  attention._logged.clear()
  assert attention.choose("auto", dtype=jnp.bfloat16, dropout=0.1, **args) == "xla"
  assert attention.choose("auto", dtype=jnp.float32, dropout=0.0, **args) == "xla"
  assert attention.choose("auto", dtype=jnp.bfloat16, dropout=0.0, **args) == "cudnn"
  assert sorted(attention._logged) == [
      "model.attention=auto: using cudnn on NVIDIA H100 80GB HBM3 (dtype bfloat16, sequence 128, attention dropout 0)",
      "model.attention=auto: using xla on NVIDIA H100 80GB HBM3: cudnn does no attention dropout and "
      "model.attention_probs_dropout_prob=0.1",
      "model.attention=auto: using xla on NVIDIA H100 80GB HBM3: cudnn needs model.dtype bfloat16 or float16 "
      "(got float32)"]
  monkeypatch.setattr(attention, "_platform", lambda: ("tpu", "TPU v5 lite"))
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert attention.choose("auto", dtype=jnp.bfloat16, dropout=0.0, seq_len=512, head_dim=64) == "splash"
  assert attention.choose("auto", dtype=jnp.bfloat16, dropout=0.0, seq_len=100, head_dim=64) == "xla"
  with pytest.raises(UserError, match=r"needs a sequence length that is a multiple of 128 \(got 100\)"):
    attention.choose("splash", dtype=jnp.float32, dropout=0.0, seq_len=100, head_dim=64)


def test_model_attention_field_reaches_the_model():
  from bertjax.config import base_config
  from bertjax.tasks import common
  config = base_config()
  config.model.preset, config.model.attention, config.model.remat = "tiny", "xla", "dots"
  config.model.scan_layers = True
  cfg = common.model_config(config, vocab_size=10)
  assert (cfg.attention, cfg.remat, cfg.scan_layers) == ("xla", "dots", True)
  assert dataclasses.replace(cfg, attention="auto").attention == "auto"
  assert isinstance(config, ConfigDict)
