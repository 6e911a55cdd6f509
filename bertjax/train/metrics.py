"""clu metric collections built from (total, count) pairs, and the human-readable progress line.

A task's loss function returns `{name: (total, count)}`; every metric is a weighted average
`sum(total) / sum(count)`, so merging across steps, micro-batches, eval batches and processes is exact.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax.numpy as jnp
from clu import metrics as clu_metrics


def _weighted(name: str) -> type:

  @flax.struct.dataclass
  class Weighted(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **kwargs) -> clu_metrics.Average:
      total, count = kwargs[name]
      return cls(total=jnp.asarray(total, jnp.float32), count=jnp.asarray(count, jnp.float32))

    def compute(self) -> Any:
      return self.total / jnp.maximum(self.count, 1e-9)

  Weighted.__name__ = f"Weighted_{name}"
  return Weighted


_COLLECTIONS: dict[tuple, type] = {}


def collection(names: Sequence[str]) -> type:
  """A clu `Collection` class with one weighted average per name (cached per name tuple)."""
  key = tuple(names)
  if key not in _COLLECTIONS:
    _COLLECTIONS[key] = clu_metrics.Collection.create(**{n: _weighted(n) for n in key})
  return _COLLECTIONS[key]


def from_outputs(values: Mapping[str, tuple]) -> clu_metrics.Collection:
  return collection(sorted(values)).single_from_model_output(**values)


def scalars(acc: clu_metrics.Collection) -> dict[str, float]:
  """Host floats of an accumulated collection; NaN for a metric with no weight (e.g. every step skipped)."""
  values = acc.compute()
  return {k: float(v) if float(getattr(acc, k).count) > 0 else float("nan") for k, v in values.items()}


# the numbers a progress line (and the run summary) shows first, in this order
HEADLINE = ("loss", "mlm_accuracy", "nsp_accuracy", "accuracy", "f1", "exact")


def progress_line(step: int, total: int, scalars: Mapping[str, float], tokens_per_s: float | None,
                  prefix: str = "train") -> str:
  first = (*HEADLINE, "learning_rate")
  keys = [k for k in first if k in scalars] + sorted(k for k in scalars if k not in first)
  parts = [f"{prefix} step {step}/{total}"]
  for k in keys:
    v = float(scalars[k])
    parts.append(f"{k} {v:.2e}" if k == "learning_rate" else f"{k} {v:.4f}")
  if tokens_per_s is not None:
    parts.append(f"{tokens_per_s:,.0f} tokens/s")
  return " | ".join(parts)
