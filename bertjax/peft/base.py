"""PEFT checkpoints without a model: the config they record, the base they reference, merged params.

A PEFT checkpoint's `params` hold only the trained leaves; `meta.peft` records the method, its settings and the
base (`init_from_hf` / `init_checkpoint` path and the frozen tree's fingerprint). `merged(params, meta)` reloads the
base, checks the fingerprint (a moved or changed base is one UserError line), and returns the model's full params
(LoRA merged into the kernels; adapter leaves kept, so an adapter model needs `build_model` below).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.errors import UserError
from bertjax.peft import core


def peft_config(p: Mapping[str, Any]) -> ConfigDict:
  """`config.peft` as recorded in a checkpoint's `meta.peft`."""
  return ConfigDict({"method": p["method"], "rank": int(p.get("rank", 8)), "alpha": float(p.get("alpha", 16.0)),
                     "dropout": float(p.get("dropout", 0.0)), "target_modules": list(p.get("target_modules", [])),
                     "adapter_size": int(p.get("adapter_size", 64)),
                     "modules_to_save": list(p.get("modules_to_save", []))})


def model_config(meta: Mapping[str, Any]):
  from bertjax.convert import hf
  return hf.config_from_meta(meta, dtype="float32")


def num_labels(params: Mapping[str, Any], head: str) -> int | None:
  if head in ("sequence_classification", "token_classification") and "classifier" in params:
    return int(np.shape(params["classifier"]["kernel"])[1])
  return None


def build_model(meta: Mapping[str, Any], params: Mapping[str, Any] | None = None, n_labels: int | None = None):
  """The NNX model of a (PEFT) checkpoint: its head, adapters attached for peft.method=adapter, filled with
  `params` (full, e.g. from `merged`) when given."""
  from bertjax.convert import hf
  head = meta["head"]
  n = n_labels if n_labels is not None else (num_labels(params, head) if params is not None else None)
  return hf.build_model(model_config(meta), head, n, params, adapter_size=hf.adapter_size(meta))


def base_params(meta: Mapping[str, Any], template: Mapping[str, Any], where: str) -> dict:
  """The full params the referenced base gives `template` (numpy), as the trainer built them."""
  from bertjax.convert import hf
  base, head = (meta.get("peft") or {}).get("base") or {}, meta["head"]
  src = base.get("init_from_hf") or base.get("init_checkpoint")
  if not src:
    raise UserError(f"PEFT checkpoint {where} was trained from a fresh init (no base model to merge onto); "
                    "train it with --config.init_from_hf or --config.init_checkpoint")
  local = not str(src).startswith(("gs://", "s3://")) and ("/" in str(src) or paths.exists(src))
  if local and not paths.exists(src):
    raise UserError(f"the base model of PEFT checkpoint {where} is gone: {src} does not exist; put it back "
                    "(or copy it there) to load the checkpoint")
  seed = int(base.get("seed", 0))
  if base.get("init_from_hf"):
    full, _ = hf.init_from_hf(template, src, head, seed=seed)
  else:
    full, _ = hf.init_from_checkpoint(template, src, model_config(meta), seed=seed)
  return jax.tree_util.tree_map(np.asarray, full)


def merged(params: Mapping[str, Any], meta: Mapping[str, Any], where: str = "") -> dict:
  """Full model params (numpy) of a PEFT checkpoint's trained leaves `params` on its base."""
  from flax import nnx
  p = meta["peft"]
  model = nnx.eval_shape(lambda: build_model(meta, n_labels=num_labels(params, meta["head"])))
  template = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  split = core.Split(peft_config(p), template, meta["head"])
  full = base_params(meta, template, where)
  frozen = core.select(full, lambda path: path not in split.trained)
  want, got = (p.get("base") or {}).get("fingerprint"), core.fingerprint(frozen)
  if want != got:
    src = p["base"].get("init_from_hf") or p["base"].get("init_checkpoint")
    raise UserError(f"the base model {src} differs from the one PEFT checkpoint {where} was trained on "
                    f"(fingerprint {got} vs {want}); use the original base")
  return jax.tree_util.tree_map(np.asarray, split.combine(params, frozen))
