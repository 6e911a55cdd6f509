"""GLUE: task registry, TSV readers, BERT feature conversion and submission files.

Files follow the standard GLUE layout `<data_dir>/<TASK>/{train,dev,test}.tsv` (MNLI:
`dev_matched`, `dev_mismatched`, `test_matched`, `test_mismatched`). Columns are read by header
name; CoLA train/dev have no header. Quote characters are literal (no CSV quoting).

The tokenizer helpers here (`as_tokenizer`, `special_ids`) are shared by the SQuAD and NER readers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import tokenizers

from bertjax.errors import UserError

# Arrays a BERT encoder consumes; every other key in a feature dict is bookkeeping.
MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """How one GLUE task is laid out on disk, labelled and scored."""
  name: str
  dir_name: str
  text_columns: tuple[str, ...]  # One column (single sentence) or two (pair).
  label_column: str
  labels: tuple[str, ...] | None  # None: regression (STS-B).
  metric: str  # Key of `bertjax.tasks.metrics.glue_metrics` used for model selection.
  dev_splits: tuple[str, ...] = ("dev",)
  test_splits: tuple[str, ...] = ("test",)
  test_has_labels: bool = False
  index_column: str = "index"  # Test-file id column written back into submissions.
  headerless_columns: tuple[str, ...] | None = None  # Train/dev columns when there is no header.
  hub_columns: tuple[str, ...] = ()  # Text columns of the `nyu-mll/glue` hub dataset.
  submission_names: tuple[str, ...] = ()  # One file name per test split.

  @property
  def splits(self) -> tuple[str, ...]:
    return ("train",) + self.dev_splits + self.test_splits

  @property
  def is_regression(self) -> bool:
    return self.labels is None


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", ("sentence",), "label", _BINARY, "matthews_corr",
             headerless_columns=("source", "label", "original_label", "sentence"),
             hub_columns=("sentence",), submission_names=("CoLA.tsv",)),
    GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, "accuracy",
             hub_columns=("sentence",), submission_names=("SST-2.tsv",)),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY, "accuracy_f1_mean",
             hub_columns=("sentence1", "sentence2"), submission_names=("MRPC.tsv",)),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", None, "pearson_spearman_mean",
             hub_columns=("sentence1", "sentence2"), submission_names=("STS-B.tsv",)),
    GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY, "accuracy_f1_mean",
             index_column="id", hub_columns=("question1", "question2"),
             submission_names=("QQP.tsv",)),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label",
             ("entailment", "neutral", "contradiction"), "accuracy",
             dev_splits=("dev_matched", "dev_mismatched"),
             test_splits=("test_matched", "test_mismatched"),
             hub_columns=("premise", "hypothesis"), submission_names=("MNLI-m.tsv", "MNLI-mm.tsv")),
    GlueTask("qnli", "QNLI", ("question", "sentence"), "label", _NLI2, "accuracy",
             hub_columns=("question", "sentence"), submission_names=("QNLI.tsv",)),
    GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, "accuracy",
             hub_columns=("sentence1", "sentence2"), submission_names=("RTE.tsv",)),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, "accuracy",
             hub_columns=("sentence1", "sentence2"), submission_names=("WNLI.tsv",)),
]}


@dataclasses.dataclass
class Example:
  """One sentence (pair); `label` is a label name, a float (STS-B) or None (test)."""
  guid: str
  text_a: str
  text_b: str | None
  label: str | float | None
  index: int  # The file's `index`/`id` column where there is one, else the 0-based row number.


def get_task(task: str) -> GlueTask:
  if task not in GLUE_TASKS:
    raise UserError(f"unknown GLUE task '{task}'; expected one of {sorted(GLUE_TASKS)}")
  return GLUE_TASKS[task]


def _check_split(t: GlueTask, split: str) -> None:
  if split not in t.splits:
    raise UserError(f"unknown split '{split}' for GLUE task {t.name}; "
                    f"expected one of {list(t.splits)}")


def split_path(data_dir: str | Path, task: str, split: str) -> Path:
  t = get_task(task)
  _check_split(t, split)
  return Path(data_dir) / t.dir_name / f"{split}.tsv"


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
  """(1-based line number, tab-separated fields) for each non-empty line."""
  with open(path, encoding="utf-8-sig", newline="\n") as f:  # -sig: tolerate a BOM.
    out = []
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\n").rstrip("\r")
      if line:
        out.append((lineno, line.split("\t")))
  return out


def read_split(data_dir: str | Path, task: str, split: str) -> list[Example]:
  """Reads `<data_dir>/<TASK>/<split>.tsv` into Examples, validating columns and labels."""
  t = get_task(task)
  path = split_path(data_dir, task, split)
  if not path.is_file():
    raise UserError(f"GLUE {t.name} {split} file not found: expected {path.absolute()}; "
                    "set config.data.data_dir to a GLUE-layout folder")
  rows = _read_lines(path)
  is_test = split in t.test_splits
  has_label = not is_test or t.test_has_labels
  if t.headerless_columns is not None and not is_test:
    header = list(t.headerless_columns)
  else:
    if not rows:
      raise UserError(f"{path}: file is empty; expected a header line")
    header = rows.pop(0)[1]
  needed = list(t.text_columns) + ([t.label_column] if has_label else [])
  if is_test:
    needed = [t.index_column] + needed
  missing = [c for c in needed if c not in header]
  if missing:
    raise UserError(f"{path}:1: missing column(s) {missing} for GLUE task {t.name} {split}: "
                    f"expected {needed}, found {header}; "
                    f"check the file is {t.dir_name}/{split}.tsv")
  col = {c: header.index(c) for c in needed}
  idx_col = header.index(t.index_column) if t.index_column in header else None
  examples = []
  for row, (lineno, fields) in enumerate(rows):
    where = f"{path}:{lineno}"
    if len(fields) != len(header):
      raise UserError(f"{where}: expected {len(header)} tab-separated fields {header}, found "
                      f"{len(fields)}; quotes are literal, so look for a stray tab or line break")
    label: str | float | None = None
    if has_label:
      raw = fields[col[t.label_column]]
      if t.labels is None:
        try:
          label = float(raw)
        except ValueError:
          label = math.nan
        if not math.isfinite(label):
          raise UserError(f"{where}: {t.label_column} '{raw}' is not a finite number "
                          f"for task {t.name}")
      elif raw not in t.labels:
        raise UserError(f"{where}: label '{raw}' is not one of {list(t.labels)} for task {t.name}")
      else:
        label = raw
    index = row
    if idx_col is not None:
      try:
        index = int(fields[idx_col])
      except ValueError:
        raise UserError(
            f"{where}: {header[idx_col]} '{fields[idx_col]}' is not an integer") from None
    text_b = fields[col[t.text_columns[1]]] if len(t.text_columns) > 1 else None
    examples.append(Example(f"{split}-{row}", fields[col[t.text_columns[0]]], text_b, label, index))
  return examples


def load_hub_split(task: str, split: str) -> list[Example]:
  """Loads a split of `nyu-mll/glue` from the Hugging Face hub (needs network or a cache)."""

  t = get_task(task)
  _check_split(t, split)
  hub_split = split.replace("dev", "validation")
  ds = datasets.load_dataset("nyu-mll/glue", task, split=hub_split)
  names = getattr(ds.features["label"], "names", None)
  examples = []
  for row, r in enumerate(ds):
    raw = r["label"]
    if t.labels is None:
      label = None if split in t.test_splits else float(raw)
    elif raw < 0:
      label = None
    else:  # Binary tasks use '0'/'1' in the TSVs; the hub names them (e.g. 'acceptable').
      label = str(raw) if t.labels == _BINARY else names[raw]
    text_b = r[t.hub_columns[1]] if len(t.hub_columns) > 1 else None
    examples.append(Example(f"{split}-{row}", r[t.hub_columns[0]], text_b, label, int(r["idx"])))
  return examples


def split_source(data_dir: str | Path, task: str, split: str, required: bool) -> list | None:
  """What names one split's exact contents (a cache-key part): the file's path, mtime and size, or the hub
  dataset when `data_dir` is empty; None for an optional split whose file is absent (a required one raises the
  reader's "file not found")."""
  if not data_dir:
    return ["hub", "nyu-mll/glue", task, split]
  path = split_path(data_dir, task, split)
  if not path.is_file():
    if not required:
      return None
    read_split(data_dir, task, split)  # raises the reader's "file not found" error
  st = path.stat()
  return [str(path.resolve()), st.st_mtime_ns, st.st_size]


def read_examples(data_dir: str | Path, task: str, split: str, required: bool) -> list[Example] | None:
  """One split from the GLUE-layout `data_dir`, or from the hub `nyu-mll/glue` when `data_dir` is empty; None for
  an optional hub split that could not be loaded."""
  if data_dir:
    return read_split(data_dir, task, split)
  try:
    return load_hub_split(task, split)
  except UserError:
    raise
  except Exception as e:  # network, offline cache miss, missing split
    if not required:
      logging.warning("GLUE %s %s split not loaded from the hub (%s); skipping it", task, split, e)
      return None
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"could not load GLUE {task} {split} from the hub nyu-mll/glue ({msg}); set "
                    "config.data.data_dir to a local GLUE-layout folder") from None


def as_tokenizer(tokenizer: Any) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` with padding and truncation off (copied if the input had them on).

  Accepts a `tokenizers.Tokenizer`, a `tokenizers` implementation (e.g. BertWordPieceTokenizer)
  or a `transformers` fast tokenizer.
  """
  tok = tokenizer
  if not isinstance(tok, tokenizers.Tokenizer):
    tok = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
  if not isinstance(tok, tokenizers.Tokenizer):
    raise UserError(f"expected a Hugging Face fast tokenizer (tokenizers.Tokenizer), got "
                    f"{type(tokenizer).__name__}; load one with tokenizers.Tokenizer.from_file")
  if tok.padding is not None or tok.truncation is not None:
    tok = tokenizers.Tokenizer.from_str(tok.to_str())
    tok.no_padding()
    tok.no_truncation()
  return tok


def special_ids(tokenizer: tokenizers.Tokenizer) -> tuple[int, int, int]:
  """Ids of [CLS], [SEP] and [PAD]."""
  ids = []
  for name in ("[CLS]", "[SEP]", "[PAD]"):
    i = tokenizer.token_to_id(name)
    if i is None:
      raise UserError(f"tokenizer vocabulary has no '{name}' token; use a BERT WordPiece vocab")
    ids.append(i)
  return ids[0], ids[1], ids[2]


def truncate_pair(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """BERT's longest-first pair truncation: drop one token from the longer (ties: b) at a time."""
  if len_a + len_b <= max_tokens:
    return len_a, len_b
  # Closed form of the pop loop: shrink the longer to the shorter, then alternate b, a, b, ...
  short = min(len_a, len_b)
  if 2 * short >= max_tokens:
    return max_tokens - max_tokens // 2, max_tokens // 2
  return (max_tokens - len_b, len_b) if len_a > len_b else (len_a, max_tokens - len_a)


def encode_pairs(tokenizer: Any, texts_a: Sequence[str], texts_b: Sequence[str] | None,
                 max_seq_length: int) -> dict[str, np.ndarray]:
  """`[CLS] a [SEP] (b [SEP])`, truncated longest-first and padded to `max_seq_length`."""
  tok = as_tokenizer(tokenizer)
  cls_id, sep_id, pad_id = special_ids(tok)
  n_special = 3 if texts_b is not None else 2
  if max_seq_length < n_special + 1:
    raise UserError(f"max_seq_length {max_seq_length} is too small; use at least {n_special + 1}")
  encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # No offsets needed here.
  enc_a = [e.ids for e in encode(list(texts_a), add_special_tokens=False)]
  enc_b = ([e.ids for e in encode(list(texts_b), add_special_tokens=False)]
           if texts_b is not None else [[] for _ in enc_a])
  n = len(enc_a)
  input_ids = np.full((n, max_seq_length), pad_id, np.int32)
  token_type_ids = np.zeros((n, max_seq_length), np.int32)
  lengths = np.zeros((n,), np.int32)
  for i, (a, b) in enumerate(zip(enc_a, enc_b)):
    la, lb = truncate_pair(len(a), len(b), max_seq_length - n_special)
    ids = [cls_id, *a[:la], sep_id]
    if texts_b is not None:
      ids += [*b[:lb], sep_id]
      token_type_ids[i, la + 2:len(ids)] = 1
    input_ids[i, :len(ids)] = ids
    lengths[i] = len(ids)
  attention_mask = (np.arange(max_seq_length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": input_ids, "token_type_ids": token_type_ids,
          "attention_mask": attention_mask}


def convert_examples(examples: Sequence[Example], tokenizer: Any, max_seq_length: int,
                     label_list: Sequence[str] | None) -> dict[str, np.ndarray]:
  """Examples -> `input_ids, token_type_ids, attention_mask [N, L] int32` and `labels [N]`.

  `labels` are int32 ids into `label_list` (-1 where unlabelled), or float32 scores (NaN where
  unlabelled) when `label_list` is None (regression).
  """
  pair = [e.text_b is not None for e in examples]
  if any(pair) and not all(pair):
    raise UserError("examples mix single sentences and sentence pairs; convert one task at a time")
  texts_b = [e.text_b for e in examples] if examples and pair[0] else None
  feats = encode_pairs(tokenizer, [e.text_a for e in examples], texts_b, max_seq_length)
  if label_list is None:
    feats["labels"] = np.array([math.nan if e.label is None else e.label for e in examples],
                               np.float32).reshape(-1)
  else:
    to_id = {l: i for i, l in enumerate(label_list)}
    bad = next((e for e in examples if e.label is not None and e.label not in to_id), None)
    if bad is not None:
      raise UserError(f"example {bad.guid}: label {bad.label!r} is not in the label list "
                      f"{list(label_list)}; pass the task's labels (GLUE_TASKS[task].labels)")
    feats["labels"] = np.array([-1 if e.label is None else to_id[e.label] for e in examples],
                               np.int32).reshape(-1)
  return feats


def submission_filename(task: str, split: str = "test") -> str:
  """The file name the GLUE server expects, e.g. 'SST-2.tsv', 'MNLI-m.tsv', 'MNLI-mm.tsv'."""
  t = get_task(task)
  if split not in t.test_splits:
    raise UserError(f"no GLUE submission file for split '{split}' of {t.name}; "
                    f"expected one of {list(t.test_splits)}")
  return t.submission_names[t.test_splits.index(split)]


def write_submission(out_dir: str | Path, task: str, indices: Sequence[int],
                     predictions: Sequence[int] | Sequence[float] | np.ndarray,
                     split: str = "test") -> Path:
  """Writes `<out_dir>/<submission_filename>` with header `index\\tprediction`.

  `predictions` are class ids (written as label names) or, for STS-B, scores (3 decimals).
  """
  t = get_task(task)
  path = Path(out_dir) / submission_filename(task, split)
  preds = np.asarray(predictions)
  if len(indices) != len(preds):
    raise ValueError(f"{len(indices)} indices but {len(preds)} predictions")
  if t.labels is None:
    values = [f"{float(p):.3f}" for p in preds]
  else:
    ids = preds.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(t.labels)):
      raise ValueError(f"class ids must be in [0, {len(t.labels)}) for {t.name}")
    values = [t.labels[i] for i in ids]
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    f.write("index\tprediction\n")
    f.writelines(f"{int(i)}\t{v}\n" for i, v in zip(indices, values))
  return path
