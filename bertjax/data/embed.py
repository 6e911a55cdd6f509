"""Data of the embedding task: text tuples from GLUE-layout pairs, local files or a hub dataset, one token table
of unique texts, and the packer that lays a batch's texts into rows.

A training example is a tuple of texts: (sentence1, sentence2) with a similarity score (scored pairs, the cosine
loss), or (query, positive[, hard negative]) without one (the in-batch-negatives ranking loss). Every distinct text
is tokenized once (`[CLS] text [SEP]`) into a table; examples hold text ids into it, and `TextPacker` packs the
texts of a batch's examples into rows, several texts a row, each attending only to itself.

Sources:
  GLUE layout (`data.glue_task` + `data.data_dir`): STS-B gives scored pairs (scores 0..5); a paraphrase task
  (MRPC, QQP) gives its positive pairs for ranking, and its dev file a retrieval set: each positive pair's first
  sentence is a query whose relevant text is its second sentence, among every second sentence of the file.
  Files (`data.train_file`, `validation_file`; CSV / TSV / JSONL / parquet) or `data.dataset` (hub): columns
  `text_field`, `text_pair_field`, optional `negative_field` and `label_field` (the score; absent = ranking).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np

from bertjax.data import classify, glue, loader
from bertjax.errors import UserError

TOKEN_KEYS = ("input_ids", "attention_mask")


@dataclasses.dataclass
class Split:
  """One split: `texts` (distinct, in first-seen order), `tuples` [N, K] ids into `texts` (K = 2 or 3), `scores`
  [N] (scored pairs) or None; for evaluation by retrieval, `queries` (text ids) with `relevant` text ids each and
  `corpus` (text ids)."""
  source: str
  texts: list[str]
  tuples: np.ndarray
  scores: np.ndarray | None = None
  queries: np.ndarray | None = None
  relevant: list[list[int]] | None = None
  corpus: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.tuples)

  def take(self, n: int) -> "Split":
    """The first `n` examples (and for retrieval, the first `n` queries)."""
    if n <= 0 or n >= len(self):
      return self
    q = None if self.queries is None else slice(0, min(n, len(self.queries)))
    return dataclasses.replace(self, tuples=self.tuples[:n], scores=None if self.scores is None else self.scores[:n],
                               queries=None if q is None else self.queries[q],
                               relevant=None if q is None else self.relevant[q])

  def key(self) -> str:
    """Names the texts exactly (a cache-key part)."""
    h = hashlib.sha256()
    for t in self.texts:
      h.update(t.encode())
      h.update(b"\0")
    return h.hexdigest()[:24]


def _intern(columns: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
  """Distinct texts and the [N, K] id array of the rows of `columns` (K lists of N texts)."""
  ids: dict[str, int] = {}
  out = np.zeros((len(columns[0]), len(columns)), np.int32)
  for k, col in enumerate(columns):
    for i, t in enumerate(col):
      out[i, k] = ids.setdefault(t, len(ids))
  return list(ids), out


def make_split(source: str, columns: Sequence[Sequence[str]], scores: Sequence[float] | None = None,
               retrieval: bool = False, corpus_extra: Sequence[str] = ()) -> Split:
  """A split of K text columns (and scores). `retrieval`: also a retrieval set whose queries are the distinct
  first texts, relevant = their other texts, corpus = every text of the other columns plus `corpus_extra`."""
  texts, tuples = _intern(columns)
  if corpus_extra:
    known = set(texts)
    texts = texts + [t for t in dict.fromkeys(corpus_extra) if t not in known]
  s = Split(source, texts, tuples, None if scores is None else np.asarray(scores, np.float32))
  if retrieval:
    rel: dict[int, list[int]] = {}
    for row in tuples:
      rel.setdefault(int(row[0]), [])
      for t in row[1:2]:  # the positive; hard negatives are distractors only
        if int(t) not in rel[int(row[0])]:
          rel[int(row[0])].append(int(t))
    index = {t: i for i, t in enumerate(texts)}
    corpus = sorted({int(t) for t in tuples[:, 1:].ravel()} | {index[t] for t in corpus_extra})
    s.queries = np.asarray(list(rel), np.int32)
    s.relevant = [rel[q] for q in rel]
    s.corpus = np.asarray(corpus, np.int32)
  return s


# -- reading ------------------------------------------------------------------------------------------------

def read_glue(data_dir: str, task: str, split: str, required: bool) -> Split | None:
  """STS-B: scored pairs. A binary pair task (MRPC, QQP, ...): its positive pairs; dev splits are also a
  retrieval set over every second sentence of the file."""
  t = glue.get_task(task)
  if len(t.text_columns) != 2:
    raise UserError(f"data.glue_task={task} has single sentences; the embedding task needs sentence pairs "
                    "(stsb, mrpc, qqp, ...)")
  examples = glue.read_examples(data_dir, task, split, required)
  if examples is None:
    return None
  source = f"GLUE {task} {split}"
  if t.is_regression:
    labelled = [e for e in examples if e.label is not None]
    if not labelled:
      return None
    return make_split(source, [[e.text_a for e in labelled], [e.text_b for e in labelled]],
                      [float(e.label) for e in labelled])
  positive = t.labels[-1]
  pos = [e for e in examples if e.label == positive]
  if not pos:
    return None
  return make_split(source, [[e.text_a for e in pos], [e.text_b for e in pos]], retrieval=split != "train",
                    corpus_extra=[e.text_b for e in examples if e.label is not None])


@dataclasses.dataclass(frozen=True)
class Fields:
  text: str = "sentence1"
  pair: str = "sentence2"
  negative: str = ""
  score: str = ""  # "" = no scores (ranking)


def read_rows(rows_ds, source: str, fields: Fields, retrieval: bool) -> Split:
  """A `datasets.Dataset` (file or hub split) -> Split."""
  cols = rows_ds.column_names
  names = [f for f in (fields.text, fields.pair, fields.negative) if f]
  for f, what in zip(names, ("data.text_field", "data.text_pair_field", "data.negative_field")):
    if f not in cols:
      raise UserError(f"{source}: no field {f!r} (fields: {cols}); set {what}")
  columns = [classify._texts(rows_ds, f, source) for f in names]
  scores = None
  if fields.score:
    if fields.score not in cols:
      raise UserError(f"{source}: no field {fields.score!r} (fields: {cols}); set data.label_field, or '' for "
                      "pairs without scores (ranking loss)")
    scores = []
    for i, v in enumerate(rows_ds[fields.score]):
      try:
        x = float(v)
      except (TypeError, ValueError):
        x = float("nan")
      if not np.isfinite(x):
        raise UserError(f"{source}: row {i + 1}: score {v!r} in field {fields.score!r} is not a finite number")
      scores.append(x)
  return make_split(source, columns, scores, retrieval=retrieval and scores is None)


def read_file(path: str, fields: Fields, cache_dir: str, retrieval: bool) -> Split:
  return read_rows(classify._load_file(path, cache_dir), path, fields, retrieval)


def read_hub(name: str, split: str, fields: Fields, cache_dir: str, train: bool) -> Split | None:
  """Split `split` of the hub dataset `name`; the training split must exist, a missing dev split is None. Dev
  splits without scores are retrieval sets."""
  ds = classify.hub_split(name, split, cache_dir, train)
  return None if ds is None else read_rows(ds, f"hub {name} split {split}", fields, retrieval=not train)


# -- tokens and packing -------------------------------------------------------------------------------------

def encode(tokenizer, texts: Sequence[str], max_seq_length: int) -> dict[str, np.ndarray]:
  """`[CLS] text [SEP]` ids and mask [U, L] of each distinct text."""
  f = glue.encode_pairs(tokenizer, texts, None, max_seq_length)
  return {k: f[k] for k in TOKEN_KEYS}


class TextPacker:
  """Packs the texts of a batch of examples (`text_ids` [n, K] into the token table `tokens`) into rows of the
  padded length, at most `max_texts` texts a row (first-fit, in example order), each text its own segment
  (`segment_ids` 1..S, `position_ids` restarting). Out: `input_ids`, `attention_mask`, `segment_ids`,
  `position_ids` [R, L]; `slot_tokens` [R, S] (tokens of each slot, 0 = empty); `text_slots` [n, K] = flat index
  (global row) * S + slot of each text, where process p's rows are global rows p * R .. (p + 1) * R - 1 (the
  BertForSentenceEmbedding input). Per-example arrays pass through. With `max_texts=1` every text has a row of
  its own (packing off). The row count is decided over the whole global batch (the most any process needs),
  rounded up to `row_multiple`, so every process agrees."""

  def __init__(self, tokens: Mapping[str, np.ndarray], text_ids: np.ndarray, row_multiple: int, max_texts: int):
    self.tokens = tokens
    self.lengths = loader.row_lengths(tokens["attention_mask"])
    self.full = tokens["input_ids"].shape[1]
    self.text_ids = text_ids  # [N, K] of the whole split (rows_needed reads the global batch's)
    self.row_multiple, self.max_texts = max(1, int(row_multiple)), max(1, int(max_texts))

  def _fit(self, ids: np.ndarray) -> list[list[int]]:
    return loader.first_fit(self.lengths[ids.ravel()], self.full, self.max_texts)

  def rows_needed(self, global_rows: np.ndarray, processes: int) -> int:
    most = max(len(self._fit(self.text_ids[part])) for part in np.split(np.asarray(global_rows), processes))
    return -(-most // self.row_multiple) * self.row_multiple

  def pack(self, batch: Mapping[str, np.ndarray], rows: np.ndarray | None, n_rows: int, process_index: int) -> dict:
    """This process's `batch` (its `text_ids` [n, K]) packed into `n_rows` rows."""
    ids = np.asarray(batch["text_ids"])
    n, k = ids.shape
    L, S = self.full, self.max_texts
    out = {key: v for key, v in batch.items() if key != "text_ids"}
    tok = {key: np.zeros((n_rows, L), self.tokens[key].dtype) for key in TOKEN_KEYS}
    seg, pos = np.zeros((n_rows, L), np.int32), np.zeros((n_rows, L), np.int32)
    slot_tokens = np.zeros((n_rows, S), np.int32)
    slots = np.zeros(n * k, np.int32)
    flat = ids.ravel()
    lengths = self.lengths[flat]
    placed = self._fit(ids)
    if len(placed) > n_rows:
      raise ValueError(f"{len(placed)} rows needed, {n_rows} given")
    for r, members in enumerate(placed):
      col = 0
      for s, i in enumerate(members):
        m = int(lengths[i])
        for key in TOKEN_KEYS:
          tok[key][r, col:col + m] = self.tokens[key][flat[i], :m]
        seg[r, col:col + m], pos[r, col:col + m] = s + 1, np.arange(m)
        slot_tokens[r, s] = m
        slots[i] = (process_index * n_rows + r) * S + s
        col += m
    return {**out, **tok, "segment_ids": seg, "position_ids": pos, "slot_tokens": slot_tokens,
            "text_slots": slots.reshape(n, k)}

  def warmup_batch(self, batch: Mapping[str, np.ndarray], n_rows: int) -> dict:
    """A zero batch shaped like `pack`'s output for `batch` in `n_rows` rows (for compiling ahead)."""
    L, S = self.full, self.max_texts
    out = {key: v for key, v in batch.items() if key != "text_ids"}
    zeros = {key: np.zeros((n_rows, L), self.tokens[key].dtype) for key in TOKEN_KEYS}
    return {**out, **zeros, "segment_ids": np.zeros((n_rows, L), np.int32),
            "position_ids": np.zeros((n_rows, L), np.int32), "slot_tokens": np.zeros((n_rows, S), np.int32),
            "text_slots": np.zeros(np.shape(batch["text_ids"]), np.int32)}
