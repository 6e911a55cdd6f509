"""Mesh from config and logical-axis rules -> `NamedSharding`s (MaxText style).

The mesh has axes (data, fsdp, tensor). `config.mesh.shape` sizes them within one slice (one may be -1: the rest
of the devices); the devices are laid out by `jax.make_mesh`, which follows the physical topology (e.g. TPU ICI
rings). For multi-slice runs `config.mesh.dcn_shape` sizes the same axes across slices (data centre network;
one may be -1: the number of slices) and `mesh_utils.create_hybrid_device_mesh` nests the slices outside; the
full mesh is their elementwise product. Slices are TPU slices (`device.slice_index`), else processes (GPU nodes).
The loader gives process p the p-th block of every global batch, so the data axis is put in process order
(`_process_order`): on a slice of several hosts `jax.make_mesh` walks the torus, which interleaves the hosts'
chips along it (v5e-256 with data=256: every process's rows scattered over the batch). Permuting the data axis
keeps every collective's device group (the data-parallel reduction is over the same devices). Where fsdp or
tensor groups would still interleave processes, the slice is laid out with each process's devices as the inner
block (`_by_process`).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `mlp`, `norm`, None) set where they are
created; `config.mesh.logical_axis_rules` (defaults in `bertjax/config.py`) maps each name to mesh axes. A
dimension that the mapped mesh axes do not divide evenly is replicated instead (e.g. an odd vocabulary on
`tensor`), and that is logged once per parameter. The same rules place the activations: the Trainer traces its
steps `under_rules`, where the model pins hidden states, queries/keys/values and the MLP activation by their
logical names (`batch`, `length`, `embed`, `heads`, `mlp`; `bertjax.models.partitioning`) and runs fused attention
per device under `shard_map`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bertjax.errors import UserError
from bertjax.models import partitioning

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _resolve(shape: Mapping[str, int], n: int, what: str) -> list[int]:
  """Axis sizes for `n` devices (or slices) from a {axis: size} dict in which one size may be -1."""
  unknown_axes = set(shape) - set(MESH_AXES)
  if unknown_axes:
    raise UserError(f"{what} has unknown axes {sorted(unknown_axes)}; use {', '.join(MESH_AXES)}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  shown = dict(zip(MESH_AXES, sizes))
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  known = int(np.prod([s for s in sizes if s != -1]))
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"{what} {shown}: at most one axis may be -1, the rest positive")
  if unknown:
    if n % known:
      raise UserError(f"{what} {shown} does not divide the {n} {'slices' if 'dcn' in what else 'devices'}")
    sizes[unknown[0]] = n // known
  if int(np.prod(sizes)) != n:
    unit = "slices" if "dcn" in what else "devices"
    raise UserError(f"{what} {shown} needs {int(np.prod(sizes))} {unit}, but {n} are available; "
                    "set one axis to -1")
  return sizes


def _granules(devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """(number of slices, whether slices are processes): TPU slice_index when there are several, else processes."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if len(slices) > 1 and None not in slices:
    return len(slices), False
  return len({d.process_index for d in devices}), True


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Mapping[str, int] | None = None) -> Mesh:
  """A topology-aware mesh over all devices with axes (data, fsdp, tensor); see the module docstring."""
  devices = list(devices if devices is not None else jax.devices())
  types = (AxisType.Auto,) * len(MESH_AXES)  # shardings come from the jit in/out specs, not from types
  dcn = {a: int(v) for a, v in (dcn_shape or {}).items()}
  if all(v == 1 for v in dcn.values()):
    sizes = _resolve(shape, len(devices), "mesh.shape")
    try:
      mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError) as e:  # several TPU slices, or a topology it cannot lay out
      mesh = _by_process(sizes, devices, types)
      if mesh is not None:
        return _check_process_order(mesh)
      raise UserError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} cannot be laid out on these devices "
                      f"({str(e).strip().splitlines()[0]}); for several slices set mesh.dcn_shape") from None
    return _check_process_order(_process_order(mesh, sizes, devices))
  n_slices, by_process = _granules(devices)
  dcn_sizes = _resolve(dcn, n_slices, "mesh.dcn_shape")
  ici_sizes = _resolve(shape, len(devices) // n_slices, "mesh.shape (per slice)")
  try:
    grid = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices, process_is_granule=by_process)
  except ValueError as e:
    raise UserError(f"mesh.shape {dict(zip(MESH_AXES, ici_sizes))} x mesh.dcn_shape "
                    f"{dict(zip(MESH_AXES, dcn_sizes))} does not fit the {n_slices} slices of "
                    f"{len(devices) // n_slices} devices ({str(e).strip().splitlines()[0]})") from None
  logging.info("mesh over %d %s: %s across them (DCN) x %s within each", n_slices,
               "processes" if by_process else "slices", dict(zip(MESH_AXES, dcn_sizes)),
               dict(zip(MESH_AXES, ici_sizes)))
  return _check_process_order(_process_order(Mesh(grid, MESH_AXES, axis_types=types)))


def _process_order(mesh: Mesh, sizes: Sequence[int] | None = None,
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`mesh` with its data axis sorted by the lowest process index along it (stable: one process's data indices
  keep their topological order). When fsdp (or tensor) groups still interleave processes (e.g. `jax.make_mesh`
  lays fsdp=4 along a torus row of v5e chips, two hosts), a single slice is rebuilt with the processes as
  granules (`sizes`: the axis sizes): each process's devices form the inner block of the fsdp / data axes."""
  grid = mesh.devices
  first = [min(d.process_index for d in grid[i].flat) for i in range(grid.shape[0])]
  order = np.argsort(first, kind="stable")
  if not (order == np.arange(len(order))).all():
    mesh = Mesh(grid[order], mesh.axis_names, axis_types=mesh.axis_types)
  if sizes is None or _rows_contiguous(mesh):
    return mesh
  return _by_process(sizes, devices, mesh.axis_types) or mesh


def _by_process(sizes: Sequence[int], devices: Sequence[jax.Device], types) -> Mesh | None:
  """A one-slice mesh of several processes with the processes as granules: each process's devices form the
  inner block of the tensor, fsdp and data axes (None when the tensor or fsdp size does not divide, or is not a
  multiple of, the devices per process)."""
  n_proc = len({d.process_index for d in devices})
  local = len(devices) // n_proc
  d_size, f_size, t_size = sizes
  if n_proc == 1 or local % t_size:
    return None
  per = local // t_size
  if f_size % per == 0:
    ici, dcn = (1, per, t_size), (d_size, f_size // per, 1)
  elif per % f_size == 0 and d_size % (per // f_size) == 0:
    ici, dcn = (per // f_size, f_size, t_size), (d_size // (per // f_size), 1, 1)
  else:
    return None
  try:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                allow_split_physical_axes=True)
  except ValueError:
    return None
  logging.info("mesh %s laid out per process (%s within each process, %s across processes) so that each process "
               "holds contiguous batch rows", dict(zip(MESH_AXES, sizes)), ici, dcn)
  return Mesh(grid, MESH_AXES, axis_types=types)


def _rows_contiguous(mesh: Mesh) -> bool:
  dp = data_parallel_size(mesh)
  try:
    for p in {d.process_index for d in mesh.devices.flat}:
      process_batch_rows(mesh, dp, p)
  except UserError:
    return False
  return True


def _check_process_order(mesh: Mesh) -> Mesh:
  """The loader gives process p the p-th block of every global batch; say so when the mesh orders them otherwise
  (the batch is then a permutation of those blocks: the same rows, the loss the same up to summation order)."""
  processes = sorted({d.process_index for d in mesh.devices.flat})
  if len(processes) > 1:
    dp = data_parallel_size(mesh)
    for i, p in enumerate(processes):
      lo, hi = process_batch_rows(mesh, dp, p)
      if (lo, hi) != (i * dp // len(processes), (i + 1) * dp // len(processes)):
        logging.warning("mesh %s places process %d's batch rows at [%d, %d) of %d; the global batch order then "
                        "differs from a single-process run", dict(mesh.shape), p, lo, hi, dp)
        break
  return mesh


def process_batch_rows(mesh: Mesh, global_batch: int, process_index: int | None = None) -> tuple[int, int]:
  """The contiguous rows `[lo, hi)` of a global batch that `process_index`'s devices hold (batch sharding)."""
  p = jax.process_index() if process_index is None else process_index
  index_map = batch_sharding(mesh).devices_indices_map((global_batch,))
  rows = sorted({r for d, (sl,) in index_map.items() if d.process_index == p
                 for r in range(*sl.indices(global_batch))})
  if not rows or rows != list(range(rows[0], rows[-1] + 1)):
    raise UserError(f"process {p} holds non-contiguous rows of the batch on mesh {dict(mesh.shape)}; choose "
                    "mesh.shape's fsdp and tensor as divisors or multiples of the devices per host")
  return rows[0], rows[-1] + 1


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]], what: str = "") -> P:
  """Logical names of one array -> PartitionSpec, replicating dims the mesh axes don't divide (logged when
  `what` names the array)."""
  spec, dropped = partitioning.spec(names, shape, mesh, rules)
  for i, name, dim, axes, size in dropped if what else ():
    logging.info("%s: dimension %d (%s, size %d) is not divisible by mesh axes %s (%d); replicated",
                 what, i, name, dim, axes, size)
  return spec


def under_rules(fn: Callable, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Callable:
  """`fn` traced with the mesh and logical axis rules in scope: the model then pins its activations' layouts and
  runs fused attention per device (`bertjax.models.partitioning`)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with partitioning.use(mesh, rules):
      return fn(*args, **kwargs)
  return traced


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> dict:
  """Pure-dict tree of NamedShardings for the model's `nnx.Param`s, from their logical axis names."""
  state = nnx.state(model, nnx.Param)

  def one(path, v):
    names = v.get_metadata().get("out_sharding")
    what = "/".join(str(getattr(k, "key", k)) for k in path)
    return NamedSharding(mesh, logical_to_spec(names, v.shape, mesh, rules, what))

  specs = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
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
