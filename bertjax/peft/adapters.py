"""Houlsby bottleneck adapters: x + up(act(down(x))), with `up` zero-initialised so a fresh adapter is the identity.

`attach(model, size, dropout, rngs)` sets one adapter on every `BertSelfOutput` (after the attention output
projection) and `BertOutput` (after the FFN output projection); each applies it to the projected, dropped-out
hidden state before the residual + LayerNorm. Parameter paths: `.../attention/output/adapter/{down,up}/...` and
`.../output/adapter/{down,up}/...`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from bertjax.models.bert import BertConfig, BertOutput, BertSelfOutput, activation, dense
from bertjax.models.dropout import Dropout


class Adapter(nnx.Module):
  """down-project to `size`, activation, dropout, up-project (zero init), add the input."""

  def __init__(self, cfg: BertConfig, size: int, dropout: float, rngs: nnx.Rngs):
    self.down = dense(cfg, cfg.hidden_size, size, ("embed", None), rngs)
    self.up = nnx.Linear(size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32, rngs=rngs,
                         kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "embed"),
                                                           eager_sharding=False),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",),
                                                         eager_sharding=False))
    self.hidden_act = cfg.hidden_act
    self.dropout = Dropout(dropout)

  def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
    h = activation(self.hidden_act)(self.down(x))
    h = self.dropout(h, deterministic=deterministic, rngs=rngs)
    return x + self.up(h)


def attach(model: nnx.Module, cfg: BertConfig, size: int, dropout: float, rngs: nnx.Rngs) -> int:
  """Give every BertSelfOutput / BertOutput in `model` a fresh adapter; returns how many were attached."""
  targets = [m for _, m in nnx.iter_modules(model) if isinstance(m, (BertSelfOutput, BertOutput))]
  for m in targets:
    m.adapter = Adapter(cfg, size, dropout, rngs)
  return len(targets)
