"""WordPiece tokenizers (HF `tokenizers`): load `vocab.txt` / `tokenizer.json` / an HF folder, or train one.

A job saves its tokenizer as HF files in `<workdir>/tokenizer/` and reuses it on resume, so a restarted run
never changes vocabulary under a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from bertjax import paths
from bertjax.errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load(path: str, lowercase: bool = True) -> Tokenizer:
  """A `tokenizer.json`, a `vocab.txt`, or a folder holding either (tokenizer.json preferred); local or a URL."""
  if not paths.is_local(path):
    if not paths.exists(path):
      raise UserError(f"tokenizer path {path} does not exist; pass a vocab.txt, tokenizer.json or HF folder")
    with paths.staged_read(path) as local:
      return load(local, lowercase)
  path = paths.resolve(path) if paths.is_url(path) else os.path.expanduser(path)
  if os.path.isdir(path):
    for name in ("tokenizer.json", "vocab.txt"):
      if os.path.exists(os.path.join(path, name)):
        return load(os.path.join(path, name), lowercase)
    raise UserError(f"tokenizer folder {path} has neither tokenizer.json nor vocab.txt")
  if not os.path.exists(path):
    raise UserError(f"tokenizer path {path} does not exist; pass a vocab.txt, tokenizer.json or HF folder")
  if path.endswith(".json"):
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:
      raise UserError(f"{path} is not a valid tokenizers JSON file ({str(e).splitlines()[0]})") from e
  else:
    lower = _config_lowercase(os.path.dirname(path), lowercase)
    tok = BertWordPieceTokenizer(path, lowercase=lower)._tokenizer
  check_special_tokens(tok, path)
  tok.no_padding()  # some published tokenizer.json files pad/truncate every encode; bertjax packs itself
  tok.no_truncation()
  return tok


def readable(path: str) -> bool:
  """Whether `load(path)` succeeds (for caches: an unreadable one is rebuilt)."""
  try:
    load(path)
    return True
  except UserError:
    return False


def _config_lowercase(folder: str, default: bool) -> bool:
  cfg = os.path.join(folder, "tokenizer_config.json")
  if os.path.exists(cfg):
    with open(cfg) as f:
      return bool(json.load(f).get("do_lower_case", default))
  return default


def check_special_tokens(tok: Tokenizer, where: str) -> None:
  missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
  if missing:
    raise UserError(f"tokenizer {where} lacks BERT special tokens {missing}; use a BERT WordPiece vocabulary")


def train(texts: Iterable[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2) -> Tokenizer:
  """Train a BERT WordPiece vocabulary (special tokens first: [PAD]=0) on an iterator of texts."""
  wp = BertWordPieceTokenizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
  wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                         show_progress=False)
  return wp._tokenizer


def save(tok: Tokenizer, folder: str, lowercase: bool = True, model_max_length: int = 512) -> None:
  """Write `tokenizer.json`, `vocab.txt`, `tokenizer_config.json`, `special_tokens_map.json` to `folder`.

  Atomically per file: each is written in a temporary folder beside `folder` and renamed in, `tokenizer.json`
  last, so an interrupted save never leaves a truncated file and a folder with `tokenizer.json` is complete.
  """
  parent = os.path.dirname(os.path.normpath(folder)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tokenizer-tmp-")
  try:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
      f.writelines(t + "\n" for t, _ in vocab)
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
      json.dump(special, f, indent=2)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                 "model_max_length": model_max_length, **special}, f, indent=2)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    os.makedirs(folder, exist_ok=True)
    for name in ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"):
      os.replace(os.path.join(tmp, name), os.path.join(folder, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def lowercases(tok: Tokenizer) -> bool:
  """Whether `tok` lowercases its input: asked of its normaliser, never of a config flag."""
  return tok.normalizer is not None and tok.normalizer.normalize_str("Ab") == "ab"


def for_run(workdir: str, source: Callable[[], str | None], lowercase: bool = True) -> tuple[Tokenizer | None, str]:
  """(tokenizer, where it came from) for a run in `workdir`: the one saved there (a resumed run never changes
  vocabulary under its checkpoint), else `source()` (`lowercase` matters only for a bare vocab.txt), else
  (None, ''). `source` is called only when nothing is saved (an init checkpoint need not exist on resume)."""
  saved = paths.join(workdir, "tokenizer", "tokenizer.json")
  if paths.exists(saved):
    with paths.staged_read(saved) as local:
      return load(local), saved
  src = source()
  if src:
    return load(src, lowercase), src
  return None, ""


def save_to_workdir(tok: Tokenizer, workdir: str, model_max_length: int = 512) -> None:
  """`<workdir>/tokenizer/` as HF files, written once, with `do_lower_case` from the tokenizer itself (a cased
  tokenizer stays cased in transformers, which rebuilds the normaliser from that flag)."""
  if paths.exists(paths.join(workdir, "tokenizer", "tokenizer.json")):
    return
  with paths.staged(paths.join(workdir, "tokenizer")) as folder:
    save(tok, folder, lowercases(tok), model_max_length)


def fingerprint(tok: Tokenizer) -> str:
  """A stable hash of the tokenizer (vocabulary, normaliser, pre-tokeniser) for cache keys."""
  return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
