"""Orbax checkpoints: `<workdir>/checkpoints/<step>/{params, opt_state, meta}`.

`params` is the model's pure-dict parameter tree (paths as in `bertjax.models`), `opt_state` the optax state,
`meta` JSON: step, RNG key data, data-iterator position, the model config and the head that wrote it. Only
`params` + `meta` are needed to initialise a model from a checkpoint (`init_checkpoint`, `convert to_hf`):
`bertjax.artifacts.load.load_params` reads them (merging a PEFT checkpoint onto its base).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from bertjax import paths
from bertjax.errors import Diverged, UserError

CHECKPOINT_SUBDIR = "checkpoints"


def manager(workdir: str, max_to_keep: int = 3, save_interval_steps: int = 1,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager in `<workdir>/checkpoints` keeping the last `max_to_keep` steps.

  Folders left by a save that a `kill -9` interrupted (`<step>.orbax-checkpoint-tmp-*`) are never read as steps
  and are removed when the manager is created."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                         enable_async_checkpointing=async_save, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(paths.join(workdir, CHECKPOINT_SUBDIR), options=options)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
  """True when every floating-point leaf is finite (one device reduction and one host read)."""
  return bool(_all_finite(tree))


def save(mngr: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: Mapping[str, Any],
         force: bool = False) -> bool:
  """Save (asynchronously when the manager is async); returns whether a save was started.

  Non-finite parameters are never written: that raises `Diverged` and leaves the older checkpoints alone."""
  if not all_finite(params):
    raise Diverged(f"parameters at step {step} are not finite; not saving them over the last good checkpoint")
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


def restore_latest(mngr: ocp.CheckpointManager, abstract_params: Any, abstract_opt_state: Any,
                   check: Callable[[str], None] | None = None):
  """(params, opt_state, meta) of the newest readable step, or None when there is no step at all.

  `check(step_dir)` runs first (a UserError from it propagates: the workdir is left alone). Steps that cannot be
  read (bad meta JSON, truncated or missing array files) are set aside by `set_aside` once an older step has
  been restored; when no step is readable nothing is renamed and a UserError names the newest failure."""
  failed: list[tuple[str, str]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = paths.join(str(mngr.directory), str(step))
    try:
      if check is not None:
        check(step_dir)
      restored = restore(mngr, step, abstract_params, abstract_opt_state)
    except (UserError, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read this step makes it unusable
      failed.append((step_dir, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
      continue
    if failed:
      if jax.process_index() == 0:
        for d, why in failed:
          set_aside(d, why)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bertjax: unreadable checkpoints set aside")
      mngr.reload()
    return restored
  if failed:
    raise UserError(f"no readable checkpoint in {mngr.directory}: step {failed[0][0]} ({failed[0][1][:200]}); "
                    "move the step folders away to start fresh")
  return None


def resolve_step_dir(path: str) -> str:
  """A workdir, its `checkpoints/` folder or one step folder -> the step folder (latest step)."""
  path = paths.resolve(path)
  if not paths.isdir(path):
    raise UserError(f"checkpoint path {path} does not exist; pass a bertjax workdir or a step folder")
  if paths.isdir(paths.join(path, "params")) and paths.exists(paths.join(path, "meta")):
    return path
  sub = paths.join(path, CHECKPOINT_SUBDIR)
  root = sub if paths.isdir(sub) else path
  steps = sorted(int(d) for d in paths.listdir(root) if d.isdigit() and paths.isdir(paths.join(root, d, "params")))
  if not steps:
    raise UserError(f"no bertjax checkpoint under {path}; expected {CHECKPOINT_SUBDIR}/<step>/params "
                    "(train first, or run `python -m bertjax.convert from_hf`)")
  return paths.join(root, str(steps[-1]))


def read_meta(step_dir: str) -> dict:
  """The `meta` JSON of one step folder; ValueError (not a UserError) when it is missing or unreadable."""
  f = paths.join(step_dir, "meta", "metadata")
  try:
    return dict(json.loads(paths.read_text(f)))
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{f}: unreadable checkpoint meta ({type(e).__name__}: {e})") from e


def latest_meta(workdir: str) -> dict:
  """The `meta` of the workdir's latest step; {} when it has no checkpoint or that meta is unreadable."""
  if not paths.isdir(paths.join(workdir, CHECKPOINT_SUBDIR)):
    return {}
  try:  # the same step `resolve_step_dir` picks (one with params), not merely the highest-numbered folder
    return read_meta(resolve_step_dir(workdir))
  except (UserError, ValueError):
    return {}


def set_aside(step_dir: str, reason: str) -> str:
  """Rename an unreadable step folder to `<step>.corrupt-<UTC time>` (never deleted) and say so."""
  dst = f"{step_dir.rstrip('/')}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
  paths.rename(step_dir, dst)
  logging.warning("checkpoint %s is unreadable (%s); set aside as %s, resuming from the previous step",
                  step_dir, reason, dst)
  return dst


def _int_keys(tree: Any) -> Any:
  """Orbax restores dict keys as strings; layer indices are ints in the model tree."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
  return tree


def read_params(step_dir: str) -> dict:
  """The `params` tree of one step folder as numpy arrays, exactly as stored (a PEFT checkpoint: its trained
  leaves only; `bertjax.artifacts.load.load_params` merges them onto the base)."""
  folder = paths.join(step_dir, "params")
  # Restored straight to numpy: a checkpoint written by other devices (a pod, 2 processes) loads on a laptop too;
  # orbax's default restore wants the saving devices' sharding.
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(folder).item_metadata.tree
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = ckptr.restore(folder, args=ocp.args.PyTreeRestore(restore_args=args))
  return jax.tree_util.tree_map(np.asarray, _int_keys(params))


def save_params(directory: str, step: int, params: Any, meta: Mapping[str, Any]) -> str:
  """Write a params-only checkpoint `<directory>/checkpoints/<step>` (e.g. from an HF import)."""
  mngr = manager(directory, max_to_keep=1, async_save=False)
  args = ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(dict(meta)))
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()
  mngr.close()
  return paths.join(directory, CHECKPOINT_SUBDIR, str(step))


def model_meta(model_config: Any, head: str, **extra: Any) -> dict:
  """The JSON-able description of a model stored in `meta`."""
  return {"model_config": dataclasses.asdict(model_config), "head": head, **extra}
