"""Official metrics for GLUE, SQuAD v1.1/v2.0 and CoNLL-2003 NER, and classification reports (numpy/scipy only)."""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

# ----------------------------------------------------------------------------- GLUE


def accuracy(preds: Any, labels: Any) -> float:
  preds, labels = np.asarray(preds), np.asarray(labels)
  return float(np.mean(preds == labels)) if labels.size else 0.0


def f1_binary(preds: Any, labels: Any) -> float:
  """F1 of the positive class 1: 2 tp / (2 tp + fp + fn); 0 when there is nothing positive."""
  preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
  tp = np.sum(preds & labels)
  denom = 2 * tp + np.sum(preds & ~labels) + np.sum(~preds & labels)
  return float(2 * tp / denom) if denom else 0.0


def matthews_corr(preds: Any, labels: Any) -> float:
  """Matthews correlation (multi-class R_K form, as sklearn); 0 when undefined."""
  preds, labels = np.asarray(preds).ravel(), np.asarray(labels).ravel()
  classes, inv = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  k, n = len(classes), len(labels)
  conf = np.zeros((k, k), np.float64)
  np.add.at(conf, (inv[:n], inv[n:]), 1)
  t, p = conf.sum(1), conf.sum(0)  # True / predicted counts per class.
  c, s = np.trace(conf), conf.sum()
  denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - t @ p) / denom) if denom else 0.0


def _corr(fn, preds: Any, labels: Any) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Constant input: NaN, with a scipy warning.
    return float(fn(np.asarray(preds, np.float64), np.asarray(labels, np.float64))[0])


def pearson(preds: Any, labels: Any) -> float:
  """Pearson r; NaN when either input is constant."""
  return _corr(scipy.stats.pearsonr, preds, labels)


def spearman(preds: Any, labels: Any) -> float:
  """Spearman rho (ties get average ranks); NaN when either input is constant."""
  return _corr(scipy.stats.spearmanr, preds, labels)


def top_k(queries: np.ndarray, corpus: np.ndarray, k: int, query_block: int = 256,
          corpus_block: int = 32768) -> tuple[np.ndarray, np.ndarray]:
  """Exact search by dot product (cosine for unit vectors): (scores, corpus rows), each [Q, min(k, C)], best first
  (ties: lower row first), for `queries` [Q, D] over `corpus` [C, D]. Blocks of `query_block` queries against
  `corpus_block` rows keep memory bounded; `corpus` may be a memmap, read block by block."""
  n = len(corpus)
  k = min(k, n)
  scores, rows = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
  for qs in range(0, len(queries), query_block):
    block = queries[qs:qs + query_block]
    best_s, best_r = np.empty((len(block), 0), np.float32), np.empty((len(block), 0), np.int64)
    for cs in range(0, n, corpus_block):
      sim = block @ np.asarray(corpus[cs:cs + corpus_block]).T
      kk = min(k, sim.shape[1])
      part = np.argpartition(sim, sim.shape[1] - kk, axis=1)[:, -kk:]  # the kk largest, unordered
      cand_s = np.concatenate([best_s, np.take_along_axis(sim, part, 1)], 1)
      cand_r = np.concatenate([best_r, part + cs], 1)
      order = np.lexsort((cand_r, -cand_s), axis=-1)[:, :k]
      best_s, best_r = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_r, order, 1)
    scores[qs:qs + len(block)], rows[qs:qs + len(block)] = best_s, best_r
  return scores, rows


def retrieval(queries: np.ndarray, corpus: np.ndarray, relevant: Sequence[Sequence[int]],
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
  """`top_k` of `queries` [Q, D] over `corpus` [C, D]; `relevant[q]`: the corpus rows relevant to query q. ->
  recall@k (the fraction of each query's relevant rows in its top k, averaged over queries), mrr@10 (1 / rank of
  the first relevant row within the top 10, else 0) and `top` [Q, max(ks, 10)] (row indices, best first)."""
  _, top = top_k(queries, corpus, max(*ks, 10))
  hits = np.array([np.isin(row, np.asarray(r)) for row, r in zip(top, relevant)], bool).reshape(top.shape)
  n_rel = np.array([max(len(r), 1) for r in relevant], np.float64)
  out: dict[str, Any] = {f"recall@{k}": float(np.mean(hits[:, :k].sum(1) / n_rel)) for k in ks}
  first = np.where(hits[:, :10].any(1), hits[:, :10].argmax(1) + 1, 0)
  out["mrr@10"] = float(np.mean(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)))
  out["top"] = top
  return out


def glue_metrics(task: str, preds: Any, labels: Any) -> dict[str, float]:
  """GLUE dev metrics. `preds` are class ids or `[N, C]` logits (scores for stsb).

  cola: matthews_corr; sst2/mnli/qnli/rte/wnli: accuracy; mrpc/qqp: accuracy, f1,
  accuracy_f1_mean; stsb: pearson, spearman, pearson_spearman_mean.
  """
  preds, labels = np.asarray(preds), np.asarray(labels)
  if task == "stsb":
    p, s = pearson(preds.reshape(-1), labels), spearman(preds.reshape(-1), labels)
    return {"pearson": p, "spearman": s, "pearson_spearman_mean": (p + s) / 2}
  if preds.ndim == 2:
    preds = preds.argmax(-1)
  if preds.shape != labels.shape:
    raise ValueError(f"predictions {preds.shape} and labels {labels.shape} differ in shape")
  if task == "cola":
    return {"matthews_corr": matthews_corr(preds, labels)}
  if task in ("mrpc", "qqp"):
    acc, f1 = accuracy(preds, labels), f1_binary(preds, labels)
    return {"accuracy": acc, "f1": f1, "accuracy_f1_mean": (acc + f1) / 2}
  if task in ("sst2", "mnli", "qnli", "rte", "wnli"):
    return {"accuracy": accuracy(preds, labels)}
  raise ValueError(f"unknown GLUE task '{task}'")


# ----------------------------------------------------------------------------- SQuAD


_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Official SQuAD normalisation: lower, drop punctuation, drop a/an/the, squash whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> int:
  return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, version_2: bool = True) -> float:
  """Token-overlap F1. v2.0: 1 if both normalise to empty, 0 if only one does; v1.1: 0 then."""
  pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if version_2 and (not pred_toks or not gold_toks):
    return float(pred_toks == gold_toks)
  common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred_toks), same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def _gold(example: Any) -> tuple[str, list[str]]:
  """(id, gold texts) of a SquadExample-like object or a hub row {'id', 'answers': {'text'}}."""
  if isinstance(example, Mapping):
    answers = example["answers"]
    return example["id"], list(answers["text"] if isinstance(answers, Mapping) else answers)
  return example.id, list(example.answers)


def _best_thresh(preds, scores, na_probs, has_ans) -> tuple[float, float]:
  """The official v2.0 sweep: best score over "no answer when na_prob > t" thresholds."""
  cur = best = sum(1 for q in scores if not has_ans[q])
  thresh = 0.0
  for q in sorted(scores, key=lambda q: na_probs[q]):
    cur += scores[q] if has_ans[q] else (-1 if preds[q] else 0)
    if cur > best:
      best, thresh = cur, na_probs[q]
  return 100.0 * best / len(scores), float(thresh)


def squad_metrics(dataset_examples: Iterable[Any], predictions: Mapping[str, str],
                  version_2: bool, na_probs: Mapping[str, float] | None = None,
                  na_prob_thresh: float = 1.0) -> dict[str, float]:
  """The official evaluate-v1.1 / evaluate-v2.0 scores, in percent.

  Scores are the max over gold answers; a question with no prediction scores 0. v2.0: gold
  answers that normalise to empty are dropped and an empty list means no answer (gold ['']);
  adds HasAns_*/NoAns_* and, given `na_probs` (e.g. null odds), scores a question as "no
  answer" where na_prob > `na_prob_thresh` and reports best_exact/best_f1 with their
  thresholds. v1.1 ignores `na_probs`.
  """
  exact, f1, has_ans, preds = {}, {}, {}, {}
  for ex in dataset_examples:
    qid, golds = _gold(ex)
    if version_2:
      golds = [a for a in golds if normalize_answer(a)] or [""]
    has_ans[qid] = golds != [""]
    pred = predictions.get(qid)
    preds[qid] = pred or ""
    exact[qid] = 0 if pred is None else max(squad_exact(pred, g) for g in golds)
    f1[qid] = 0.0 if pred is None else max(squad_f1(pred, g, version_2) for g in golds)
  n = len(exact)
  if not n:
    raise ValueError("no SQuAD examples to score")
  raw_exact, raw_f1 = dict(exact), dict(f1)
  if version_2 and na_probs is not None:
    missing = [q for q in exact if q not in na_probs]
    if missing:
      raise ValueError(f"na_probs has no entry for {len(missing)} question(s), e.g. {missing[0]}")
    for q in exact:
      if na_probs[q] > na_prob_thresh:
        exact[q] = f1[q] = float(not has_ans[q])
  out = {"exact": 100.0 * sum(exact.values()) / n, "f1": 100.0 * sum(f1.values()) / n,
         "total": float(n)}
  if not version_2:
    return out
  for name, keep in (("HasAns", True), ("NoAns", False)):
    qs = [q for q in exact if has_ans[q] == keep]
    out[f"{name}_total"] = float(len(qs))
    if qs:
      out[f"{name}_exact"] = 100.0 * sum(exact[q] for q in qs) / len(qs)
      out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in qs) / len(qs)
  if na_probs is not None:
    out["best_exact"], out["best_exact_thresh"] = _best_thresh(preds, raw_exact, na_probs, has_ans)
    out["best_f1"], out["best_f1_thresh"] = _best_thresh(preds, raw_f1, na_probs, has_ans)
  return out


# ----------------------------------------------------------------------------- NER


def _chunk_end(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return (prev_tag in ("E", "S")
          or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
          or (prev_tag not in ("O", ".") and prev_type != type_))


def _chunk_start(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return (tag in ("B", "S")
          or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
          or (tag not in ("O", ".") and prev_type != type_))


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """(type, first, last) chunks of one tag sequence, by conlleval / seqeval's default rules.

  A tag is `O` or `<prefix>-<TYPE>` with prefix B, I, E or S. A chunk ENDS before the current
  tag when the previous tag was E or S; when the previous was B or I and the current is B, S or O;
  or when the type changes. A chunk STARTS at B or S; at I or E after O, E or S (so an I- with no
  B- opens an entity); or wherever the type changes. So `I-PER I-PER` is one PER entity and
  `B-PER I-LOC` two entities.
  """
  chunks, prev_tag, prev_type, begin = [], "O", "", 0
  for i, tag_str in enumerate(list(tags) + ["O"]):
    tag = tag_str[:1]
    type_ = tag_str[1:].split("-", 1)[-1] or "_"
    if _chunk_end(prev_tag, tag, prev_type, type_):
      chunks.append((prev_type, begin, i - 1))
    if _chunk_start(prev_tag, tag, prev_type, type_):
      begin = i
    prev_tag, prev_type = tag, type_
  return chunks


def ner_f1(true_tag_seqs: Sequence[Sequence[str]],
           pred_tag_seqs: Sequence[Sequence[str]]) -> dict[str, float]:
  """Entity-level micro precision / recall / F1 (seqeval default mode, conlleval chunks).

  An entity counts as correct only when type, first and last token all match a gold entity.
  """
  if len(true_tag_seqs) != len(pred_tag_seqs):
    raise ValueError(f"{len(true_tag_seqs)} gold sequences but {len(pred_tag_seqs)} predicted")
  gold, pred = set(), set()
  for i, (t, p) in enumerate(zip(true_tag_seqs, pred_tag_seqs)):
    if len(t) != len(p):
      raise ValueError(f"sequence {i}: {len(t)} gold tags but {len(p)} predicted")
    gold.update((i, *c) for c in get_entities(t))
    pred.update((i, *c) for c in get_entities(p))
  correct = len(gold & pred)
  precision = correct / len(pred) if pred else 0.0
  recall = correct / len(gold) if gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"precision": precision, "recall": recall, "f1": f1,
          "num_gold": float(len(gold)), "num_pred": float(len(pred)), "num_correct": float(correct)}


# ----------------------------------------------------------------------------- classification reports


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Precision, recall, F1 per entry (0 where undefined, as sklearn's zero_division=0)."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  with np.errstate(divide="ignore", invalid="ignore"):
    p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
    f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
  return p, r, f


def _report(tp, fp, fn, support, names: Sequence[str], accuracy: float) -> dict[str, Any]:
  p, r, f = _prf(tp, fp, fn)
  mp, mr, mf = _prf(tp.sum(), fp.sum(), fn.sum())
  w = support / max(support.sum(), 1)
  out: dict[str, Any] = {
      "accuracy": accuracy,
      "macro_precision": float(p.mean()), "macro_recall": float(r.mean()), "macro_f1": float(f.mean()),
      "micro_precision": float(mp), "micro_recall": float(mr), "micro_f1": float(mf),
      "weighted_f1": float((f * w).sum()),
  }
  out["per_class"] = {str(n): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(support[i])} for i, n in enumerate(names)}
  return out


def classification_report(preds: Any, labels: Any, names: Sequence[str]) -> dict[str, Any]:
  """Single-label report: accuracy; macro / micro / weighted P, R, F1; per-class P/R/F1/support; confusion.

  `preds`, `labels`: class ids in [0, len(names)). Macro averages weigh every class in `names` equally
  (a class with no gold and no predicted rows counts 0, as sklearn with `labels=` and zero_division=0);
  micro averages pool the counts (equal to accuracy here). `confusion_matrix[i][j]` counts rows of gold
  class i predicted as j.
  """
  preds, labels = np.asarray(preds, np.int64).ravel(), np.asarray(labels, np.int64).ravel()
  k = len(names)
  conf = np.zeros((k, k), np.int64)
  np.add.at(conf, (labels, preds), 1)
  tp = np.diag(conf)
  out = _report(tp, conf.sum(0) - tp, conf.sum(1) - tp, conf.sum(1), names, accuracy(preds, labels))
  out["confusion_matrix"] = conf.tolist()
  return out


def multilabel_report(preds: Any, labels: Any, names: Sequence[str]) -> dict[str, Any]:
  """Multi-label report from 0/1 matrices `[N, K]`: `accuracy` is the exact-match (subset) accuracy, P/R/F1
  count each (row, label) decision; `confusion_matrix[k]` is label k's `[[tn, fp], [fn, tp]]`."""
  preds, labels = np.asarray(preds).astype(bool), np.asarray(labels).astype(bool)
  tp = (preds & labels).sum(0)
  fp, fn = (preds & ~labels).sum(0), (~preds & labels).sum(0)
  tn = (~preds & ~labels).sum(0)
  exact = float(np.mean(np.all(preds == labels, axis=1))) if len(labels) else 0.0
  out = _report(tp, fp, fn, labels.sum(0), names, exact)
  out["confusion_matrix"] = np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).tolist()
  return out


def report_table(report: Mapping[str, Any]) -> str:
  """The per-class table and averages as aligned text (like sklearn's classification_report)."""
  per = report["per_class"]
  width = max([len(n) for n in per] + [12])
  lines = [f"{'':>{width}}  precision  recall      f1  support"]
  for name, m in per.items():
    lines.append(f"{name:>{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
  n = sum(m["support"] for m in per.values())
  lines.append("")
  for avg in ("macro", "micro"):
    lines.append(f"{avg + ' avg':>{width}}  {report[avg + '_precision']:9.4f}  {report[avg + '_recall']:6.4f}  "
                 f"{report[avg + '_f1']:6.4f}  {n:7d}")
  lines.append(f"{'accuracy':>{width}}  {'':9}  {'':6}  {report['accuracy']:6.4f}")
  return "\n".join(lines)
