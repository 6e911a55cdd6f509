"""Where arrays live on the mesh: logical axis names -> PartitionSpec, and the activation constraints.

`spec` maps an array's logical axis names (`batch`, `length`, `embed`, `heads`, `mlp`, `vocab`, ...) through the
logical axis rules (`config.mesh.logical_axis_rules`) onto mesh axes, replicating a dimension the mapped axes do
not divide and never using a mesh axis twice in one array (so with the default rules an activation's `embed`,
mapped to `fsdp` like the batch, stays whole: the batch already took `fsdp`).

While a step traces, `use(mesh, rules)` puts the mesh and rules in scope (`bertjax.train.sharding.under_rules`
wraps the Trainer's steps in it); inside it `constrain(x, names)` pins an activation's layout
(`with_sharding_constraint`) and the fused attention kernels run per device under `shard_map`. Outside it (one
device, tests, export) both are no-ops.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_SCOPE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("bertjax_mesh", default=None)


@contextlib.contextmanager
def use(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  token = _SCOPE.set((mesh, tuple(tuple(r) for r in rules)))
  try:
    yield
  finally:
    _SCOPE.reset(token)


def current() -> tuple[Mesh, tuple] | None:
  """(mesh, rules) in scope, or None."""
  return _SCOPE.get()


def spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
         rules: Sequence[tuple[str, Any]]) -> tuple[P, list[tuple[int, str, int, str, int]]]:
  """(PartitionSpec, the dimensions replicated because the mapped mesh axes do not divide them:
  (dim, name, size, axes, axes size))."""
  if not names:
    return P(), []
  table = dict(rules)
  used: set[str] = set()
  out, dropped = [], []
  for i, (name, dim) in enumerate(zip(names, shape)):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or dim % size:
      if axes:
        dropped.append((i, name, dim, "x".join(axes), size))
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out), dropped


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` pinned to the layout its logical axis `names` give under the mesh and rules in scope (else `x`)."""
  scope = _SCOPE.get()
  if scope is None or scope[0].size == 1:
    return x
  mesh, rules = scope
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, x.shape, mesh, rules)[0]))


def platform() -> tuple[str, str]:
  """(platform, device kind) of the devices in scope (the target of a cross-compile), else of jax.devices()."""
  scope = _SCOPE.get()
  dev = scope[0].devices.flat[0] if scope is not None else jax.devices()[0]
  return dev.platform, getattr(dev, "device_kind", "")
