"""CoNLL-2003 style NER: reader, first-sub-token features, word-level alignment and writer.

Files have one `token ... TAG` line per word (first and last whitespace-separated columns are
used), a blank line between sentences, and optional `-DOCSTART-` lines, which are skipped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bertjax.data.glue import as_tokenizer, special_ids
from bertjax.errors import UserError

IGNORE_INDEX = -100  # Label of sub-tokens that are not scored (continuations, specials, padding).
_TAG = re.compile(r"O|[BIES]-\S+")


@dataclasses.dataclass
class NerSentence:
  tokens: list[str]
  tags: list[str]
  source: str = ""  # "file:line" of the first token, for error messages.


def read_conll(path: str | Path, label_list: Sequence[str] | None = None) -> list[NerSentence]:
  """Reads a CoNLL file; tags must be in `label_list` if given, else IOB/IOBES (`O`, `B-X`, ...)."""
  path = Path(path)
  if not path.is_file():
    raise UserError(f"CoNLL file not found: expected {path.absolute()}; "
                    "set config.data.data_dir to the folder with train.txt and dev.txt")
  allowed = set(label_list) if label_list is not None else None
  sentences: list[NerSentence] = []
  cur = NerSentence([], [])
  with open(path, encoding="utf-8", newline="\n") as f:
    for lineno, line in enumerate(f, 1):
      fields = line.split()
      if not fields or fields[0] == "-DOCSTART-":
        if cur.tokens:
          sentences.append(cur)
        cur = NerSentence([], [])
        continue
      where = f"{path}:{lineno}"
      if len(fields) < 2:
        raise UserError(f"{where}: expected 'token TAG' (whitespace-separated), "
                        f"found {line.strip()!r}")
      tag = fields[-1]
      if allowed is not None and tag not in allowed:
        raise UserError(f"{where}: tag '{tag}' is not in the label list {list(label_list)}; "
                        "build the label list from the training file")
      if allowed is None and not _TAG.fullmatch(tag):
        raise UserError(f"{where}: tag '{tag}' is not an IOB tag (O, B-TYPE, I-TYPE); the tag "
                        "must be the last column")
      if not cur.tokens:
        cur.source = where
      cur.tokens.append(fields[0])
      cur.tags.append(tag)
  if cur.tokens:
    sentences.append(cur)
  return sentences


def label_list_from(sentences: Sequence[NerSentence]) -> list[str]:
  """All tags seen, 'O' first and the rest sorted."""
  tags = {t for s in sentences for t in s.tags} - {"O"}
  return ["O"] + sorted(tags)


def convert_examples(sentences: Sequence[NerSentence], tokenizer: Any, max_seq_length: int,
                     label_to_id: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Sentences -> `input_ids, token_type_ids, attention_mask, labels, word_index [N, L] int32`.

  `labels` holds the word's tag id on its FIRST sub-token and -100 elsewhere; `word_index` the
  word's position in the sentence there and -1 elsewhere. Words past `max_seq_length - 2`
  sub-tokens (or that tokenize to nothing) get no position; `align_predictions` tags them 'O'.
  """
  if max_seq_length < 3:
    raise UserError(f"max_seq_length {max_seq_length} is too small; use at least 3")
  tok = as_tokenizer(tokenizer)
  cls_id, sep_id, pad_id = special_ids(tok)
  encs = tok.encode_batch([s.tokens for s in sentences], is_pretokenized=True,
                          add_special_tokens=False)
  n, length = len(sentences), max_seq_length
  out = {k: np.full((n, length), v, np.int32) for k, v in
         [("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0),
          ("labels", IGNORE_INDEX), ("word_index", -1)]}
  for i, (s, e) in enumerate(zip(sentences, encs)):
    try:
      tag_ids = [label_to_id[t] for t in s.tags]
    except KeyError as err:
      raise UserError(f"{s.source or f'sentence {i}'}: tag {err.args[0]!r} is not in the label "
                      "list; build the label list from the training file") from None
    ids = e.ids[:length - 2]
    words = np.array([-1 if w is None else w for w in e.word_ids[:length - 2]], np.int64)
    first = np.ones(len(words), bool)
    first[1:] = words[1:] != words[:-1]
    first &= words >= 0
    pos = np.flatnonzero(first) + 1  # +1 for [CLS].
    out["input_ids"][i, :len(ids) + 2] = [cls_id, *ids, sep_id]
    out["attention_mask"][i, :len(ids) + 2] = 1
    out["word_index"][i, pos] = words[pos - 1]
    out["labels"][i, pos] = np.asarray(tag_ids, np.int32)[words[pos - 1]]
  return out


def align_predictions(predictions: np.ndarray, word_index: np.ndarray,
                      sentences: Sequence[NerSentence], label_list: Sequence[str]
                      ) -> list[list[str]]:
  """Token-level predictions (`[N, L]` ids or `[N, L, C]` logits) -> one tag per word.

  Each word takes the prediction at its first sub-token; words without one get 'O'.
  """
  preds = np.asarray(predictions)
  if preds.ndim == 3:
    preds = preds.argmax(-1)
  if preds.shape != word_index.shape or len(sentences) != len(preds):
    raise ValueError(f"predictions {preds.shape}, word_index {word_index.shape} and "
                     f"{len(sentences)} sentences do not line up")
  out = []
  for s, p, w in zip(sentences, preds, word_index):
    tags = ["O"] * len(s.tokens)
    for pos in np.flatnonzero(w >= 0):
      tags[w[pos]] = label_list[p[pos]]
    out.append(tags)
  return out


def write_conll(path: str | Path, sentences: Sequence[NerSentence],
                predicted_tags: Sequence[Sequence[str]]) -> Path:
  """Writes `token gold pred` lines, a blank line after each sentence (conlleval's input)."""
  if len(sentences) != len(predicted_tags):
    raise ValueError(f"{len(sentences)} sentences but {len(predicted_tags)} predictions")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for s, pred in zip(sentences, predicted_tags):
      if len(pred) != len(s.tokens):
        raise ValueError(f"{s.source}: {len(s.tokens)} tokens but {len(pred)} predicted tags")
      f.writelines(f"{t} {g} {p}\n" for t, g, p in zip(s.tokens, s.tags, pred))
      f.write("\n")
  return path
