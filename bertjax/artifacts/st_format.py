"""sentence-transformers folders: what their modules say about pooling, read without sentence-transformers.

A sentence-transformers model folder holds `modules.json` (the module chain: Transformer, Pooling, optionally
Normalize), the Transformer's HF files (config.json, weights, tokenizer) at the top or in a sub-folder,
`sentence_bert_config.json` (max_seq_length) and the Pooling module's `config.json`. bertjax's embedding head
(`sentence_embedding`) covers the chains Transformer -> Pooling(mean | cls) [-> Normalize]. `write_modules` writes
that chain's files beside a transformers folder, in the layout sentence-transformers 2.0 and every later version
read (newer versions, 6.x, save `pooling_mode` and the tokenizer's `model_max_length` instead; both are read).
"""

from __future__ import annotations

import json
import os
from typing import Any

from bertjax.errors import UserError

MODULES_FILE = "modules.json"
POOLING_DIR = "1_Pooling"
ST_CONFIG_FILE = "sentence_bert_config.json"
_TRANSFORMER, _POOLING, _NORMALIZE = ("sentence_transformers.models.Transformer",
                                      "sentence_transformers.models.Pooling",
                                      "sentence_transformers.models.Normalize")
# A Pooling config's modes: one `pooling_mode_*` flag each, or (sentence-transformers 6.x) their names.
_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
          "pooling_mode_mean_sqrt_len_tokens")
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "mean": "mean", "cls": "cls"}
_NO_LIMIT = 10 ** 9  # transformers' model_max_length when a tokenizer states none is about 1e30


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
  pool_cfg = _json(os.path.join(folder, modules[1].get("path", POOLING_DIR), "config.json"))
  on = pool_cfg.get("pooling_mode")
  if on is None:
    on = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v is True]
  on = [on] if isinstance(on, str) else list(on)
  if len(on) != 1 or on[0] not in _MODES:
    raise UserError(f"{folder}: pooling {on or 'none'} is not supported; bertjax pools by mean or [CLS] "
                    "(pooling_mode_mean_tokens / pooling_mode_cls_token)")
  return {"pooling": _MODES[on[0]], "normalize": len(kinds) > 2, "max_seq_length": _max_seq_length(transformer_dir),
          "transformer_dir": transformer_dir}


def _max_seq_length(transformer_dir: str) -> int | None:
  """sentence_bert_config.json's max_seq_length, else (as sentence-transformers 6.x saves it) the tokenizer's limit."""
  for name, key in ((ST_CONFIG_FILE, "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
    path = os.path.join(transformer_dir, name)
    value = _json(path).get(key) if os.path.isfile(path) else None
    if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT:
      return int(value)
  return None


def write_modules(folder: str, dim: int, pooling: str, normalize: bool, max_seq_length: int) -> list[str]:
  """The sentence-transformers files of Transformer (the HF files at the top of `folder`) -> Pooling(`pooling`)
  [-> Normalize] with inputs cut at `max_seq_length` tokens; returns the files written. Normalize has no
  parameters and needs no folder. `config_sentence_transformers.json` states no `__version__`: it would name
  the sentence-transformers that wrote the folder, and none did."""
  modules = [{"idx": 0, "name": "0", "path": "", "type": _TRANSFORMER},
             {"idx": 1, "name": "1", "path": POOLING_DIR, "type": _POOLING}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _NORMALIZE})
  files = {
      MODULES_FILE: modules,
      os.path.join(POOLING_DIR, "config.json"): {"word_embedding_dimension": int(dim),
                                                 **{k: _MODES.get(k) == pooling for k in _FLAGS}},
      ST_CONFIG_FILE: {"max_seq_length": int(max_seq_length), "do_lower_case": False},  # the tokenizer lowercases
      "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "prompts": {},
                                            "default_prompt_name": None, "similarity_fn_name": "cosine"},
  }
  os.makedirs(os.path.join(folder, POOLING_DIR), exist_ok=True)
  for name, content in files.items():
    with open(os.path.join(folder, name), "w") as f:
      json.dump(content, f, indent=2)
  return list(files)
