"""Numeric parity of a bertjax model and the transformers (PyTorch) model loaded from an exported folder, or of a
sentence embedding model and sentence-transformers loading its exported folder."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bertjax.artifacts.factory import build_model
from bertjax.artifacts.mapping import AUTO_CLASS
from bertjax.data import tokenizer as toklib
from bertjax.models.bert import BertConfig

# Output names per head, in the order the bertjax head returns them (transformers' attribute names).
HEAD_OUTPUTS = {
    "pretraining": ("prediction_logits", "seq_relationship_logits"),
    "masked_lm": ("logits",),
    "sequence_classification": ("logits",),
    "token_classification": ("logits",),
    "question_answering": ("start_logits", "end_logits"),
}
# Texts of varying length for the sentence-transformers check: one word, casing, accents, digits and punctuation,
# and one of about 1,000 tokens, past any BERT's max_seq_length (both sides cut it at the exported limit).
ST_TEXTS = (
    "Hi.",
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leapt over a sleepy hound.",
    "Héllo Wörld! CAPITALS, numbers like 3.14159 and 2,048, and punctuation?!",
    "Central banks raised interest rates again this quarter.",
    "Sentence embeddings map each text to one vector, so that texts which mean similar things end up close "
    "together and a search becomes a nearest-neighbour lookup over the vectors of a collection.",
    "北京 is a city; naïve café résumé.",
    " ".join(["A long text is cut at max_seq_length tokens by both tokenizers, in the same place."] * 40),
)
MIN_COSINE = 0.9999


class ParityError(Exception):
  """The exported model does not reproduce the bertjax outputs (or transformers would not load it cleanly)."""


def torch_available() -> bool:
  try:
    import torch  # noqa: F401 - optional [hf] extra, imported only where used
    import transformers  # noqa: F401 - optional [hf] extra, imported only where used
  except ImportError:
    return False
  return True


def st_available() -> bool:
  """torch, transformers and sentence-transformers all import."""
  try:
    import sentence_transformers  # noqa: F401 - optional [hf] extra, imported only where used
  except ImportError:
    return False
  return torch_available()


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


def bertjax_embeddings(model: Any, folder: str, texts: tuple[str, ...], max_seq_length: int, pad_id: int,
                       pooling: str, normalize: bool) -> np.ndarray:
  """`texts` through the tokenizer in `folder` (cut at `max_seq_length` tokens, padded to the longest) and the
  sentence embedding `model`, eagerly -> float32 [len(texts), D]."""
  tok = toklib.load(folder)
  tok.enable_truncation(max_seq_length)
  enc = tok.encode_batch(list(texts))
  width = max(len(e.ids) for e in enc)
  ids = np.full((len(enc), width), pad_id, np.int32)
  mask = np.zeros((len(enc), width), np.int32)
  for i, e in enumerate(enc):
    ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
  return np.asarray(model(ids, np.zeros_like(ids), mask, pooling=pooling, normalize=normalize), np.float32)


def verify_sentence_transformers(folder: str, cfg: BertConfig, params: Mapping[str, Any], pooling: str,
                                 normalize: bool, max_seq_length: int, atol: float) -> dict[str, float]:
  """Encode `ST_TEXTS` with bertjax (float32) and with `SentenceTransformer(folder)` -> {"max_abs_diff",
  "min_cosine"}; raises ParityError when a diff is over `atol`, a cosine under `MIN_COSINE`, transformers reports
  missing / unexpected keys, or sentence-transformers reads another module chain or max_seq_length."""
  load_hf_model(folder, "sentence_embedding")  # the encoder alone loads with no key missing or unexpected
  from sentence_transformers import SentenceTransformer  # optional [hf] extra, imported only where used
  st = SentenceTransformer(folder, device="cpu", local_files_only=True)
  chain = [type(m).__name__ for m in st]
  want = ["Transformer", "Pooling", *(["Normalize"] if normalize else [])]
  if chain != want or st.max_seq_length != max_seq_length:
    raise ParityError(f"sentence-transformers reads {folder} as {' -> '.join(chain)} with max_seq_length "
                      f"{st.max_seq_length}, not {' -> '.join(want)} with {max_seq_length}")
  theirs = np.asarray(st.encode(list(ST_TEXTS), batch_size=len(ST_TEXTS), show_progress_bar=False,
                                convert_to_numpy=True), np.float64)
  model = build_model(dataclasses.replace(cfg, dtype="float32"), "sentence_embedding", params=params)
  ours = bertjax_embeddings(model, folder, ST_TEXTS, max_seq_length, cfg.pad_token_id, pooling, normalize)
  cosine = np.sum(ours * theirs, -1) / np.maximum(np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1),
                                                  1e-30)
  out = {"max_abs_diff": float(np.max(np.abs(ours - theirs))), "min_cosine": float(np.min(cosine))}
  if not (out["max_abs_diff"] <= atol and out["min_cosine"] >= MIN_COSINE):
    raise ParityError(f"sentence-transformers embeddings differ from bertjax: max abs diff "
                      f"{out['max_abs_diff']:.3g} (--atol={atol:g}), min cosine {out['min_cosine']:.6f} "
                      f"(needs >= {MIN_COSINE})")
  return out
