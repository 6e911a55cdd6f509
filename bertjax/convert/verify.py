"""Numeric parity of a bertjax model and the transformers (PyTorch) model loaded from an exported folder."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bertjax.artifacts.factory import build_model
from bertjax.artifacts.mapping import AUTO_CLASS
from bertjax.models.bert import BertConfig

# Output names per head, in the order the bertjax head returns them (transformers' attribute names).
HEAD_OUTPUTS = {
    "pretraining": ("prediction_logits", "seq_relationship_logits"),
    "masked_lm": ("logits",),
    "sequence_classification": ("logits",),
    "token_classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
}


class ParityError(Exception):
  """The exported model does not reproduce the bertjax outputs (or transformers would not load it cleanly)."""


def torch_available() -> bool:
  try:
    import torch  # noqa: F401 - optional [hf] extra, imported only where used
    import transformers  # noqa: F401 - optional [hf] extra, imported only where used
  except ImportError:
    return False
  return True


def fixed_batch(cfg: BertConfig, rows: int = 4, seq_len: int = 32) -> dict[str, np.ndarray]:
  """`rows` random rows of two segments (token types 0 then 1); row 2 is padded to about half length."""
  t = min(seq_len, cfg.max_position_embeddings)
  rng = np.random.RandomState(0)
  ids = rng.randint(min(5, cfg.vocab_size - 1), cfg.vocab_size, size=(rows, t))
  lengths = np.full(rows, t)
  lengths[min(2, rows - 1)] = t // 2 + 1
  pos = np.arange(t)[None, :]
  mask = pos < lengths[:, None]
  types = ((pos >= (lengths[:, None] // 2)) & mask).astype(np.int64) if cfg.type_vocab_size > 1 else 0 * pos
  ids = np.where(mask, ids, cfg.pad_token_id if cfg.pad_token_id < cfg.vocab_size else 0)
  return {"input_ids": ids.astype(np.int64), "token_type_ids": np.broadcast_to(types, ids.shape).astype(np.int64),
          "attention_mask": mask.astype(np.int64)}


def bertjax_outputs(model: Any, head: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Last hidden state, pooler output (when the head has a pooler) and head logits, as float32 numpy.

  Runs eagerly: on CPU, XLA compiles a whole BERT slowly (seconds even when tiny), while eager per-op programs
  are cached across models and heads of the same shapes."""
  ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
  seq, pooled = model.bert(ids, types, mask)
  logits = model(ids, types, mask)
  out = {"last_hidden_state": np.asarray(seq, np.float32)}
  if pooled is not None:
    out["pooler_output"] = np.asarray(pooled, np.float32)
  logits = logits if isinstance(logits, tuple) else (logits,)
  out.update({name: np.asarray(v, np.float32) for name, v in zip(HEAD_OUTPUTS[head], logits)})
  return out


def load_hf_model(folder: str, head: str) -> Any:
  """The matching AutoModelFor* in float32 eval mode; any missing/unexpected/mismatched key is a ParityError."""
  import transformers  # optional [hf] extra, imported only where used
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  auto = getattr(transformers, AUTO_CLASS[head])
  model, info = auto.from_pretrained(folder, output_loading_info=True)
  bad = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
  if bad or info.get("error_msgs"):
    raise ParityError(f"transformers {AUTO_CLASS[head]} loading {folder} reported {bad or info['error_msgs']}")
  return model.float().eval()


def hf_outputs(model: Any, head: str, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  import torch  # optional [hf] extra, imported only where used
  inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    base = model.base_model(**inputs)
    full = model(**inputs)
  out = {"last_hidden_state": base.last_hidden_state.numpy()}
  if base.pooler_output is not None:
    out["pooler_output"] = base.pooler_output.numpy()
  out.update({name: getattr(full, name).numpy() for name in HEAD_OUTPUTS[head]})
  return out


def token_level(head: str) -> set[str]:
  """Outputs with one entry per token ([B, T, ...])."""
  per_token = {"last_hidden_state", "prediction_logits", "start_logits", "end_logits"}
  return per_token | ({"logits"} if head in ("masked_lm", "token_classification") else set())


def max_abs_diffs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], attention_mask: np.ndarray | None = None,
                  per_token: set[str] = frozenset()) -> dict[str, float]:
  """Max abs diff per output; outputs in `per_token` only over attended tokens (padding's values are unused and
  ill-conditioned: float32 PyTorch itself is ~1e-5 off float64 there)."""
  if a.keys() != b.keys():
    raise ParityError(f"outputs differ in kind: bertjax {sorted(a)} vs transformers {sorted(b)}")
  diffs = {}
  for k in a:
    if a[k].shape != b[k].shape:
      raise ParityError(f"{k}: bertjax shape {a[k].shape} vs transformers {b[k].shape}")
    d = np.abs(a[k].astype(np.float64) - b[k])
    if k in per_token and attention_mask is not None:
      d = d[attention_mask.astype(bool)]
    diffs[k] = float(np.max(d))
  return diffs


def verify_folder(folder: str, cfg: BertConfig, head: str, params: Mapping[str, Any], num_labels: int | None,
                  atol: float) -> dict[str, float]:
  """Max abs diff per output (attended tokens) between bertjax (float32) and transformers on `fixed_batch`;
  raises ParityError over `atol` or when transformers reports missing/unexpected keys."""
  cfg = dataclasses.replace(cfg, dtype="float32")
  batch = fixed_batch(cfg)
  ours = bertjax_outputs(build_model(cfg, head, num_labels, params), head, batch)
  theirs = hf_outputs(load_hf_model(folder, head), head, batch)
  diffs = max_abs_diffs(ours, theirs, batch["attention_mask"], token_level(head))
  bad = {k: v for k, v in diffs.items() if not v <= atol}
  if bad:
    raise ParityError("transformers output differs from bertjax beyond --atol="
                      f"{atol:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
  return diffs
