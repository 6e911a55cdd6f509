"""SQuAD v1.1 / v2.0: JSON reader, sliding-window features and answer post-processing.

Features are `[CLS] question [SEP] context-window [SEP]`. Long contexts are split into windows
whose starts advance by `doc_stride` tokens (BERT's `run_squad.py` meaning; Hugging Face's
`stride` is the overlap instead). Answer spans are located with the fast tokenizer's character
offsets, and each context token is scored only in the window where it has the most context.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from bertjax.data.glue import as_tokenizer, special_ids
from bertjax.errors import UserError


@dataclasses.dataclass
class SquadExample:
  """One question; `answers`/`answer_starts` are empty for v2.0 unanswerable questions."""
  id: str
  question: str
  context: str
  answers: list[str]
  answer_starts: list[int]
  is_impossible: bool = False
  title: str = ""


def read_squad(path: str | Path) -> list[SquadExample]:
  """Reads an official SQuAD JSON file, checking every answer occurs at its `answer_start`."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"SQuAD file not found: expected {path.absolute()}; "
                    "set config.data.data_dir to the folder with the SQuAD JSON files")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise UserError(f"{path}: not a SQuAD file: expected a JSON object with a 'data' list")
  examples = []
  for article in data["data"]:
    for para in article.get("paragraphs", []):
      context = para.get("context")
      for qa in para.get("qas", []):
        qid = qa.get("id", "?")
        if not isinstance(context, str) or "question" not in qa or "id" not in qa:
          raise UserError(f"{path}: question id '{qid}': missing 'context', 'question' or 'id'")
        impossible = bool(qa.get("is_impossible", False))
        answers = [] if impossible else qa.get("answers", [])
        if not impossible and not answers:
          raise UserError(f"{path}: question id '{qid}': no answers and not marked is_impossible")
        texts, starts = [], []
        for a in answers:
          text, start = a.get("text"), a.get("answer_start")
          if not isinstance(text, str) or not isinstance(start, int):
            raise UserError(f"{path}: question id '{qid}': answer needs 'text' and integer "
                            "'answer_start'")
          found = context[start:start + len(text)]
          if found != text:
            raise UserError(f"{path}: question id '{qid}': answer {text!r} does not occur at "
                            f"answer_start {start} of its context (found {found!r}); "
                            "fix answer_start or the answer text")
          texts.append(text)
          starts.append(start)
        examples.append(SquadExample(qid, qa["question"], context, texts, starts, impossible,
                                     article.get("title", "")))
  return examples


def load_hub_split(name: str, split: str) -> list[SquadExample]:
  """Loads "squad" or "squad_v2" ("train" or "validation"/"dev") from the Hugging Face hub."""

  if name not in ("squad", "squad_v2"):
    raise UserError(f"unknown SQuAD dataset '{name}'; expected 'squad' or 'squad_v2'")
  ds = datasets.load_dataset(f"rajpurkar/{name}", split="validation" if split == "dev" else split)
  return [SquadExample(r["id"], r["question"], r["context"], list(r["answers"]["text"]),
                       list(r["answers"]["answer_start"]), not r["answers"]["text"], r["title"])
          for r in ds]


def _windows(n: int, max_doc: int, doc_stride: int) -> list[tuple[int, int]]:
  """(start, length) of each context window, as in BERT's run_squad.py."""
  out, start = [], 0
  while True:
    length = min(n - start, max_doc)
    out.append((start, length))
    if start + length >= n:
      return out
    start += min(length, doc_stride)


def convert_examples_to_features(examples: Sequence[SquadExample], tokenizer: Any,
                                 max_seq_length: int, doc_stride: int, max_query_length: int,
                                 is_training: bool) -> dict[str, np.ndarray]:
  """Examples -> one feature per context window.

  Returns `input_ids, token_type_ids, attention_mask [F, L] int32`; `example_index [F] int32`;
  `offsets [F, L, 2] int32` (character span in the context, -1 for non-context tokens);
  `token_is_max_context [F, L] bool`; and when `is_training`, `start_positions, end_positions
  [F] int32` (0, the [CLS] index, when the answer is impossible or not inside the window).
  """
  if max_seq_length < max_query_length + 4 or doc_stride < 1 or max_query_length < 1:
    raise UserError(f"max_seq_length ({max_seq_length}) must exceed max_query_length "
                    f"({max_query_length}) + 3, and doc_stride ({doc_stride}) must be >= 1")
  tok = as_tokenizer(tokenizer)
  cls_id, sep_id, pad_id = special_ids(tok)
  questions = tok.encode_batch([e.question for e in examples], add_special_tokens=False)
  unique = list(dict.fromkeys(e.context for e in examples))
  ctx_enc = dict(zip(unique, tok.encode_batch(unique, add_special_tokens=False)))
  rows: dict[str, list[Any]] = {k: [] for k in ("ids", "n_q", "start", "length", "example")}
  offs, max_ctx, spans = [], [], []
  for ex_i, (ex, q) in enumerate(zip(examples, questions)):
    c = ctx_enc[ex.context]
    q_ids, c_ids = q.ids[:max_query_length], np.asarray(c.ids, np.int32)
    c_off = np.asarray(c.offsets, np.int32).reshape(-1, 2)
    wins = _windows(len(c_ids), max_seq_length - len(q_ids) - 3, doc_stride)
    # Max-context score of token j in a window: min(left, right context) + 0.01 * window length.
    score = np.full((len(wins), len(c_ids)), -np.inf)
    for w, (s, n) in enumerate(wins):
      j = np.arange(s, s + n)
      score[w, s:s + n] = np.minimum(j - s, s + n - 1 - j) + 0.01 * n
    best = score.argmax(0) if len(c_ids) else np.zeros(0, np.int64)
    tok_s = tok_e = -1
    if is_training and not ex.is_impossible:
      a_s = ex.answer_starts[0]
      a_e = a_s + len(ex.answers[0])
      tok_s = int(np.searchsorted(c_off[:, 1], a_s, side="right"))  # First token ending after a_s.
      tok_e = int(np.searchsorted(c_off[:, 0], a_e, side="left")) - 1  # Last starting before a_e.
    for w, (s, n) in enumerate(wins):
      rows["ids"].append(np.concatenate([[cls_id], q_ids, [sep_id], c_ids[s:s + n], [sep_id]]))
      rows["n_q"].append(len(q_ids))
      rows["start"].append(s)
      rows["length"].append(n)
      rows["example"].append(ex_i)
      offs.append(c_off[s:s + n])
      max_ctx.append(best[s:s + n] == w)
      base = len(q_ids) + 2 - s
      inside = 0 <= tok_s <= tok_e and s <= tok_s and tok_e < s + n
      spans.append((tok_s + base, tok_e + base) if inside else (0, 0))
  f = len(rows["ids"])
  out = {
      "input_ids": np.full((f, max_seq_length), pad_id, np.int32),
      "token_type_ids": np.zeros((f, max_seq_length), np.int32),
      "attention_mask": np.zeros((f, max_seq_length), np.int32),
      "example_index": np.asarray(rows["example"], np.int32).reshape(-1),
      "offsets": np.full((f, max_seq_length, 2), -1, np.int32),
      "token_is_max_context": np.zeros((f, max_seq_length), bool),
  }
  for i, ids in enumerate(rows["ids"]):
    c0, n = rows["n_q"][i] + 2, rows["length"][i]
    out["input_ids"][i, :len(ids)] = ids
    out["attention_mask"][i, :len(ids)] = 1
    out["token_type_ids"][i, c0:len(ids)] = 1
    out["offsets"][i, c0:c0 + n] = offs[i]
    out["token_is_max_context"][i, c0:c0 + n] = max_ctx[i]
  if is_training:
    pos = np.asarray(spans, np.int32).reshape(-1, 2)
    out["start_positions"], out["end_positions"] = pos[:, 0].copy(), pos[:, 1].copy()
  return out


def postprocess_predictions(examples: Sequence[SquadExample], features: dict[str, np.ndarray],
                            start_logits: np.ndarray, end_logits: np.ndarray,
                            n_best_size: int = 20, max_answer_length: int = 30,
                            version_2: bool = False, null_score_diff_threshold: float = 0.0,
                            ) -> tuple[dict[str, str], dict[str, float]]:
  """Best answer text per question id, and null odds (null score - best span score).

  Span candidates are the top `n_best_size` starts and ends among context tokens (starts only
  where the token has max context), with end >= start and at most `max_answer_length` tokens.
  The null score is the minimum over the example's windows of start[0] + end[0]. For v2.0 the
  answer is "" when null odds > `null_score_diff_threshold`; with no valid span it is "" (odds inf).
  """
  predictions, null_odds = {}, {}
  for ex, span in zip(examples, best_spans(examples, features, start_logits, end_logits, n_best_size,
                                           max_answer_length)):
    null_odds[ex.id] = span.null_odds
    predictions[ex.id] = "" if version_2 and span.null_odds > null_score_diff_threshold else span.text
  return predictions, null_odds


@dataclasses.dataclass
class Span:
  """The best answer of one example: text, its character offsets in the context, start + end logit."""
  text: str
  start: int
  end: int
  score: float  # -inf when no valid span
  null_score: float  # min over windows of start[0] + end[0] (the [CLS] "no answer" score)

  @property
  def null_odds(self) -> float:
    """null score - span score; inf when there is no valid span."""
    return float(self.null_score - self.score) if np.isfinite(self.score) else float("inf")


def best_spans(examples: Sequence[SquadExample], features: dict[str, np.ndarray], start_logits: np.ndarray,
               end_logits: np.ndarray, n_best_size: int = 20, max_answer_length: int = 30) -> list[Span]:
  """The best span of each example over its windows (the features whose `example_index` is the example's)."""
  start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
  n_feat = len(features["example_index"])
  if start_logits.shape[0] != n_feat or end_logits.shape[0] != n_feat:
    raise ValueError(f"{n_feat} features but logits of shape {start_logits.shape}, "
                     f"{end_logits.shape}; drop padded batch rows first")
  by_example: dict[int, list[int]] = {}
  for fi, ei in enumerate(features["example_index"]):
    by_example.setdefault(int(ei), []).append(fi)
  return [best_span(ex.context, by_example.get(ei, []), features, start_logits, end_logits, n_best_size,
                    max_answer_length) for ei, ex in enumerate(examples)]


def best_span(context: str, feature_indices: Sequence[int], features: dict[str, np.ndarray], start_logits: np.ndarray,
              end_logits: np.ndarray, n_best_size: int = 20, max_answer_length: int = 30) -> Span:
  """The highest-scoring valid span over the windows `feature_indices` of one example (see
  `postprocess_predictions`)."""
  best = Span("", -1, -1, -np.inf, np.inf)
  for fi in feature_indices:
    s_log, e_log = start_logits[fi], end_logits[fi]
    off = features["offsets"][fi]
    best.null_score = min(best.null_score, float(s_log[0] + e_log[0]))
    ctx = np.flatnonzero(off[:, 0] >= 0)
    starts = ctx[features["token_is_max_context"][fi][ctx]]
    starts = starts[np.argsort(-s_log[starts], kind="stable")[:n_best_size]]
    ends = ctx[np.argsort(-e_log[ctx], kind="stable")[:n_best_size]]
    if not len(starts) or not len(ends):
      continue
    length = ends[None, :] - starts[:, None] + 1
    score = np.where((length >= 1) & (length <= max_answer_length),
                     s_log[starts][:, None] + e_log[ends][None, :], -np.inf)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    if score[i, j] > best.score:
      a, b = int(off[starts[i], 0]), int(off[ends[j], 1])
      best = Span(context[a:b], a, b, float(score[i, j]), best.null_score)
  return best


def write_predictions(path: str | Path, predictions: dict[str, Any]) -> Path:
  """Writes `{question id: answer text}` (or null odds) as JSON for the official scripts."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(predictions, f, ensure_ascii=False, indent=2)
  return path
