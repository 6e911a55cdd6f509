"""optax optimizers for BERT: AdamW (default), LAMB or SGD (momentum `b1`), warmup + linear/polynomial decay,
no weight decay on LayerNorm and biases, global-norm clipping, optional freezing of parameters by path.

Gradient accumulation is done inside the train step (a scan over micro-batches), not here.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from bertjax.errors import UserError


def schedule(cfg: ConfigDict, num_train_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then linear or polynomial decay to `end_learning_rate`."""
  lr, warmup = cfg.learning_rate, int(cfg.warmup_steps)
  if cfg.get("warmup_fraction"):  # e.g. 0.1 for the BERT paper's fine-tuning recipe
    warmup = int(round(cfg.warmup_fraction * num_train_steps))
  warmup = max(0, min(warmup, num_train_steps))
  decay_steps = max(1, num_train_steps - warmup)
  end = cfg.get("end_learning_rate", 0.0)
  if cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif cfg.schedule == "polynomial":
    decay = optax.polynomial_schedule(lr, end, cfg.get("power", 1.0), decay_steps)
  elif cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise UserError(f"optimizer.schedule={cfg.schedule!r}; use 'linear', 'polynomial' or 'constant'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: not on LayerNorm parameters and not on biases."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not (p[-1].key == "bias" or "LayerNorm" in _path_str(p)), params)


def frozen_mask(params: Any, patterns: list[str]) -> Any:
  """True for parameters whose '/'-joined path matches any regex in `patterns`."""
  regs = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(lambda p, _: any(r.search(_path_str(p)) for r in regs), params)


def make(cfg: ConfigDict, params: Any, num_train_steps: int, frozen: list[str] | None = None,
         sched: optax.Schedule | None = None):
  """-> (optax transformation, schedule); `sched` replaces the config's schedule (a resumed run's)."""
  sched = sched if sched is not None else schedule(cfg, num_train_steps)
  mask = decay_mask(params)
  if cfg.name == "adamw":
    opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "lamb":
    opt = optax.lamb(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "sgd":  # plain momentum SGD: updates are linear in the gradient (handy for debugging)
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask),
                      optax.sgd(sched, momentum=cfg.b1 or None))
  else:
    raise UserError(f"optimizer.name={cfg.name!r}; use 'adamw', 'lamb' or 'sgd'")
  parts = []
  if frozen:
    parts.append(optax.masked(optax.set_to_zero(), frozen_mask(params, frozen)))
  if cfg.max_grad_norm and cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(opt)
  if frozen:
    parts.append(optax.masked(optax.set_to_zero(), frozen_mask(params, frozen)))
  return optax.chain(*parts), sched
