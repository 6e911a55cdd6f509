"""The 1:1 map between bertjax parameter paths and transformers' BERT state-dict keys.

bertjax attribute paths equal transformers' module paths, so a key is the path joined by dots with the leaf
renamed (`kernel`/`scale`/`embedding` -> `weight`) and Linear kernels transposed ([in, out] vs [out, in]).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _flatten(tree: Mapping[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def hf_key(path: tuple) -> str:
  """('bert', 'encoder', 'layer', 0, ..., 'kernel') -> 'bert.encoder.layer.0....weight'."""
  *mods, leaf = path
  leaf = _LEAF_TO_HF.get(leaf, leaf)
  if mods and mods[-1] == "predictions" and leaf == "bias":  # cls.predictions.bias is a bare Param
    return ".".join(str(p) for p in mods) + ".bias"
  return ".".join(str(p) for p in [*mods, leaf])


def to_hf_state(params: Mapping[Any, Any]) -> dict[str, np.ndarray]:
  """Pure-dict bertjax params -> {hf key: numpy array} (kernels transposed to [out, in])."""
  out = {}
  for path, value in _flatten(params).items():
    arr = np.asarray(value)
    if path[-1] == "kernel":
      arr = arr.T
    out[hf_key(path)] = np.ascontiguousarray(arr)
  return out


def from_hf_state(template: Mapping[Any, Any], hf: Mapping[str, Any]) -> tuple[dict, list[str], list[str]]:
  """Fill a pure-dict params `template` from an HF state dict.

  Returns (params, missing bertjax keys left at the template's values, unused HF keys).
  Shapes are checked; a mismatch raises ValueError naming the key and both shapes.
  """
  flat = _flatten(template)
  used, missing, out = set(), [], {}
  for path, init in flat.items():
    key = hf_key(path)
    if key not in hf:
      missing.append(key)
      out[path] = init
      continue
    arr = np.asarray(hf[key])
    if path[-1] == "kernel":
      arr = arr.T
    if tuple(arr.shape) != tuple(np.shape(init)):
      raise ValueError(f"{key}: checkpoint shape {tuple(arr.shape)} != model shape {tuple(np.shape(init))}")
    out[path] = arr.astype(np.asarray(init).dtype)
    used.add(key)
  unused = sorted(set(hf) - used)
  return _unflatten(out), missing, unused


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree
