"""BERT encoder in Flax NNX, laid out 1:1 like Hugging Face's `BertModel`.

Every attribute name matches transformers' module path (`encoder.layer.3.attention.self.query`, ...), so
conversion is a key rename plus a transpose of Linear kernels (see `bertjax/convert`). Post-LayerNorm, exact
(erf) GELU, learned absolute positions, token types, tanh pooler. Parameters are float32; `dtype` sets the
compute dtype; attention softmax runs in float32. Every parameter carries logical axis names that
`bertjax.train.sharding` maps onto the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bertjax.errors import UserError

# Google's published BERT shapes (Turc et al. 2019 miniatures + the paper's base/large).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12),
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture hyperparameters; field names follow transformers' `BertConfig`."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(
          f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
          f"{self.num_attention_heads}; pick a head count that divides the hidden size")
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
    if self.hidden_act not in ("gelu", "gelu_new", "relu"):
      raise UserError(f"model.hidden_act={self.hidden_act!r} is not supported; use 'gelu'")

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "BertConfig":
    if name not in PRESETS:
      raise UserError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)} or ''")
    shape = dict(PRESETS[name])
    shape["intermediate_size"] = 4 * shape["hidden_size"]
    shape.update(overrides)
    return cls(**shape)


def activation(name: str):
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def _init(std: float, names: tuple):
  return nnx.with_partitioning(nnx.initializers.normal(std), names, eager_sharding=False)


def _zeros(names: tuple):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), names, eager_sharding=False)


def dense(cfg: BertConfig, din: int, dout: int, names: tuple, rngs: nnx.Rngs) -> nnx.Linear:
  """A Linear layer with BERT's init (normal(0.02) kernel, zero bias) and logical axis names."""
  return nnx.Linear(din, dout, kernel_init=_init(cfg.initializer_range, names),
                    bias_init=_zeros(names[-1:]), dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                    rngs=rngs)


def layer_norm(cfg: BertConfig, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  ones = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",), eager_sharding=False)
  return nnx.LayerNorm(dim, epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                       scale_init=ones, bias_init=_zeros(("norm",)), rngs=rngs)


def embed(cfg: BertConfig, num: int, names: tuple, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, cfg.hidden_size, embedding_init=_init(cfg.initializer_range, names),
                   dtype=cfg.compute_dtype, param_dtype=jnp.float32, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + learned position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.word_embeddings = embed(cfg, cfg.vocab_size, ("vocab", "embed"), rngs)
    self.position_embeddings = embed(cfg, cfg.max_position_embeddings, (None, "embed"), rngs)
    self.token_type_embeddings = embed(cfg, cfg.type_vocab_size, (None, "embed"), rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, *, deterministic: bool, rngs: nnx.Rngs | None):
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic, rngs=rngs)


class BertSelfAttention(nnx.Module):
  """Multi-head scaled dot-product attention; logits and softmax in float32."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    d = cfg.hidden_size
    self.query = dense(cfg, d, d, ("embed", "heads"), rngs)
    self.key = dense(cfg, d, d, ("embed", "heads"), rngs)
    self.value = dense(cfg, d, d, ("embed", "heads"), rngs)
    self.dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(d // self.num_heads))
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


class BertSelfOutput(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("heads", "embed"), rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.adapter = nnx.data(None)  # a bottleneck adapter set by bertjax.peft (peft.method=adapter)

  def __call__(self, h, residual, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.dropout(self.dense(h), deterministic=deterministic, rngs=rngs)
    if self.adapter is not None:
      h = self.adapter(h, deterministic=deterministic, rngs=rngs)
    return self.LayerNorm(h + residual)


class BertAttention(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.self = BertSelfAttention(cfg, rngs)
    self.output = BertSelfOutput(cfg, rngs)

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.self(x, mask, deterministic=deterministic, rngs=rngs)
    return self.output(h, x, deterministic=deterministic, rngs=rngs)


class BertIntermediate(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
    self.hidden_act = cfg.hidden_act

  def __call__(self, x):
    return activation(self.hidden_act)(self.dense(x))


class BertOutput(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
    self.adapter = nnx.data(None)  # a bottleneck adapter set by bertjax.peft (peft.method=adapter)

  def __call__(self, h, residual, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.dropout(self.dense(h), deterministic=deterministic, rngs=rngs)
    if self.adapter is not None:
      h = self.adapter(h, deterministic=deterministic, rngs=rngs)
    return self.LayerNorm(h + residual)


class BertLayer(nnx.Module):
  """One post-LayerNorm transformer block."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.attention = BertAttention(cfg, rngs)
    self.intermediate = BertIntermediate(cfg, rngs)
    self.output = BertOutput(cfg, rngs)

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    a = self.attention(x, mask, deterministic=deterministic, rngs=rngs)
    return self.output(self.intermediate(a), a, deterministic=deterministic, rngs=rngs)


class BertEncoder(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.layer = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])

  def __call__(self, x, mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    for layer in self.layer:
      x = layer(x, mask, deterministic=deterministic, rngs=rngs)
    return x


class BertPooler(nnx.Module):
  """tanh(dense(hidden state of [CLS]))."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x[:, 0]))


class BertModel(nnx.Module):
  """The encoder: returns (last hidden state [B, T, D], pooled output [B, D] or None)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, add_pooling_layer: bool = True):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs)
    self.encoder = BertEncoder(cfg, rngs)
    self.pooler = BertPooler(cfg, rngs) if add_pooling_layer else None

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
    x = self.encoder(x, mask, deterministic=deterministic, rngs=rngs)
    pooled = self.pooler(x) if self.pooler is not None else None
    return x, pooled
