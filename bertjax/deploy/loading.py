"""A Predictor from whatever a deployment command is given: a checkpoint, an export or a quantized model."""

from __future__ import annotations

from typing import Any

from bertjax.deploy import export, quantize
from bertjax.deploy.predictor import Predictor


def load(path: str, **kw: Any) -> Predictor:
  """A Predictor from a checkpoint, an export (`python -m bertjax.export`) or a quantized checkpoint."""
  if export.is_export(path):
    return export.load_predictor(path, **kw)
  if quantize.is_quantized(path):
    return quantize.load_predictor(path, **kw)
  return Predictor.from_checkpoint(path, **kw)
