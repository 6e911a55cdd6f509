"""The 1:1 map between bertjax parameter paths and transformers' BERT state-dict keys.

bertjax attribute paths equal transformers' module paths, so a key is the path joined by dots with the leaf
renamed (`kernel`/`scale`/`embedding` -> `weight`) and Linear kernels transposed ([in, out] vs [out, in]).
`canonical_hf_state` brings the layouts found in the wild (no `bert.` prefix, TF-era `gamma`/`beta`, buffers,
the tied MLM decoder) to the `BertFor*` form first.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# bertjax head -> transformers class / Auto class.
HF_ARCHITECTURE = {
    "pretraining": "BertForPreTraining",
    "masked_lm": "BertForMaskedLM",
    "sequence_classification": "BertForSequenceClassification",
    "token_classification": "BertForTokenClassification",
    "question_answering": "BertForQuestionAnswering",
    "sentence_embedding": "BertModel",  # the encoder; the pooling lives in the sentence-transformers files
}
AUTO_CLASS = {
    "pretraining": "AutoModelForPreTraining",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "sentence_embedding": "AutoModel",
}
# transformers class in config.json `architectures` -> the bertjax head `--head=auto` picks.
ARCHITECTURE_HEAD = {
    "BertModel": "pretraining",  # encoder only: the MLM + NSP heads start fresh
    "BertForPreTraining": "pretraining",
    "BertForNextSentencePrediction": "pretraining",
    "BertForMaskedLM": "masked_lm",
    "BertForSequenceClassification": "sequence_classification",
    "BertForTokenClassification": "token_classification",
    "BertForQuestionAnswering": "question_answering",
}
# Keys transformers ties to another tensor (older checkpoints store both copies): duplicate -> original.
TIED = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Non-parameter buffers some checkpoints carry.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_ENCODER_ROOTS = ("embeddings.", "encoder.", "pooler.")


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


def canonical_hf_state(hf: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Any BERT state dict -> `BertFor*` keys (`bert.` prefix, LayerNorm `weight`/`bias`), plus notes.

  Drops buffers and the tied decoder copies after checking them (a differing copy is noted, never hidden);
  a lone `cls.predictions.decoder.bias` becomes `cls.predictions.bias`.
  """
  out: dict[str, np.ndarray] = {}
  notes, renamed, buffers = [], 0, []
  for key, value in hf.items():
    new = key
    if new.startswith(_ENCODER_ROOTS):
      new = "bert." + new
    if ".LayerNorm." in new and new.endswith((".gamma", ".beta")):
      new = new.rsplit(".", 1)[0] + (".weight" if new.endswith(".gamma") else ".bias")
      renamed += 1
    if new.endswith(BUFFERS):
      buffers.append(key)
      continue
    out[new] = value
  if renamed:
    notes.append(f"renamed {renamed} TF-style LayerNorm gamma/beta keys to weight/bias")
  if buffers:
    notes.append(f"ignored non-parameter buffers: {', '.join(buffers)}")
  for dup, orig in TIED.items():
    if dup not in out:
      continue
    if orig not in out and dup.endswith(".bias"):
      out[orig] = out.pop(dup)
      notes.append(f"took {orig} from {dup}")
      continue
    if orig not in out:
      continue  # nothing to tie to: stays unused and is reported as such
    a, b = np.asarray(out.pop(dup)), np.asarray(out[orig])
    if a.shape == b.shape and np.array_equal(a, b):
      notes.append(f"{dup} equals {orig} (tied in bertjax; not stored twice)")
    else:
      diff = f"max abs diff {np.max(np.abs(a.astype(np.float64) - b)):.3g}" if a.shape == b.shape else (
          f"shape {a.shape} vs {b.shape}")
      notes.append(f"WARNING: {dup} differs from {orig} ({diff}); bertjax ties them and keeps {orig}, so MLM "
                   "logits will differ from the source")
  return out, notes


def flatten(tree: Mapping[Any, Any]) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  return _flatten(tree)


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  return _unflatten(flat)


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree
