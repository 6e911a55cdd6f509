"""The one place that turns a config, a checkpoint's meta or a workdir into a model.

    cfg = config_from_meta(meta)                                   # a checkpoint's architecture
    model = build_model(cfg, head, num_labels, params)              # any head, filled from a params tree
    model = model_from_meta(meta, params)                           # the same, head / labels / adapters from meta
    template = abstract_params(cfg, head, num_labels)               # shapes only, no compute

The trainer, the tasks, conversion and the deployment commands all build their models through here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.artifacts import checkpoint, weights
from bertjax.errors import UserError
from bertjax.models.bert import RUNTIME_FIELDS, BertConfig, BertModel
from bertjax.models.heads import HEADS
from bertjax.peft import adapters

CLASSIFIER_HEADS = ("sequence_classification", "token_classification")
COMPUTE_FIELDS = ("attention", "remat", "scan_layers")  # how a run computed, never taken from its checkpoint


def config_from_meta(meta: Mapping[str, Any], dtype: str | None = None) -> BertConfig:
  """The architecture in a checkpoint's `meta.model_config` (the one place that reads it); `dtype` replaces the
  run's compute dtype when given. Kernel, remat and scan choices are the defaults: the training machine's
  `model.attention=cudnn` must not follow the model onto a CPU. A pruned model's `heads_per_layer` (a JSON list)
  comes back as the tuple `bertjax.prune` wrote."""
  skip = set(COMPUTE_FIELDS) | ({"dtype"} if dtype else set())
  known = {f.name for f in dataclasses.fields(BertConfig)} - skip
  fields = {k: v for k, v in dict(meta.get("model_config") or {}).items() if k in known}
  return BertConfig(**fields, **({"dtype": dtype} if dtype else {}))


def adapter_size(meta: Mapping[str, Any]) -> int:
  """The bottleneck size of a peft.method=adapter checkpoint (its model has adapter modules), else 0."""
  p = meta.get("peft") or {}
  return int(p.get("adapter_size", 0)) if p.get("method") == "adapter" else 0


def build_model(cfg: BertConfig, head: str, num_labels: int | None = None, params: Mapping[Any, Any] | None = None,
                seed: int = 0, adapter_size: int = 0):
  """An NNX model of `head` (`base` = bare BertModel). With `params` (pure dict) it is built abstractly and
  filled (no random init, which compiles one XLA program per initializer on CPU). `adapter_size` > 0 attaches
  bottleneck adapters (a peft.method=adapter checkpoint)."""
  def make(rngs):
    if head == "base":
      return BertModel(cfg, rngs=rngs)
    if head in CLASSIFIER_HEADS:
      return HEADS[head](cfg, num_labels or 2, rngs=rngs)
    if head in HEADS:
      return HEADS[head](cfg, rngs=rngs)
    raise UserError(f"head={head!r} is unknown; choose one of {sorted(HEADS)}")

  def create():
    rngs = nnx.Rngs(seed)
    model = make(rngs)
    if adapter_size:
      adapters.attach(model, cfg, adapter_size, 0.0, rngs)
    return model

  if params is None:
    return create()
  model = nnx.eval_shape(create)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(params)))
  nnx.update(model, state)
  return model


def abstract_params(cfg: BertConfig, head: str, num_labels: int | None = None) -> dict:
  """The params tree of `head` as `jax.ShapeDtypeStruct`s (a template for `init_params`, no compute)."""
  model = nnx.eval_shape(lambda: build_model(cfg, head, num_labels))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def attach_adapters(model: nnx.Module, cfg: BertConfig, peft: Mapping[str, Any] | None, rngs: nnx.Rngs) -> nnx.Module:
  """`model` with bottleneck adapters attached when `peft` (a run's `config.peft`) selects method=adapter."""
  if peft is not None and peft.get("method") == "adapter":
    adapters.attach(model, cfg, int(peft["adapter_size"]), float(peft.get("dropout", 0.0)), rngs)
  return model


def num_labels(params: Mapping[str, Any], head: str) -> int | None:
  """The label count a classifier's params imply (None for other heads)."""
  if head in CLASSIFIER_HEADS and "classifier" in params:
    return int(np.shape(params["classifier"]["kernel"])[1])
  return None


def model_from_meta(meta: Mapping[str, Any], params: Mapping[str, Any] | None = None, n_labels: int | None = None,
                    dtype: str | None = None):
  """The NNX model a checkpoint describes: its head, label count and adapters (peft.method=adapter), filled with
  `params` (full, e.g. from `load_params`) when given."""
  head = meta["head"]
  n = n_labels if n_labels is not None else (
      int(meta.get("num_labels") or 0) or (num_labels(params, head) if params is not None else None))
  return build_model(config_from_meta(meta, dtype=dtype), head, n, params, adapter_size=adapter_size(meta))


# -- a run's pretrained starting point ------------------------------------------------------------------------

def pretrained_model_config(config: ConfigDict) -> dict | None:
  """The architecture dict of `init_checkpoint` (bertjax) or `init_from_hf` (HF folder / hub name)."""
  if config.get("init_checkpoint"):
    cfg = config_from_meta(checkpoint.read_meta(checkpoint.resolve_step_dir(config.init_checkpoint)))
  elif config.get("init_from_hf"):
    cfg = weights.read_config(config.init_from_hf)
  else:
    return None
  return {k: v for k, v in cfg.__dict__.items() if k not in RUNTIME_FIELDS}


def pretrained_tokenizer_dir(config: ConfigDict) -> str | None:
  """The tokenizer folder that comes with `init_checkpoint` / `init_from_hf`, if any."""
  if config.get("init_checkpoint"):
    step_dir = checkpoint.resolve_step_dir(config.init_checkpoint)
    folder = paths.join(os.path.dirname(os.path.dirname(step_dir)), "tokenizer")
    return folder if paths.isdir(folder) else None
  if config.get("init_from_hf"):
    return weights.tokenizer_dir(config.init_from_hf)
  return None
