"""Pretrained weights placed straight onto their target shardings: each process reads only what it holds.

    params = jax.jit(init, out_shardings=shardings)()          # fresh, sharded (any head)
    params, report = place.from_hf(params, "bert-base-uncased")  # or place.from_checkpoint(params, workdir)

The same policy and load report as `weights.init_params` / `load.init_from_checkpoint` (fresh heads, re-initialised task
layers, unused keys); fresh keys keep the given params. An HF tensor becomes a global array through
`jax.make_array_from_callback`, whose callback reads only the slice of the memory-mapped safetensors file that
one local device holds (`pytorch_model.bin` pickles are read whole); a bertjax checkpoint is restored by orbax
onto the target shardings, only the tensors the model uses. Nothing is gathered to one host.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from bertjax.artifacts import checkpoint, hf_io, load, weights
from bertjax.artifacts.mapping import flatten, unflatten
from bertjax.models.bert import BertConfig


def _assemble(template: Mapping[Any, Any], plan: Mapping[tuple, Any], bare: bool, fetch) -> dict:
  out = {path: (cur if plan[path] is None else fetch(path, cur)) for path, cur in flatten(template).items()}
  tree = unflatten(out)
  return tree["bert"] if bare else tree


def from_hf(params: Mapping[Any, Any], name_or_path: str, head: str | None = None) -> tuple[dict, weights.LoadReport]:
  """`params` (sharded jax arrays) with every tensor of the HF folder / hub model that fits placed into it."""
  folder = hf_io.resolve_source(name_or_path)
  hf_io.read_config(folder)  # the same checks as init_from_hf
  state, _ = hf_io.read_weights(folder, lazy=True)
  template, bare, state, by_path, notes = weights.hf_source(params, state)
  plan, report, used = weights.plan_loading(template, by_path, "the HF weights", True, head)
  weights.hf_report(report, state, used, notes)

  def fetch(path, cur):
    read = functools.partial(weights.read_leaf, plan[path], path, True, cur.dtype)
    return jax.make_array_from_callback(cur.shape, cur.sharding, read)

  return _assemble(template, plan, bare, fetch), report


def _str_keys(path: tuple) -> tuple:
  return tuple(str(p) for p in path)  # orbax stores dict keys (layer indices too) as strings


def from_checkpoint(params: Mapping[Any, Any], step_dir_or_workdir: str,
                    cfg: BertConfig | None = None) -> tuple[dict, weights.LoadReport]:
  """`params` (sharded jax arrays) with the matching tensors of a bertjax checkpoint restored onto their
  shardings; only those tensors are read. A PEFT checkpoint stores only its trained leaves: it is merged onto
  its base on the host (`load_params`) and each process places its slices of the result."""
  step_dir = checkpoint.resolve_step_dir(step_dir_or_workdir)
  meta = checkpoint.read_meta(step_dir)
  weights.check_architecture(step_dir, meta, cfg)
  if meta.get("peft"):
    merged, _ = load.load_params(step_dir)
    source = flatten(merged)
    template, bare = weights.wrap(params)
    plan, report, used = weights.plan_loading(template, source, f"checkpoint {step_dir}", False, None)
    weights.checkpoint_report(report, step_dir, meta, source, used)
    return _assemble(template, plan, bare, lambda path, cur: jax.make_array_from_callback(
        cur.shape, cur.sharding, functools.partial(weights.read_leaf, plan[path], path, False, cur.dtype))), report
  params_dir = os.path.join(step_dir, "params")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(params_dir).item_metadata.tree
    source = {tuple(int(p) if p.isdigit() else p for p in path): v for path, v in flatten(tree).items()}
    template, bare = weights.wrap(params)
    plan, report, used = weights.plan_loading(template, source, f"checkpoint {step_dir}", False, None)
    item = unflatten({_str_keys(path): jax.ShapeDtypeStruct(cur.shape, cur.dtype, sharding=cur.sharding)
                      for path, cur in flatten(template).items() if plan[path] is not None})
    restored = flatten(ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  weights.checkpoint_report(report, step_dir, meta, source, used)
  return _assemble(template, plan, bare, lambda path, cur: restored[_str_keys(path)]), report
