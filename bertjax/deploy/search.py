"""Semantic search with a sentence_embedding model: `python -m bertjax.search` (`bertjax-search`), and `Index`.

    python -m bertjax.search index --checkpoint=workdirs/embed --corpus=docs.jsonl --out=indexes/docs
    python -m bertjax.search query --index=indexes/docs --queries=questions.txt --top_k=5 --output=hits.jsonl

An index folder holds
  embeddings.npy  float32 [N, D], every row L2-normalised (a dot product is the cosine)
  texts.jsonl     {"id": ..., "text": ...} a line, row i of embeddings.npy
  index.json      what made it: the checkpoint (step folder), its head, pooling, normalisation, maximum length; N, D
Search is exact: every query against every text by cosine, numpy matrix products over blocks of queries and of
texts (memory stays bounded; the embeddings are memory-mapped), the best `k` per query. That suits up to a few
hundred thousand texts on one machine; millions want a vector index (FAISS, ScaNN) built from embeddings.npy.

    index = Index.build(Predictor.from_checkpoint("workdirs/embed"), texts, ids)
    index.save("indexes/docs"); index = Index.load("indexes/docs")
    index.search(["how do I reset my password?"], k=5)     # [[{"rank", "id", "text", "score"}, ...]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from bertjax.deploy.cli import Parser, add_out, check_out, clear_out, prog, run_cli
from bertjax.deploy.loading import load as load_predictor
from bertjax.deploy.predictor import (EMBEDDING_HEAD, Predictor, output_file, pick_field, progress_bar, read_input,
                                      write_rows)
from bertjax.errors import UserError
from bertjax.tasks import metrics

__all__ = ["Index", "check_predictor", "main", "normalized", "parser"]
EMBEDDINGS_FILE, TEXTS_FILE, META_FILE = "embeddings.npy", "texts.jsonl", "index.json"
FORMAT = "bertjax-search-index/1"
QUERY_BLOCK, CORPUS_BLOCK = 256, 32768  # at most 256 x 32768 float32 scores (32 MiB) at a time
SCALE_NOTE = ("exact search: every query against every text (numpy); for millions of texts use a vector index "
              "such as FAISS or ScaNN on the index's embeddings.npy")


def normalized(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (a zero row stays zero), float32."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _embedding_predictor(predictor: Predictor) -> Predictor:
  if predictor.head != EMBEDDING_HEAD:
    raise UserError(f"{predictor.source} is a {predictor.head} model; search needs a {EMBEDDING_HEAD} model "
                    "(a checkpoint whose meta says head=sentence_embedding)")
  return predictor


@dataclasses.dataclass
class Index:
  """Texts, their ids and their unit-length embeddings [N, D] float32, for exact cosine top-k search."""

  embeddings: np.ndarray
  texts: list[str]
  ids: list[Any]
  meta: dict
  predictor: Predictor | None = None  # embeds text queries; loaded from meta["checkpoint"] when first needed

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  def __len__(self) -> int:
    return len(self.texts)

  @classmethod
  def build(cls, predictor: Predictor, texts: Sequence[str], ids: Sequence[Any] | None = None,
            progress: Any = None) -> "Index":
    """Embed `texts` with an embedding `predictor`; `ids` default to the row numbers 0..N-1."""
    _embedding_predictor(predictor)
    texts = [str(t) for t in texts]
    if not texts:
      raise UserError("no texts to index; give at least one")
    ids = list(range(len(texts))) if ids is None else list(ids)
    if len(ids) != len(texts):
      raise UserError(f"{len(texts)} texts but {len(ids)} ids; give one id per text")
    emb = normalized(predictor.embed(texts, progress))
    meta = {"format": FORMAT, "checkpoint": str(predictor.source), "head": predictor.head,
            "pooling": predictor.embedding.get("pooling"), "normalize": predictor.embedding.get("normalize"),
            "max_seq_length": predictor.max_seq_length, "metric": "cosine", "count": len(texts), "dim": emb.shape[1]}
    return cls(emb, texts, ids, meta, predictor)

  def save(self, folder: str) -> None:
    """Write the index into `folder` (created; each file replaced whole)."""
    os.makedirs(folder, exist_ok=True)
    with output_file(os.path.join(folder, EMBEDDINGS_FILE), binary=True) as f:
      np.save(f, np.asarray(self.embeddings, np.float32))
    with output_file(os.path.join(folder, TEXTS_FILE)) as f:
      f.writelines(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(self.ids, self.texts))
    with output_file(os.path.join(folder, META_FILE)) as f:
      json.dump(self.meta, f, indent=2)

  @classmethod
  def load(cls, folder: str, predictor: Predictor | None = None) -> "Index":
    """An index folder (embeddings memory-mapped); `predictor` embeds text queries (default: the index's own
    checkpoint, loaded on the first text query)."""
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
      raise UserError(f"{folder} is not a search index (no {META_FILE}); build one with "
                      "`python -m bertjax.search index`")
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise UserError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild the index")
    try:
      emb = np.load(os.path.join(folder, EMBEDDINGS_FILE), mmap_mode="r")
      with open(os.path.join(folder, TEXTS_FILE), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
      raise UserError(f"{folder}: unreadable index ({type(e).__name__}: {e}); rebuild it") from None
    if emb.dtype != np.float32 or emb.ndim != 2 or emb.shape != (len(rows), meta.get("dim")):
      raise UserError(f"{folder}: {EMBEDDINGS_FILE} is {emb.dtype}{list(emb.shape)} but {TEXTS_FILE} has "
                      f"{len(rows)} texts of dimension {meta.get('dim')}; rebuild the index")
    if predictor is not None:
      check_predictor(predictor, int(meta["dim"]))
    return cls(emb, [r["text"] for r in rows], [r["id"] for r in rows], meta, predictor)

  # -- search ------------------------------------------------------------------------------------------------------
  def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine scores, row numbers), each [Q, min(k, N)], best first (ties: lower row first) for query
    embeddings [Q, D] (normalised here)."""
    if k < 1:
      raise UserError(f"k={k} must be >= 1")
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise UserError(f"query embeddings of shape {list(q.shape)}; this index wants [n, {self.dim}]")
    return metrics.top_k(normalized(q), self.embeddings, k, QUERY_BLOCK, CORPUS_BLOCK)

  def search(self, queries: Sequence[str] | np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """The best `k` texts for each query (texts, embedded with the index's model, or embeddings [Q, D]):
    [{"rank", "id", "text", "score"}, ...] per query."""
    if isinstance(queries, np.ndarray):
      emb = queries
    else:
      texts = [str(t) for t in queries]
      emb = self.query_predictor().embed(texts) if texts else np.zeros((0, self.dim), np.float32)
    scores, rows = self.top_k(emb, k)
    return [[{"rank": j + 1, "id": self.ids[r], "text": self.texts[r], "score": float(s)}
             for j, (s, r) in enumerate(zip(srow, rrow))] for srow, rrow in zip(scores, rows)]

  def query_predictor(self, **kw: Any) -> Predictor:
    """The predictor that embeds text queries: the one given, else the index's checkpoint (loaded with `kw`:
    batch_size, max_seq_length)."""
    if self.predictor is None:
      source = str(self.meta.get("checkpoint", ""))
      if not os.path.exists(source):
        raise UserError(f"the index's checkpoint {source} does not exist any more; pass the model that built it "
                        "(--checkpoint, or Index.load(folder, predictor))")
      self.predictor = check_predictor(load_predictor(source, **kw), self.dim)
    return self.predictor


def check_predictor(predictor: Predictor, dim: int) -> Predictor:
  """`predictor` if it embeds into `dim` dimensions (an index's), else a UserError."""
  _embedding_predictor(predictor)
  got = predictor.embedding.get("dim")
  if got is not None and int(got) != dim:
    raise UserError(f"{predictor.source} gives {got}-dimensional embeddings but the index holds {dim}; query "
                    "with the model that built the index")
  return predictor


# -- the command ----------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
  p = Parser(prog=prog("bertjax.search"), description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True, metavar="{index,query}")
  ix = sub.add_parser("index", help="embed a corpus into an index folder")
  ix.add_argument("--checkpoint", required=True, help="a sentence_embedding workdir, step folder or export")
  ix.add_argument("--corpus", required=True, help=".txt (one text a line), .jsonl or .tsv")
  add_out(ix, "the index")
  ix.add_argument("--text_field", default=None, help="corpus column of the text (default: text, else sentence)")
  ix.add_argument("--id_field", default=None, help="corpus column of the id (default: id if there is one, else "
                  "the row number from 0)")
  q = sub.add_parser("query", help="the best texts of an index for each query")
  q.add_argument("--index", required=True, help="an index folder (python -m bertjax.search index)")
  q.add_argument("--queries", required=True, help=".txt (one query a line), .jsonl or .tsv")
  q.add_argument("--output", required=True, help=".jsonl or .tsv: each query row with its hits")
  q.add_argument("--top_k", type=int, default=5)
  q.add_argument("--text_field", default=None, help="query column of the text (default: text, else sentence)")
  q.add_argument("--checkpoint", default=None, help="the model that embeds the queries (default: the index's)")
  for s in (ix, q):
    s.add_argument("--batch_size", type=int, default=32)
    s.add_argument("--max_seq_length", type=int, default=None, help="default: the training run's")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  return p


def _texts(path: str, field: str | None) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  rows, cols = read_input(path)
  tf = pick_field(cols, field, ("text", "sentence"), path, "--text_field")
  for n, r in enumerate(rows, 1):
    if not isinstance(r.get(tf), str):
      raise UserError(f"{path}: row {n} has no text in field {tf!r}")
  return rows, cols, [r[tf] for r in rows]


def build_index(a: argparse.Namespace) -> None:
  check_out(a.out, a.overwrite)
  rows, cols, texts = _texts(a.corpus, a.text_field)  # a bad corpus fails before the model loads
  if a.id_field and a.id_field not in cols:
    raise UserError(f"{a.corpus} has no column {a.id_field!r} (columns: {', '.join(cols)}); pass --id_field=<column>")
  idf = a.id_field or ("id" if "id" in cols else None)
  keep = [i for i, t in enumerate(texts) if t.strip()]
  if not keep:
    raise UserError(f"{a.corpus} holds only blank texts; give at least one text")
  missing = next((i for i in keep if idf and idf not in rows[i]), None)
  if missing is not None:
    raise UserError(f"{a.corpus}: row {missing + 1} has no id field {idf!r}; give every row one, or pass --id_field")
  ids = [rows[i][idf] if idf else i for i in keep]
  predictor = _embedding_predictor(load_predictor(a.checkpoint, max_seq_length=a.max_seq_length,
                                                  batch_size=a.batch_size))
  bar = progress_bar(len(keep), "embed") if a.progress else None
  try:
    index = Index.build(predictor, [texts[i] for i in keep], ids, bar)
  finally:
    if bar is not None:
      bar.close()
  clear_out(a.out)
  index.save(a.out)
  skipped = f" ({len(texts) - len(keep)} blank texts skipped)" if len(keep) < len(texts) else ""
  print(f"indexed {len(index)} texts{skipped} as {index.dim}-dimensional embeddings ({predictor.source}) in "
        f"{a.out}", file=sys.stderr)


def query_index(a: argparse.Namespace) -> None:
  if a.top_k < 1:
    raise UserError(f"--top_k={a.top_k} must be >= 1")
  ext = os.path.splitext(a.output)[1].lower()
  if ext not in (".jsonl", ".tsv"):
    raise UserError(f"--output={a.output}: unknown file type {ext!r}; use .jsonl or .tsv")
  index = Index.load(a.index)
  rows, _, texts = _texts(a.queries, a.text_field)
  kw = {"max_seq_length": a.max_seq_length, "batch_size": a.batch_size}
  if a.checkpoint:
    index.predictor = check_predictor(load_predictor(a.checkpoint, **kw), index.dim)
  predictor = index.query_predictor(**kw)
  print(SCALE_NOTE, file=sys.stderr)
  bar = progress_bar(len(texts), "embed") if a.progress else None
  try:
    emb = predictor.embed(texts, bar)
  finally:
    if bar is not None:
      bar.close()
  write_rows(a.output, rows, [{"hits": h} for h in index.search(emb, a.top_k)])
  print(f"wrote the top {min(a.top_k, len(index))} of {len(index)} texts for {len(texts)} queries to {a.output}",
        file=sys.stderr)


def main(argv: Iterable[str] | None = None) -> int:

  def run():
    a = parser().parse_args(argv)
    if a.batch_size < 1:
      raise UserError(f"--batch_size={a.batch_size} must be >= 1")
    (build_index if a.command == "index" else query_index)(a)

  return run_cli("bertjax.search", run)


if __name__ == "__main__":
  sys.exit(main())
