"""sentence-transformers folders: what their modules say about pooling, read without sentence-transformers.

A sentence-transformers model folder holds `modules.json` (the module chain: Transformer, Pooling, optionally
Normalize), the Transformer's HF files (config.json, weights, tokenizer) at the top or in a sub-folder,
`sentence_bert_config.json` (max_seq_length) and the Pooling module's `config.json`. bertjax's embedding head
(`sentence_embedding`) covers the chains Transformer -> Pooling(mean | cls) [-> Normalize].
"""

from __future__ import annotations

import json
import os
from typing import Any

from bertjax.errors import UserError

MODULES_FILE = "modules.json"
_TRANSFORMER, _POOLING, _NORMALIZE = ("sentence_transformers.models.Transformer",
                                      "sentence_transformers.models.Pooling",
                                      "sentence_transformers.models.Normalize")
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def is_st_folder(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, MODULES_FILE))


def _json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not readable JSON ({e}); is this a sentence-transformers folder?") from None


def read_pooling(folder: str) -> dict[str, Any] | None:
  """{"pooling": "mean" | "cls", "normalize": bool, "max_seq_length": int | None, "transformer_dir": str} of a
  sentence-transformers folder; None when `folder` has no modules.json. A chain bertjax cannot run (another
  pooling mode, a Dense layer, ...) is a UserError naming it."""
  if not is_st_folder(folder):
    return None
  modules = _json(os.path.join(folder, MODULES_FILE))
  # newer sentence-transformers write longer module paths (sentence_transformers.sentence_transformer.modules...)
  kinds = [m.get("type", "") for m in modules]
  kinds = [("sentence_transformers.models." + k.split(".")[-1]) if k.startswith("sentence_transformers.") else k
           for k in kinds]
  if kinds[:2] != [_TRANSFORMER, _POOLING] or any(k != _NORMALIZE for k in kinds[2:]):
    raise UserError(f"{folder}: the sentence-transformers modules {[k.split('.')[-1] for k in kinds]} are not "
                    "Transformer -> Pooling [-> Normalize]; bertjax's embedding head runs only that chain")
  transformer_dir = os.path.join(folder, modules[0].get("path", "") or "")
  pool_cfg = _json(os.path.join(folder, modules[1].get("path", "1_Pooling"), "config.json"))
  on = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v is True]
  if len(on) != 1 or on[0] not in _MODES:
    raise UserError(f"{folder}: pooling {on or 'none'} is not supported; bertjax pools by mean or [CLS] "
                    "(pooling_mode_mean_tokens / pooling_mode_cls_token)")
  st_cfg = os.path.join(transformer_dir, "sentence_bert_config.json")
  max_len = _json(st_cfg).get("max_seq_length") if os.path.isfile(st_cfg) else None
  return {"pooling": _MODES[on[0]], "normalize": len(kinds) > 2, "max_seq_length": max_len,
          "transformer_dir": transformer_dir}
