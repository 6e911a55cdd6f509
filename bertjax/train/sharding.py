"""Mesh from config and logical-axis rules -> `NamedSharding`s (MaxText style).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `mlp`, `norm`, None) set where they are
created; `config.mesh.logical_axis_rules` (defaults in `bertjax/config.py`) maps each name to mesh axes. A
dimension that the mapped mesh axes do not divide evenly is replicated instead (e.g. an odd vocabulary on
`tensor`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bertjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices with axes (data, fsdp, tensor); one size may be -1 (the rest of the devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  known = int(np.prod([s for s in sizes if s != -1]))
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh.shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1, the rest positive")
  if unknown:
    if len(devices) % known:
      raise UserError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} devices")
    sizes[unknown[0]] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                    f"but {len(devices)} are available; set one axis to -1")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """Logical names of one array -> PartitionSpec, replicating dims the mesh axes don't divide."""
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> dict:
  """Pure-dict tree of NamedShardings for the model's `nnx.Param`s, from their logical axis names."""
  state = nnx.state(model, nnx.Param)

  def one(v):
    names = v.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules))

  specs = jax.tree_util.tree_map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, params_sh: Any,
                        mesh: Mesh) -> Any:
  """Optimizer-state leaves shaped like params take the params' shardings; the rest are replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt_state, params_sh,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Shard the batch dimension (after `leading_dims` unsharded ones, e.g. accumulation) over data x fsdp."""
  return NamedSharding(mesh, P(*([None] * leading_dims), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
