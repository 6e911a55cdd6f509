"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{params, opt_state, meta}`.

`params` is the model's pure-dict parameter tree (paths as in `bertjax.models`), `opt_state` the optax state,
`meta` JSON: step, RNG key data, data-iterator position, the model config and the head that wrote it. Only
`params` + `meta` are needed to initialise a model from a checkpoint (`init_checkpoint`, `convert to_hf`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bertjax.errors import UserError

CHECKPOINT_SUBDIR = "checkpoints"


def manager(workdir: str, max_to_keep: int = 3, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager in `<workdir>/checkpoints` keeping the last `max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR)), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any],
         force: bool = False) -> bool:
  """Save (asynchronously when the manager is async); returns whether a save was started."""
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(dict(meta))}
  if jax.tree_util.tree_leaves(opt_state):  # best-checkpoint saves carry params only
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_opt_state: Any):
  """Restore (params, opt_state, meta) of `step` onto the shardings of the abstract targets."""
  args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                            opt_state=ocp.args.StandardRestore(abstract_opt_state),
                            meta=ocp.args.JsonRestore())
  r = mngr.restore(step, args=args)
  return r["params"], r["opt_state"], r["meta"]


def resolve_step_dir(path: str) -> str:
  """A workdir, its `checkpoints/` folder or one step folder -> the step folder (latest step)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise UserError(f"checkpoint path {path} does not exist; pass a bertjax workdir or a step folder")
  if os.path.isdir(os.path.join(path, "params")) and os.path.exists(os.path.join(path, "meta")):
    return path
  root = os.path.join(path, CHECKPOINT_SUBDIR) if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)) else path
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d, "params")))
  if not steps:
    raise UserError(f"no bertjax checkpoint under {path}; expected {CHECKPOINT_SUBDIR}/<step>/params "
                    "(train first, or run `python -m bertjax.convert from_hf`)")
  return os.path.join(root, str(steps[-1]))


def _int_keys(tree: Any) -> Any:
  """Orbax restores dict keys as strings; layer indices are ints in the model tree."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
  return tree


def load_params(path: str) -> tuple[dict, dict]:
  """(params as numpy pure dict, meta) from a workdir or step folder, with no model needed."""
  step_dir = resolve_step_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(step_dir, "params"))
  meta = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / "meta", args=ocp.args.JsonRestore())
  params = jax.tree_util.tree_map(np.asarray, _int_keys(params))
  return params, dict(meta or {})


def save_params(directory: str, step: int, params: Any, meta: Mapping[str, Any]) -> str:
  """Write a params-only checkpoint `<directory>/checkpoints/<step>` (e.g. from an HF import)."""
  mngr = manager(directory, max_to_keep=1, async_save=False)
  args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta)))
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return os.path.join(os.path.abspath(directory), CHECKPOINT_SUBDIR, str(step))


def model_meta(model_config: Any, head: str, **extra: Any) -> dict:
  """The JSON-able description of a model stored in `meta`."""
  return {"model_config": dataclasses.asdict(model_config), "head": head, **extra}
