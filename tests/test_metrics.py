"""Metrics against hand-computed cases and sklearn/scipy cross-checks."""

import math

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from bertjax.tasks import metrics as M


# ------------------------------------------------------------------ GLUE


def test_accuracy_hand():
  # Matches at positions 0 and 2 of 4 -> 2/4.
  assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_f1_binary_hand():
  # preds 1 1 0 0 1 vs labels 1 0 1 0 1: tp=2 (0, 4), fp=1 (1), fn=1 (2) -> 2*2/(2*2+1+1) = 2/3.
  assert M.f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(2 / 3)
  # No positives anywhere: 0 by convention (sklearn's zero_division=0).
  assert M.f1_binary([0, 0], [0, 0]) == 0.0


def test_matthews_hand():
  # Same vectors: tp=2 tn=1 fp=1 fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
  assert M.matthews_corr([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(1 / 6)
  assert M.matthews_corr([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
  assert M.matthews_corr([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
  # A constant classifier: undefined, 0 (as sklearn and the CoLA convention).
  assert M.matthews_corr([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_pearson_spearman_hand():
  # x=1,2,3 y=1,2,4: dx=-1,0,1 dy=-4/3,-1/3,5/3; cov=3, Sxx=2, Syy=42/9 -> 3/sqrt(84/9)=9/sqrt(84).
  assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
  # ranks y = 1,3,2,4 vs 1,2,3,4: sum d^2 = 2 -> 1 - 6*2/(4*(16-1)) = 0.8.
  assert M.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
  assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
  assert math.isnan(M.spearman([2, 2, 2], [1, 2, 3]))


@pytest.mark.parametrize("seed", range(5))
def test_glue_metrics_cross_check(seed):
  rng = np.random.default_rng(seed)
  labels, preds = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  assert M.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
  assert M.f1_binary(preds, labels) == pytest.approx(skm.f1_score(labels, preds))
  assert M.matthews_corr(preds, labels) == pytest.approx(skm.matthews_corrcoef(labels, preds))
  l3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
  assert M.matthews_corr(p3, l3) == pytest.approx(skm.matthews_corrcoef(l3, p3))
  x = rng.normal(size=100)
  y = np.round(x + rng.normal(size=100), 1)  # Rounded: ties exercise average ranks.
  assert M.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
  ranks = lambda v: scipy.stats.rankdata(v)  # noqa: E731
  assert M.spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_glue_metrics_per_task():
  labels = np.array([1, 0, 1, 0, 1])
  preds = np.array([1, 1, 0, 0, 1])
  assert M.glue_metrics("cola", preds, labels) == {"matthews_corr": pytest.approx(1 / 6)}
  assert M.glue_metrics("sst2", preds, labels) == {"accuracy": pytest.approx(0.6)}
  # acc 3/5, f1 2/3 -> mean (0.6 + 0.6667) / 2 = 0.6333.
  mrpc = M.glue_metrics("mrpc", preds, labels)
  assert mrpc == pytest.approx(
      {"accuracy": 0.6, "f1": 2 / 3, "accuracy_f1_mean": (0.6 + 2 / 3) / 2})
  logits = np.eye(2)[preds] * 3.0 - 1.0  # argmax recovers preds.
  assert M.glue_metrics("qqp", logits, labels) == mrpc
  assert M.glue_metrics("mnli", [0, 2, 1], [0, 2, 2])["accuracy"] == pytest.approx(2 / 3)
  stsb = M.glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [10, 30, 20, 40])
  assert stsb["spearman"] == pytest.approx(0.8)
  assert stsb["pearson_spearman_mean"] == pytest.approx((stsb["pearson"] + 0.8) / 2)
  with pytest.raises(ValueError):
    M.glue_metrics("nope", preds, labels)


# ------------------------------------------------------------------ SQuAD


@pytest.mark.parametrize("raw,norm", [
    ("The Cat!", "cat"),
    ("  an  apple, a   day ", "apple day"),
    ("theater anthem", "theater anthem"),  # Articles only as whole words.
    ("A-B", "ab"),  # Punctuation goes first, so 'a-b' -> 'ab', not an article.
    ("the", ""),
    ("Élan\tVITAL.", "élan vital"),
])
def test_normalize_answer(raw, norm):
  assert M.normalize_answer(raw) == norm


def test_squad_f1_hand():
  # pred -> 'cat sat on mat' (4), gold -> 'cat on mat' (3): common 3, P=3/4, R=1 -> F1 = 6/7.
  assert M.squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
  assert M.squad_exact("The  Broncos.", "broncos") == 1
  assert M.squad_f1("", "the", version_2=True) == 1.0  # Both empty after normalisation.
  assert M.squad_f1("", "the", version_2=False) == 0.0
  assert M.squad_f1("x", "", version_2=True) == 0.0


class _Ex:

  def __init__(self, id_, answers):
    self.id, self.answers = id_, answers


def test_squad_metrics_v1_hand():
  examples = [_Ex("q1", ["Denver Broncos", "Broncos"]), _Ex("q2", ["1990s"]), _Ex("q3", ["x"])]
  preds = {"q1": "the Broncos", "q2": "1990s decade"}  # q3 missing: scores 0.
  # q1: exact 1, f1 1. q2: exact 0, f1 P=1/2 R=1 -> 2/3. q3: 0, 0.
  out = M.squad_metrics(examples, preds, version_2=False)
  assert out == pytest.approx({"exact": 100 / 3, "f1": 100 * (1 + 2 / 3) / 3, "total": 3})
  rows = [{"id": "q1", "answers": {"text": ["Broncos"], "answer_start": [0]}}]
  assert M.squad_metrics(rows, {"q1": "broncos"}, version_2=False)["exact"] == 100.0


def test_squad_metrics_v2_hand():
  examples = [_Ex("q1", ["Paris"]), _Ex("q2", []), _Ex("q3", ["the"]), _Ex("q4", ["blue whale"])]
  preds = {"q1": "Paris", "q2": "", "q3": "London", "q4": ""}
  # q3's only gold normalises to '' -> no-answer. Scores: q1 1, q2 1, q3 0, q4 0.
  out = M.squad_metrics(examples, preds, version_2=True)
  assert out["exact"] == out["f1"] == 50.0
  assert (out["HasAns_exact"], out["HasAns_total"]) == (50.0, 2)  # q1 right, q4 wrong.
  assert (out["NoAns_exact"], out["NoAns_total"]) == (50.0, 2)  # q2 right, q3 wrong.
  na = {"q1": 0.1, "q2": 0.9, "q3": 0.8, "q4": 0.7}
  out = M.squad_metrics(examples, preds, version_2=True, na_probs=na, na_prob_thresh=0.5)
  # na > 0.5 -> no answer for q2 (1), q3 (1), q4 (0); q1 keeps 1 -> 3/4.
  assert out["exact"] == 75.0
  # Sweep from 2 (the no-answer count): q1 +1 -> 3 (t=0.1); q4 +0; q3 -1 (answered); q2 +0.
  assert (out["best_exact"], out["best_exact_thresh"]) == (75.0, 0.1)
  assert (out["best_f1"], out["best_f1_thresh"]) == (75.0, 0.1)
  na["q3"] = 0.05  # Now the answered no-answer q3 comes first in the sweep.
  out = M.squad_metrics(examples, preds, version_2=True, na_probs=na, na_prob_thresh=0.5)
  # Thresholded: q1 1, q2 1 (0.9), q3 0 (kept, wrong), q4 0 (0.7) -> 50.
  # Sweep from 2: q3 -1 -> 1; q1 +1 -> 2 (not > 2); q4, q2 +0 -> best 2/4 at threshold 0.0.
  assert (out["exact"], out["best_exact"], out["best_exact_thresh"]) == (50.0, 50.0, 0.0)


# ------------------------------------------------------------------ NER


def test_get_entities_chunk_rules():
  tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG", "B-PER", "B-PER", "I-PER"]
  # I- opens an entity; a type change splits; B- after B- starts a new entity.
  assert M.get_entities(tags) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 5), ("PER", 6, 6),
                                  ("PER", 7, 8)]
  assert M.get_entities(["S-PER", "B-LOC", "E-LOC", "E-LOC"]) == [
      ("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]
  assert M.get_entities(["O", "O"]) == []


def test_ner_f1_hand():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-ORG"]]
  # gold {PER 0-1, LOC 3, ORG s1:0}; pred {PER 0-1, ORG 3, ORG s1:0} -> 2 correct of 3 and 3.
  out = M.ner_f1(gold, pred)
  assert out["precision"] == out["recall"] == out["f1"] == pytest.approx(2 / 3)
  # Boundary errors count fully wrong: PER 0-1 predicted as PER 0-0.
  out = M.ner_f1([["B-PER", "I-PER"]], [["B-PER", "O"]])
  assert (out["precision"], out["recall"]) == (0.0, 0.0) and out["f1"] == 0.0
  assert M.ner_f1([["O"]], [["O"]])["f1"] == 0.0
  with pytest.raises(ValueError):
    M.ner_f1([["O", "O"]], [["O"]])


def _naive_entities(tags):
  """Reference for VALID IOB2 only: B-X starts, following I-X continue."""
  out, i = [], 0
  while i < len(tags):
    if tags[i].startswith("B-"):
      j = i
      while j + 1 < len(tags) and tags[j + 1] == "I-" + tags[i][2:]:
        j += 1
      out.append((tags[i][2:], i, j))
      i = j + 1
    else:
      i += 1
  return out


def _random_iob2(rng, n):
  tags, prev = [], "O"
  for _ in range(n):
    r = rng.random()
    if r < 0.4:
      tags.append("O")
    elif r < 0.7 or prev == "O":
      tags.append("B-" + rng.choice(["PER", "LOC", "ORG"]))
    else:
      tags.append("I-" + prev[2:])
    prev = tags[-1]
  return tags


def test_ner_f1_matches_naive_on_valid_iob2():
  rng = np.random.default_rng(0)
  gold = [_random_iob2(rng, int(rng.integers(1, 20))) for _ in range(200)]
  pred = [[t if rng.random() < 0.8 else str(rng.choice(["O", "B-PER", "I-LOC"])) for t in s]
          for s in gold]
  for s in gold:
    assert M.get_entities(s) == _naive_entities(s)
  g = {(i, *c) for i, s in enumerate(gold) for c in _naive_entities(s)}
  p = {(i, *c) for i, s in enumerate(pred) for c in M.get_entities(s)}
  out = M.ner_f1(gold, pred)
  assert out["num_correct"] == len(g & p) and out["num_gold"] == len(g)
  assert out["f1"] == pytest.approx(2 * len(g & p) / (len(g) + len(p)))
  assert 0.3 < out["f1"] < 1.0
