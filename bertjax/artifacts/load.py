"""Checkpoints read into full model params: `load_params`, PEFT checkpoints merged onto their base.

A PEFT checkpoint's `params` hold only the trained leaves; `meta.peft` records the method, its settings and the
base (`init_from_hf` / `init_checkpoint` path and the frozen tree's fingerprint). `merged(params, meta)` reloads the
base, checks the fingerprint (a moved or changed base is one UserError line), and returns the model's full params
(LoRA merged into the kernels; adapter leaves kept, so an adapter model needs `factory.model_from_meta`).
A base may itself be a bertjax checkpoint, so `load_params`, `merged` and `init_from_checkpoint` call each other:
they live in this one module.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bertjax import paths
from bertjax.artifacts import checkpoint, factory, weights
from bertjax.artifacts.mapping import flatten
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig
from bertjax.peft import core


def load_params(path: str, merge: bool = True) -> tuple[dict, dict]:
  """(params as numpy pure dict, meta) from a workdir or step folder, with no model needed.

  A PEFT checkpoint (`meta.peft`) stores only its trained leaves: with `merge` they are put onto the base it
  references (checked by fingerprint) and LoRA is merged, so the result is the model's full params; adapter
  models keep their `adapter` leaves (build them with `factory.model_from_meta`)."""
  step_dir = checkpoint.resolve_step_dir(path)
  params, meta = checkpoint.read_params(step_dir), checkpoint.read_meta(step_dir)
  if merge and meta.get("peft"):
    params = merged(params, meta, step_dir)
  return params, meta


def init_from_checkpoint(template_params: Mapping[Any, Any], step_dir_or_workdir: str,
                         cfg: BertConfig | None = None, *, seed: int = 0) -> tuple[dict, weights.LoadReport]:
  """Fill `template_params` from a bertjax checkpoint: the encoder plus any head with the same paths/shapes.

  With `cfg`, the checkpoint's architecture (`meta.model_config`) must match it (dropout/dtype may differ).
  Fresh keys follow `init_params`' rules.
  """
  src, meta = load_params(step_dir_or_workdir)
  step_dir = checkpoint.resolve_step_dir(step_dir_or_workdir)
  saved = weights.check_architecture(step_dir, meta, cfg)
  template, bare = weights.wrap(template_params)
  source = flatten(src)
  init_range = (cfg.initializer_range if cfg else saved.get("initializer_range", 0.02))
  params, report, used = weights.fill(template, source, f"checkpoint {step_dir}", False, None, seed, init_range)
  weights.checkpoint_report(report, step_dir, meta, source, used)
  return (params["bert"] if bare else params), report


def peft_config(p: Mapping[str, Any]) -> ConfigDict:
  """`config.peft` as recorded in a checkpoint's `meta.peft`."""
  return ConfigDict({"method": p["method"], "rank": int(p.get("rank", 8)), "alpha": float(p.get("alpha", 16.0)),
                     "dropout": float(p.get("dropout", 0.0)), "target_modules": list(p.get("target_modules", [])),
                     "adapter_size": int(p.get("adapter_size", 64)),
                     "modules_to_save": list(p.get("modules_to_save", []))})


def base_params(meta: Mapping[str, Any], template: Mapping[str, Any], where: str) -> dict:
  """The full params the referenced base gives `template` (numpy), as the trainer built them."""
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
    full, _ = weights.init_from_hf(template, src, head, seed=seed)
  else:
    full, _ = init_from_checkpoint(template, src, factory.config_from_meta(meta, dtype="float32"), seed=seed)
  return jax.tree_util.tree_map(np.asarray, full)


def merged(params: Mapping[str, Any], meta: Mapping[str, Any], where: str = "") -> dict:
  """Full model params (numpy) of a PEFT checkpoint's trained leaves `params` on its base."""
  p = meta["peft"]
  model = nnx.eval_shape(lambda: factory.model_from_meta(meta, n_labels=factory.num_labels(params, meta["head"]),
                                                         dtype="float32"))
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
