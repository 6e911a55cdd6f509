"""BERT encoder in Flax NNX, laid out 1:1 like Hugging Face's `BertModel`.

Every attribute name matches transformers' module path (`encoder.layer.3.attention.self.query`, ...), so
conversion is a key rename plus a transpose of Linear kernels (see `bertjax/convert`). Post-LayerNorm, exact
(erf) GELU, learned absolute positions, token types, tanh pooler. Parameters are float32; `dtype` sets the
compute dtype; attention runs through `bertjax.models.attention` (XLA with a float32 softmax, or a fused cuDNN /
splash kernel; `model.attention`). Every parameter and the main activations (hidden states, queries/keys/values, the
MLP's inner activation) carry logical axis names that `bertjax.train.sharding` / `bertjax.models.partitioning` map
onto the mesh. `remat` recomputes each layer's activations in the backward pass; `scan_layers` runs the layers
under one `jax.lax.scan` (one layer body to compile) while the parameters stay per layer, so checkpoints, HF
conversion and path-based freezing see the same tree either way. A pruned model (`heads_per_layer`, written by
`bertjax.prune`) has fewer heads in some layers: their query/key/value kernels have `heads * head_dim` output
columns and their attention output dense as many input rows, so pruned layers really compute less.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bertjax.errors import UserError
from bertjax.models import attention as attn, partitioning
from bertjax.models.dropout import Dropout

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
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# How a run computes, not what it learnt: free to change between runs of the same checkpoint; not HF config.
# Logical axes of the activations (`partitioning.constrain` pins them on a mesh, through the logical axis rules).
HIDDEN = ("batch", "length", "embed")
QKV = ("batch", "length", "heads", None)
RUNTIME_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dtype", "attention", "remat", "scan_layers")


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
  attention: str = "auto"  # auto | xla | cudnn | splash (bertjax.models.attention)
  remat: str = "none"  # none | full | dots (save only the dense layers' matmul outputs)
  scan_layers: bool = False  # run the layers under jax.lax.scan (faster compiles for deep models)
  heads_per_layer: tuple[int, ...] | None = None  # attention heads kept in each layer (pruned); None: all

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(
          f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
          f"{self.num_attention_heads}; pick a head count that divides the hidden size")
    if self.dtype not in DTYPES:
      raise UserError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
    if self.hidden_act not in ("gelu", "gelu_new", "relu"):
      raise UserError(f"model.hidden_act={self.hidden_act!r} is not supported; use 'gelu'")
    if self.attention not in attn.CHOICES:
      raise UserError(f"model.attention={self.attention!r} is not one of {list(attn.CHOICES)}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"model.remat={self.remat!r} is not one of {list(REMAT_POLICIES)}")
    if self.heads_per_layer is not None:
      self._check_heads_per_layer()

  def _check_heads_per_layer(self) -> None:
    heads = tuple(int(h) for h in self.heads_per_layer)  # a JSON list from checkpoint meta -> a hashable tuple
    object.__setattr__(self, "heads_per_layer", heads)
    if len(heads) != self.num_hidden_layers:
      raise UserError(f"model.heads_per_layer has {len(heads)} entries but num_hidden_layers={self.num_hidden_layers}"
                      "; give one head count per layer")
    bad = [i for i, h in enumerate(heads) if not 1 <= h <= self.num_attention_heads]
    if bad:
      raise UserError(f"model.heads_per_layer[{bad[0]}]={heads[bad[0]]} is outside 1..num_attention_heads="
                      f"{self.num_attention_heads}; every layer keeps at least one attention head")
    if self.scan_layers and len(set(heads)) > 1:
      raise UserError(f"model.scan_layers=True needs layers of one shape but this pruned model keeps {list(heads)} "
                      "heads per layer; set model.scan_layers=False")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def head_columns(self, heads) -> np.ndarray:
    """Indices of the query / key / value columns (and attention-output rows) of the attention heads `heads`."""
    return np.concatenate([np.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in heads])

  def layer_heads(self, i: int) -> int:
    """Attention heads of layer `i` (fewer than num_attention_heads in a pruned model)."""
    return self.num_attention_heads if self.heads_per_layer is None else self.heads_per_layer[i]

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


def gelu(x):
  """Exact (erf) GELU written as transformers writes it, x/2 (1 + erf(x/sqrt(2))). `jax.nn.gelu(approximate=False)`
  uses erfc, which XLA's CPU backend evaluates at about twice the cost of erf (2.2% of a BERT-base CPU step
  before, 1.0% after); the two agree to float32 rounding."""
  return x * 0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.7071067811865476, x.dtype)))


def activation(name: str):
  if name == "gelu":
    return gelu
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


def lookup(table: nnx.Embed, ids, names: tuple = (None, None)):
  """Rows `ids` of an embedding table (as `nnx.Embed` computes them) with the table laid out as `names` first: its
  `embed` shards gathered, as FSDP gathers a weight, so that the lookup never gathers the batch's activations
  (without it XLA all-gathers the whole global batch of embeddings when embed and batch share the fsdp axis)."""
  return jnp.take(partitioning.constrain(table.embedding[...].astype(table.dtype), names), ids, axis=0)


class BertEmbeddings(nnx.Module):
  """Word + learned position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.word_embeddings = embed(cfg, cfg.vocab_size, ("vocab", "embed"), rngs)
    self.position_embeddings = embed(cfg, cfg.max_position_embeddings, (None, "embed"), rngs)
    self.token_type_embeddings = embed(cfg, cfg.type_vocab_size, (None, "embed"), rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)
    self.dropout = Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, *, position_ids=None, deterministic: bool, rngs: nnx.Rngs | None):
    positions = jnp.arange(input_ids.shape[-1])[None, :] if position_ids is None else position_ids
    x = (lookup(self.word_embeddings, input_ids, ("vocab", None)) + lookup(self.position_embeddings, positions)
         + lookup(self.token_type_embeddings, token_type_ids))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic, rngs=rngs)


class BertSelfAttention(nnx.Module):
  """Multi-head scaled dot-product attention through `attention.dot_product_attention` (`cfg.attention`).

  `head_mask` (None, or [heads] / [batch, heads], set from outside) multiplies each head's output: the
  differentiable mask of head-importance scoring (`bertjax.prune`); 0 removes a head's contribution."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, num_heads: int | None = None):
    self.num_heads = cfg.num_attention_heads if num_heads is None else num_heads
    self.head_dim = cfg.head_dim
    self.implementation = cfg.attention
    d, inner = cfg.hidden_size, self.num_heads * cfg.head_dim
    self.query = dense(cfg, d, inner, ("embed", "heads"), rngs)
    self.key = dense(cfg, d, inner, ("embed", "heads"), rngs)
    self.value = dense(cfg, d, inner, ("embed", "heads"), rngs)
    self.dropout = Dropout(cfg.attention_probs_dropout_prob)
    self.head_mask = nnx.data(None)

  def __call__(self, x, mask, segment_ids=None, *, deterministic: bool, rngs: nnx.Rngs | None):
    b, t, _ = x.shape
    split = lambda y: partitioning.constrain(y.reshape(b, t, self.num_heads, self.head_dim), QKV)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    impl = attn.choose(self.implementation, dtype=q.dtype, dropout=self.dropout.rate, seq_len=t,
                       head_dim=self.head_dim)
    drop = lambda p: self.dropout(p, deterministic=deterministic, rngs=rngs)
    out = attn.dot_product_attention(q, k, v, key_mask=mask, segment_ids=segment_ids, implementation=impl,
                                     dropout_fn=drop)
    if self.head_mask is not None:
      m = jnp.asarray(self.head_mask, out.dtype)
      out = out * (m[None, None, :, None] if m.ndim == 1 else m[:, None, :, None])
    return partitioning.constrain(out.reshape(b, t, self.num_heads * self.head_dim), ("batch", "length", "heads"))


class ResidualOutput(nnx.Module):
  """dense back to the hidden size, dropout, (an adapter), then LayerNorm of the sum with the residual: the end of
  both sub-blocks (BertSelfOutput after attention, BertOutput after the MLP; transformers' names and paths)."""

  def __init__(self, cfg: BertConfig, in_features: int, axes: tuple[str, str], rngs: nnx.Rngs):
    self.dense = dense(cfg, in_features, cfg.hidden_size, axes, rngs)
    self.LayerNorm = layer_norm(cfg, cfg.hidden_size, rngs)
    self.dropout = Dropout(cfg.hidden_dropout_prob)
    self.adapter = nnx.data(None)  # a bottleneck adapter set by bertjax.peft (peft.method=adapter)

  def __call__(self, h, residual, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.dropout(self.dense(h), deterministic=deterministic, rngs=rngs)
    if self.adapter is not None:
      h = self.adapter(h, deterministic=deterministic, rngs=rngs)
    return self.LayerNorm(h + residual)


class BertSelfOutput(ResidualOutput):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, num_heads: int | None = None):
    inner = (cfg.num_attention_heads if num_heads is None else num_heads) * cfg.head_dim
    super().__init__(cfg, inner, ("heads", "embed"), rngs)


class BertAttention(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, num_heads: int | None = None):
    self.self = BertSelfAttention(cfg, rngs, num_heads)
    self.output = BertSelfOutput(cfg, rngs, num_heads)

  def __call__(self, x, mask, segment_ids=None, *, deterministic: bool, rngs: nnx.Rngs | None):
    h = self.self(x, mask, segment_ids, deterministic=deterministic, rngs=rngs)
    return self.output(h, x, deterministic=deterministic, rngs=rngs)


class BertIntermediate(nnx.Module):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
    self.hidden_act = cfg.hidden_act

  def __call__(self, x):
    return partitioning.constrain(activation(self.hidden_act)(self.dense(x)), ("batch", "length", "mlp"))


class BertOutput(ResidualOutput):

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    super().__init__(cfg, cfg.intermediate_size, ("mlp", "embed"), rngs)


class BertLayer(nnx.Module):
  """One post-LayerNorm transformer block."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, num_heads: int | None = None):
    self.attention = BertAttention(cfg, rngs, num_heads)
    self.intermediate = BertIntermediate(cfg, rngs)
    self.output = BertOutput(cfg, rngs)

  def __call__(self, x, mask, segment_ids=None, *, deterministic: bool, rngs: nnx.Rngs | None):
    a = partitioning.constrain(self.attention(x, mask, segment_ids, deterministic=deterministic, rngs=rngs), HIDDEN)
    return partitioning.constrain(self.output(self.intermediate(a), a, deterministic=deterministic, rngs=rngs), HIDDEN)


class BertEncoder(nnx.Module):
  """The layer stack; with `remat` / `scan_layers` each layer runs as a pure function of its parameters."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.layer = nnx.List([BertLayer(cfg, rngs, cfg.layer_heads(i)) for i in range(cfg.num_hidden_layers)])
    self.remat, self.scan_layers = cfg.remat, cfg.scan_layers

  def __call__(self, x, mask, segment_ids=None, *, deterministic: bool, rngs: nnx.Rngs | None):
    if self.remat == "none" and not self.scan_layers:
      for layer in self.layer:
        x = layer(x, mask, segment_ids, deterministic=deterministic, rngs=rngs)
      return x
    graphdef, states = self._split_layers()

    def body(state, h, key):
      layer = nnx.merge(graphdef, state)
      return layer(h, mask, segment_ids, deterministic=deterministic,
                   rngs=None if key is None else nnx.Rngs(dropout=key))

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
    n = len(self.layer)
    keys = None if deterministic or rngs is None else jax.random.split(rngs.dropout(), n)
    if not self.scan_layers:
      for i, state in enumerate(states):
        x = body(state, x, None if keys is None else keys[i])
      return x
    try:
      stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    except ValueError as e:
      raise UserError(f"model.scan_layers=True needs layers of one shape ({e}); set model.scan_layers=False") from None
    x, _ = jax.lax.scan(lambda h, xs: (body(xs[0], h, xs[1]), None), x, (stacked, keys))
    return x

  def _split_layers(self):
    graphdef, first = nnx.split(self.layer[0])
    states = [first]
    for layer in list(self.layer)[1:]:
      g, state = nnx.split(layer)
      if self.scan_layers and g != graphdef:
        raise UserError("model.scan_layers=True needs identical layers (an adapter or pruning differs between "
                        "layers); set model.scan_layers=False")
      states.append(state)
    return graphdef, states


class BertPooler(nnx.Module):
  """tanh(dense(hidden state of [CLS]))."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = dense(cfg, cfg.hidden_size, cfg.hidden_size, ("embed", None), rngs)

  def __call__(self, x):
    return self.pool(x[:, 0])

  def pool(self, h):
    """tanh(dense(h)) for [CLS] hidden states `h` [..., D] (packed rows pool each segment's [CLS])."""
    return jnp.tanh(self.dense(h))


class BertModel(nnx.Module):
  """The encoder: returns (last hidden state [B, T, D], pooled output [B, D] or None)."""

  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs, add_pooling_layer: bool = True):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, rngs)
    self.encoder = BertEncoder(cfg, rngs)
    self.pooler = BertPooler(cfg, rngs) if add_pooling_layer else None

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, position_ids=None, segment_ids=None,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """`segment_ids` [B, T] (0 = padding, k > 0 = the k-th packed example) restricts attention to equal ids and
    replaces `attention_mask`; `position_ids` [B, T] default to 0..T-1 (packing restarts them per segment)."""
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = None
    if segment_ids is None:
      mask = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask).astype(bool)
    x = self.embeddings(input_ids, token_type_ids, position_ids=position_ids, deterministic=deterministic, rngs=rngs)
    x = partitioning.constrain(x, HIDDEN)
    x = self.encoder(x, mask, segment_ids, deterministic=deterministic, rngs=rngs)
    pooled = self.pooler(x) if self.pooler is not None else None
    return x, pooled


def train_flops_per_sequence(cfg: BertConfig, n_encoder: int, t: int, p: int) -> float:
  """Training FLOPs of one sequence of `t` tokens: 6 per encoder parameter (`n_encoder`) and token, attention's
  12 L d t^2, and the MLM head on the `p` predicted positions. XLA's cost analysis counts a scanned layer once, so
  the compile command and the accelerator benchmark take FLOPs (and MFU) from this formula."""
  d, layers = cfg.hidden_size, cfg.num_hidden_layers
  return 6 * n_encoder * t + 12 * layers * d * t * t + 6 * p * (d * d + d * cfg.vocab_size)

