"""Pretraining examples as in the original BERT: documents -> sentence pairs (NSP) -> dynamic masking.

1. `tokenize_documents`: split each document into sentences and WordPiece them with a fingerprinted, cached
   `datasets.map` (`num_proc` workers), keeping word starts from the fast tokenizer's word ids. The result is an
   Arrow cache file on disk, memory-mapped.
2. `create_pairs`: Google's `create_instances_from_document`: pack sentences up to a target length
   (`short_seq_prob` of the time a shorter one), split into A/B at a sentence boundary, and with probability
   `nsp_probability` replace B by a span of another document (NSP label 1) - putting the unused sentences back.
   The documents are cut into contiguous shards of at most `PairConfig.shard_docs` (4,096) documents, paired
   shard by shard (`num_proc` workers), and the random other document comes from the same shard (Google's
   script drew it from the documents of one process's input files). Memory is bounded by one shard; the result
   is a folder of fixed-shape `.npy` arrays, cached by content fingerprint and memory-mapped, so each process
   reads only the rows it draws. A corpus of one shard (the default BBC News) gives the pairs of the unsharded
   version exactly.
3. `Masker`: a per-batch numpy transform (no Python work per token): `mask_prob` of the non-special tokens,
   at most `max_predictions`, whole words optionally; of those 80% -> [MASK], 10% -> random, 10% kept.
   The MLM head later runs only at the returned `masked_positions`; `masked_kinds` says what happened at each
   (KIND_MASK / KIND_RANDOM / KIND_KEPT, 0 for an unused slot) so metrics can be reported per kind.
4. `pack_pairs` (`data.packing`): several pairs per row, first-fit, with segment ids (attention stays within a
   pair), position ids restarting per pair and each pair's [CLS] column for its NSP prediction; the Masker
   passes these through and weights NSP per pair slot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from bertjax.data import cache, loader
from bertjax.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
  """Lines (paragraphs) split further at sentence ends; empty pieces dropped."""
  out = []
  for line in text.splitlines():
    line = line.strip()
    if line:
      out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
  return out


def tokenize_documents(docs: datasets.Dataset, tok: Tokenizer, tok_fingerprint: str,
                       num_proc: int | None = None) -> datasets.Dataset:
  """-> Dataset with `ids` and `word_starts`: per document, per sentence, WordPiece ids / word-start flags.

  The result is a `datasets` cache file (Arrow, memory-mapped) when `docs` is file-backed; an unreadable cache
  file is reported and rebuilt.
  """

  def encode(batch):
    ids, starts = [], []
    for text in batch["text"]:
      sents = split_sentences(text)
      encs = tok.encode_batch(sents, add_special_tokens=False) if sents else []
      encs = [e for e in encs if e.ids]
      ids.append([e.ids for e in encs])
      starts.append([[w is None or i == 0 or w != e.word_ids[i - 1] for i, w in enumerate(e.word_ids)]
                     for e in encs])
    return {"ids": ids, "word_starts": starts}

  fp = hashlib.sha256(f"{docs._fingerprint}/{tok_fingerprint}/v2".encode()).hexdigest()[:16]
  features = datasets.Features({"ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
                                "word_starts": datasets.Sequence(datasets.Sequence(datasets.Value("bool")))})
  kwargs = dict(batched=True, batch_size=64, num_proc=num_proc, remove_columns=docs.column_names,
                features=features, new_fingerprint=fp, desc="tokenizing")
  with cache.spawned_workers(num_proc):
    try:
      return docs.map(encode, **kwargs)
    except (pa.ArrowInvalid, OSError) as e:  # a truncated/corrupt cache file; `encode` raises neither
      logging.warning("tokenized-documents cache of %s is unreadable (%s); rebuilding it", fp, e)
      return docs.map(encode, load_from_cache_file=False, **kwargs)


@dataclasses.dataclass(frozen=True)
class PairConfig:
  max_seq_length: int = 128
  short_seq_prob: float = 0.1
  nsp_probability: float = 0.5
  seed: int = 12345
  shard_docs: int = 4096  # documents per shard; a random NSP segment B comes from another document of the shard


PAIR_COLUMNS = ("input_ids", "token_type_ids", "word_starts", "nsp_labels", "lengths", "provenance")


def create_pairs(tokenized: datasets.Dataset, cls_id: int, sep_id: int, cfg: PairConfig,
                 cache_dir: str | None = None, num_proc: int | None = None) -> dict[str, np.ndarray]:
  """Sentence pairs for MLM + NSP as fixed-shape arrays, memory-mapped from `<cache_dir>/pairs/<fingerprint>/`.

  Returns input_ids/token_type_ids [N, L] (int32, padded with 0), word_starts [N, L] (bool), nsp_labels [N]
  (1 = B is a random span), lengths [N], and provenance [N, 11] (document rows in `tokenized` and token and
  sentence ranges of A and B) for tests. The documents are cut into contiguous, equal shards of at most
  `cfg.shard_docs`; each shard's pairs are made independently (a `datasets.map` over shard numbers, `num_proc`
  workers), so memory is bounded by one shard and the result does not depend on `num_proc` or the process count.
  `cache_dir=None` builds in a new temporary folder.
  """
  key = hashlib.sha256(f"{tokenized._fingerprint}/{dataclasses.asdict(cfg)}/{cls_id}/{sep_id}/v2".encode())
  root = os.path.join(cache_dir or tempfile.mkdtemp(prefix="bertjax-pairs-"), "pairs")
  folder = os.path.join(root, key.hexdigest()[:16])
  out = cache.open_store(folder)
  if out is not None:
    return out
  os.makedirs(root, exist_ok=True)
  tmp = cache.new_build_folder(folder)
  try:
    n = len(tokenized)
    n_shards = max(1, -(-n // cfg.shard_docs))
    bounds = [s * n // n_shards for s in range(n_shards + 1)]
    shards = datasets.Dataset.from_dict({"shard": list(range(n_shards))})
    workers = min(num_proc, n_shards) if num_proc and num_proc > 1 and n_shards > 1 else None
    args = dict(tokenized=tokenized, bounds=bounds, cls_id=cls_id, sep_id=sep_id, cfg=cfg, folder=tmp)
    with cache.spawned_workers(workers):
      shards.map(_pair_shard, batched=True, batch_size=1, num_proc=workers, fn_kwargs=args, keep_in_memory=True,
                 load_from_cache_file=False, new_fingerprint=f"{key.hexdigest()[:16]}-shards", desc="pairing")
    rows = 0
    for col in PAIR_COLUMNS:
      parts = [os.path.join(tmp, f"{col}.{s:06d}.npy") for s in range(n_shards)]
      rows = cache.concatenate(parts, os.path.join(tmp, f"{col}.npy"))
    cache.publish(tmp, folder, list(PAIR_COLUMNS), rows)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  out = cache.open_store(folder)
  assert out is not None, folder
  return out


def _pair_shard(batch: dict, tokenized: datasets.Dataset, bounds: list[int], cls_id: int, sep_id: int,
                cfg: PairConfig, folder: str) -> dict:
  """`datasets.map` worker: the pairs of shard `batch["shard"][0]`, saved as `<column>.<shard>.npy` in `folder`."""
  s = batch["shard"][0]
  docs = _shard_documents(tokenized, bounds[s], bounds[s + 1])
  if len(docs) < 2:
    where = "the corpus" if len(bounds) == 2 else f"documents {bounds[s]}-{bounds[s + 1] - 1} of the corpus"
    raise UserError(f"{where} hold(s) {len(docs)} non-empty document(s); NSP needs at least 2")
  rng = np.random.default_rng(cfg.seed if s == 0 else [cfg.seed, s])  # shard 0: the single-stream pairs of v1
  arrays = _pair_arrays(docs, _sample_pairs(docs, cfg, rng), cls_id, sep_id, cfg.max_seq_length)
  for col, v in arrays.items():
    np.save(os.path.join(folder, f"{col}.{s:06d}.npy"), v)
  return {"shard": [s], "rows": [len(arrays["nsp_labels"])]}


def _shard_documents(tokenized: datasets.Dataset, start: int, stop: int) -> list[tuple]:
  """Non-empty documents of rows [start, stop) as (row, tokens, word starts, sentence offsets), read via Arrow."""
  table = tokenized.with_format("arrow")[start:stop]
  ids, flags = table.column("ids").combine_chunks(), table.column("word_starts").combine_chunks()
  sents_per_doc = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
  sent_lens = pc.list_value_length(ids.flatten()).to_numpy(zero_copy_only=False)
  tokens = ids.flatten().flatten().to_numpy(zero_copy_only=False)
  starts = flags.flatten().flatten().to_numpy(zero_copy_only=False).astype(bool)
  tok_off = np.concatenate([[0], np.cumsum(sent_lens)])
  sent_off = np.concatenate([[0], np.cumsum(sents_per_doc)])
  docs = []
  for d in range(len(sents_per_doc)):
    s0, s1 = sent_off[d], sent_off[d + 1]
    if s1 > s0:
      t0, t1 = tok_off[s0], tok_off[s1]
      docs.append((start + d, tokens[t0:t1].astype(np.int32), starts[t0:t1], tok_off[s0:s1 + 1] - t0))
  return docs


def _truncate_pair(a: list, b: list, max_tokens: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """Google's truncate_seq_pair on index ranges: trim the longer side, from front or back at random.

  a/b are [start, end) token offsets into the concatenated sentences; returns the new ranges.
  """
  a0, a1 = a
  b0, b1 = b
  while (a1 - a0) + (b1 - b0) > max_tokens:
    if (a1 - a0) > (b1 - b0):
      if rng.random() < 0.5:
        a0 += 1
      else:
        a1 -= 1
    else:
      if rng.random() < 0.5:
        b0 += 1
      else:
        b1 -= 1
  return a0, a1, b0, b1


def _sample_pairs(docs: list[tuple], cfg: PairConfig, rng: np.random.Generator) -> list[tuple]:
  """Google's create_instances_from_document over `docs`; -> (doc_a, a0, a1, doc_b, b0, b1, label, A/B sentences)."""
  max_tokens = cfg.max_seq_length - 3
  rows = []
  for d, (*_, offs) in enumerate(docs):
    n_sent = len(offs) - 1
    target = max_tokens if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, max_tokens + 1))
    chunk_start, i = 0, 0
    while i < n_sent:
      length = offs[i + 1] - offs[chunk_start]
      if i == n_sent - 1 or length >= target:
        n_chunk = i + 1 - chunk_start
        a_end = chunk_start + (1 if n_chunk < 2 else int(rng.integers(1, n_chunk)))
        a = (offs[chunk_start], offs[a_end])
        if n_chunk == 1 or rng.random() < cfg.nsp_probability:
          label, target_b = 1, max(1, target - (a[1] - a[0]))
          other = d
          for _ in range(10):
            other = int(rng.integers(len(docs)))
            if other != d:
              break
          if other == d:
            other = (d + 1) % len(docs)
          o_offs = docs[other][3]
          s0 = int(rng.integers(len(o_offs) - 1))
          s1 = s0 + 1
          while s1 < len(o_offs) - 1 and o_offs[s1] - o_offs[s0] < target_b:
            s1 += 1
          b, b_doc, b_sents = (o_offs[s0], o_offs[s1]), other, (s0, s1)
          i -= (chunk_start + n_chunk) - a_end  # put the unused sentences back
        else:
          label, b, b_doc, b_sents = 0, (offs[a_end], offs[i + 1]), d, (a_end, i + 1)
        a0, a1, b0, b1 = _truncate_pair(list(a), list(b), max_tokens, rng)
        if a1 > a0 and b1 > b0:
          rows.append((d, a0, a1, b_doc, b0, b1, label, chunk_start, a_end, *b_sents))
        chunk_start = i + 1
        target = max_tokens if rng.random() >= cfg.short_seq_prob else int(rng.integers(2, max_tokens + 1))
      i += 1
  return rows


def _pair_arrays(docs: list[tuple], rows: list[tuple], cls_id: int, sep_id: int, L: int) -> dict[str, np.ndarray]:
  """[CLS] A [SEP] B [SEP] rows padded to L; provenance holds the documents' rows in the tokenized dataset."""
  n = len(rows)
  ids = np.zeros((n, L), np.int32)
  types = np.zeros((n, L), np.int32)
  starts = np.zeros((n, L), bool)
  meta = np.zeros((n, 11), np.int32)
  for r, (d, a0, a1, bd, b0, b1, label, *sent) in enumerate(rows):
    ta, sa = docs[d][1][a0:a1], docs[d][2][a0:a1]
    tb, sb = docs[bd][1][b0:b1], docs[bd][2][b0:b1]
    la, lb = len(ta), len(tb)
    ids[r, 0], ids[r, 1:1 + la], ids[r, 1 + la] = cls_id, ta, sep_id
    ids[r, 2 + la:2 + la + lb], ids[r, 2 + la + lb] = tb, sep_id
    types[r, 2 + la:3 + la + lb] = 1
    starts[r, 0], starts[r, 1:1 + la], starts[r, 1 + la] = True, sa, True
    starts[r, 2 + la:2 + la + lb], starts[r, 2 + la + lb] = sb, True
    starts[r, 1], starts[r, 2 + la] = True, True  # a truncated front still starts a (partial) word
    meta[r] = (docs[d][0], a0, a1, docs[bd][0], b0, b1, label, *sent)
  return {"input_ids": ids, "token_type_ids": types, "word_starts": starts, "nsp_labels": meta[:, 6].copy(),
          "lengths": (ids != 0).sum(1).astype(np.int32), "provenance": meta}


def pack_pairs(pairs: dict[str, np.ndarray], max_segments: int) -> dict[str, np.ndarray]:
  """Several [CLS] A [SEP] B [SEP] pairs per row (first-fit in pair order, at most `max_segments`).

  Returns input_ids / token_type_ids / word_starts [R, L] as the pairs have them, `segment_ids` [R, L] (k for the
  row's k-th pair, 0 for padding), `position_ids` [R, L] restarting at 0 for each pair, `cls_positions` [R, k]
  (the column of each pair's [CLS]; 0 for an unused slot), `nsp_labels` [R, k], `nsp_slots` [R, k] (1.0 for a
  used slot), `pair_index` [R, k] (the pair's row in `pairs`, -1 unused) and `lengths` [R] (real tokens).
  """
  packed = PackedPairs(pairs, max_segments)
  return packed.rows(np.arange(len(packed.lengths)))


class PackedPairs(Mapping):
  """`pack_pairs(pairs, max_segments)` as a mapping whose [R, ...] arrays are built only for the rows read:
  `packed[key][idx]` packs the rows `idx` (a BatchSource reads each process's rows of each batch, so a process
  packs only its own rows). The first-fit plan over all pair lengths (which pairs share a row, in pair order) is
  made up front: it decides the rows, the same for every process count. `lengths` is a plain array."""

  _KEYS = ("input_ids", "token_type_ids", "word_starts", "segment_ids", "position_ids", "cls_positions",
           "nsp_labels", "nsp_slots", "pair_index", "lengths")

  def __init__(self, pairs: Mapping[str, np.ndarray], max_segments: int):
    if max_segments < 1:
      raise UserError(f"data.max_segments_per_row={max_segments} must be at least 1")
    self.pairs, self.k = pairs, max_segments
    self.width = pairs["input_ids"].shape[1]
    self.pair_lengths = pair_lengths = np.asarray(pairs["lengths"], np.int64)
    plan = loader.first_fit(pair_lengths, self.width, max_segments)
    self.pair_index = np.full((len(plan), max_segments), -1, np.int64)
    for r, members in enumerate(plan):
      self.pair_index[r, :len(members)] = members
    self.lengths = np.where(self.pair_index >= 0, pair_lengths[self.pair_index], 0).sum(1).astype(np.int32)
    self.rows_built = 0  # rows materialised so far (host work)
    self._last: tuple[bytes, dict] | None = None

  def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The packed rows `idx`, all arrays."""
    idx = np.asarray(idx, np.int64)
    if self._last is not None and self._last[0] == idx.tobytes():
      return self._last[1]
    L, k, R = self.width, self.k, len(idx)
    members = self.pair_index[idx]
    used = np.unique(members[members >= 0])  # read each pair once, in file order (cheap on memmaps)
    src = {c: np.asarray(self.pairs[c][used]) for c in ("input_ids", "token_type_ids", "word_starts", "nsp_labels")}
    at = {int(i): j for j, i in enumerate(used)}
    out = {"input_ids": np.zeros((R, L), np.int32), "token_type_ids": np.zeros((R, L), np.int32),
           "word_starts": np.zeros((R, L), bool), "segment_ids": np.zeros((R, L), np.int32),
           "position_ids": np.zeros((R, L), np.int32), "cls_positions": np.zeros((R, k), np.int32),
           "nsp_labels": np.zeros((R, k), np.int32), "nsp_slots": np.zeros((R, k), np.float32),
           "pair_index": members.copy(), "lengths": self.lengths[idx]}
    for r in range(R):
      col = 0
      for s, i in enumerate(members[r]):
        if i < 0:
          break
        j, n = at[int(i)], int(self.pair_lengths[i])
        for c in ("input_ids", "token_type_ids", "word_starts"):
          out[c][r, col:col + n] = src[c][j, :n]
        out["segment_ids"][r, col:col + n] = s + 1
        out["position_ids"][r, col:col + n] = np.arange(n)
        out["cls_positions"][r, s], out["nsp_labels"][r, s] = col, src["nsp_labels"][j]
        out["nsp_slots"][r, s] = 1.0
        col += n
    self.rows_built += R
    self._last = (idx.tobytes(), out)
    return out

  def __getitem__(self, key: str):
    if key == "lengths":
      return self.lengths
    if key not in self._KEYS:
      raise KeyError(key)
    return _PackedColumn(self, key)

  def __iter__(self):
    return iter(self._KEYS)

  def __len__(self) -> int:
    return len(self._KEYS)


class _PackedColumn:
  """One array of a `PackedPairs`, built on indexing (`column[idx]`); shape and dtype as `pack_pairs` gives."""

  _DTYPES = {"word_starts": np.dtype(bool), "nsp_slots": np.dtype(np.float32), "pair_index": np.dtype(np.int64)}

  def __init__(self, packed: PackedPairs, key: str):
    self.packed, self.key = packed, key
    per_slot = key in ("cls_positions", "nsp_labels", "nsp_slots", "pair_index")
    self.shape = (len(packed.lengths), packed.k if per_slot else packed.width)
    self.dtype = self._DTYPES.get(key, np.dtype(np.int32))

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, idx) -> np.ndarray:
    return self.packed.rows(idx)[self.key]


def padding_share(lengths: np.ndarray, width: int) -> float:
  """The share of positions in rows of `width` that are padding."""
  return 1.0 - float(np.sum(lengths)) / (len(lengths) * width) if len(lengths) else 0.0


KIND_MASK, KIND_RANDOM, KIND_KEPT = 1, 2, 3  # `masked_kinds`: what the input holds at a chosen position
KINDS = {"mask": KIND_MASK, "random": KIND_RANDOM, "kept": KIND_KEPT}


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  mask_prob: float = 0.15
  max_predictions: int = 20
  mask_token_frac: float = 0.8
  random_token_frac: float = 0.1
  whole_word: bool = False


class Masker:
  """Dynamic MLM masking of a batch of pairs, vectorised in numpy; deterministic given the generator."""

  def __init__(self, cfg: MaskConfig, vocab_size: int, special_ids: list[int], mask_id: int, pad_id: int = 0):
    if not 0.0 < cfg.mask_prob < 1.0:
      raise UserError(f"data.mask_prob={cfg.mask_prob} must be in (0, 1)")
    if cfg.mask_token_frac + cfg.random_token_frac > 1.0 or min(cfg.mask_token_frac, cfg.random_token_frac) < 0:
      raise UserError("data.mask_token_frac + data.random_token_frac must be within [0, 1]")
    self.cfg = cfg
    self.special = np.zeros(vocab_size, bool)
    self.special[special_ids] = True
    self.replacements = np.flatnonzero(~self.special).astype(np.int32)
    self.mask_id, self.pad_id = mask_id, pad_id

  def __call__(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = batch["input_ids"]
    B, L = ids.shape
    P = self.cfg.max_predictions
    cand = ~self.special[ids]
    n_cand = cand.sum(1)
    budget = np.minimum(P, np.maximum(1, np.round(n_cand * self.cfg.mask_prob))).astype(np.int64)
    if self.cfg.whole_word:
      word = np.cumsum(batch["word_starts"] | ~cand, axis=1) - 1
    else:
      word = np.broadcast_to(np.arange(L), (B, L))
    flat = (np.arange(B)[:, None] * L + word).ravel()
    word_len = np.bincount(flat, weights=cand.ravel(), minlength=B * L).reshape(B, L)
    keys = np.where(word_len > 0, rng.random((B, L)), 2.0)
    order = np.argsort(keys, axis=1)
    sorted_len = np.take_along_axis(word_len, order, axis=1)
    chosen_sorted = (np.cumsum(sorted_len, axis=1) <= budget[:, None]) & (sorted_len > 0)
    chosen_word = np.zeros((B, L), bool)
    np.put_along_axis(chosen_word, order, chosen_sorted, axis=1)
    masked = np.take_along_axis(chosen_word, word, axis=1) & cand

    u = rng.random((B, L))
    to_mask = masked & (u < self.cfg.mask_token_frac)
    to_random = masked & ~to_mask & (u < self.cfg.mask_token_frac + self.cfg.random_token_frac)
    new_ids = np.where(to_mask, self.mask_id, ids)
    rand = self.replacements[rng.integers(len(self.replacements), size=(B, L))]
    new_ids = np.where(to_random, rand, new_ids).astype(np.int32)

    positions = np.argsort(~masked, axis=1, kind="stable")[:, :P].astype(np.int32)
    weights = np.take_along_axis(masked, positions, axis=1)
    labels = np.where(weights, np.take_along_axis(ids, positions, axis=1), 0).astype(np.int32)
    kind = np.where(to_mask, KIND_MASK, np.where(to_random, KIND_RANDOM, KIND_KEPT))
    kinds = np.where(weights, np.take_along_axis(kind, positions, axis=1), 0).astype(np.int32)
    example_w = batch.get("example_weights", np.ones((B,), np.float32))  # 0 for eval padding rows
    out = {"input_ids": new_ids, "token_type_ids": batch["token_type_ids"].astype(np.int32),
           "attention_mask": (ids != self.pad_id).astype(np.int32),
           "masked_positions": np.where(weights, positions, 0).astype(np.int32), "masked_labels": labels,
           "masked_weights": weights.astype(np.float32) * example_w[:, None], "masked_kinds": kinds,
           "nsp_labels": batch["nsp_labels"].astype(np.int32), "nsp_weights": example_w.astype(np.float32)}
    if "segment_ids" in batch:  # packed rows (`pack_pairs`): NSP per pair slot
      out.update({k: batch[k].astype(np.int32) for k in ("segment_ids", "position_ids", "cls_positions")})
      out["nsp_weights"] = (batch["nsp_slots"] * example_w[:, None]).astype(np.float32)
    return out

