"""Predictions from a fine-tuned model on new text: `Predictor` (the library behind `python -m bertjax.predict`).

    python -m bertjax.predict --checkpoint=workdirs/sst2 --input=reviews.txt --output=labels.jsonl
    Predictor.from_checkpoint("workdirs/sst2")(["a gripping film", "dull"])  # -> [{"label": ..., ...}, ...]

Every fine-tuning head: sequence classification (`label` + `probabilities`; `labels` for multi-label),
regression (`score`), token classification (`entities` with character offsets into the input text) and
extractive QA (`answer`: text, character offsets into the context, start + end logit; long contexts become
windows `doc_stride` tokens apart, as in training); and sentence embeddings (`embedding`: a list of floats, with
the checkpoint's pooling and normalisation; `Predictor.embed` gives them as one float32 array). NER texts longer
than the model are tagged in consecutive pieces of `max_seq_length - 2` tokens. The tokenizer, maximum length and
QA window settings come from the checkpoint's workdir (`tokenizer/`, `config.json`); labels, pooling and
normalisation from the checkpoint meta. A workdir given
as `--checkpoint` means its best checkpoint (`<workdir>/best`, the one the training run's prediction files
came from) when there is one, else its latest step.

Inputs are sorted by length into batches padded to a few bucket lengths (so few shapes compile), and the
outputs are written back in input order.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import os
import sys
from typing import IO, Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from bertjax import paths
from bertjax.artifacts import factory, load as artifacts_load
from bertjax.artifacts.workdir import find_checkpoint, training_config, workdir_of
from bertjax.data import glue, loader, squad, tokenizer as toklib
from bertjax.errors import UserError
from bertjax.models.heads import POOLING
from bertjax.tasks.metrics import get_entities

FINETUNE_HEADS = ("sequence_classification", "token_classification", "question_answering")
EMBEDDING_HEAD = "sentence_embedding"
PREDICT_HEADS = (*FINETUNE_HEADS, EMBEDDING_HEAD)
# Prediction sorts inputs by length, so a batch's rows are about equally long and finer widths than training's
# "auto" (whose batches are random) cut real padding: on the SST-2 dev sentences (batch 32, sorted) the mean width
# is 31.3 tokens with these widths vs 37.1 with powers of two, against 25.5 real tokens.
PREDICT_BUCKETS = "16,24,32,48,64,96,128,192,256,384,512"


# -- the predictor ----------------------------------------------------------------------------------------------

def bucket_length(n: int, max_len: int) -> int:
  """The padded length of a batch whose longest row has `n` tokens: the smallest `PREDICT_BUCKETS` width that
  holds it, at most `max_len`."""
  return next(w for w in predict_widths(max_len) if w >= min(n, max_len))


@functools.lru_cache(maxsize=None)
def predict_widths(max_len: int) -> tuple[int, ...]:
  """`PREDICT_BUCKETS` up to `max_len` (parsed once per length, not per batch)."""
  return loader.bucket_lengths(PREDICT_BUCKETS, max_len)


@dataclasses.dataclass
class Predictor:
  """Raw text in, labels / scores / entities / answers / embeddings out. `forward(arrays)` maps int32 `input_ids`,
  `token_type_ids`, `attention_mask` [B, T] to the head's float32 outputs (logits [B, C], [B, T, C], start and
  end logits [B, T] each, or embeddings [B, D] already pooled and normalised as `embedding` says)."""

  forward: Callable[[dict[str, np.ndarray]], Any]
  head: str
  tokenizer: Any
  max_seq_length: int
  label_names: list[str]
  problem_type: str = "single_label_classification"  # | multi_label_classification | regression
  threshold: float = 0.5
  batch_size: int = 32
  qa: dict = dataclasses.field(default_factory=dict)  # doc_stride, max_query_length, n_best_size, ...
  source: str = ""
  embedding: dict = dataclasses.field(default_factory=dict)  # pooling, normalize, dim (sentence_embedding)

  @classmethod
  def from_checkpoint(cls, path: str, *, max_seq_length: int | None = None, tokenizer: str | None = None,
                      batch_size: int = 32, doc_stride: int | None = None) -> "Predictor":
    step_dir = find_checkpoint(path)
    params, meta = artifacts_load.load_params(step_dir)
    return cls.from_params(params, meta, step_dir, max_seq_length=max_seq_length, tokenizer=tokenizer,
                           batch_size=batch_size, doc_stride=doc_stride)

  @classmethod
  def from_params(cls, params: dict, meta: dict, step_dir: str, *, max_seq_length: int | None = None,
                  tokenizer: str | None = None, batch_size: int = 32, doc_stride: int | None = None,
                  forward: Callable | None = None, workdir: str | None = None) -> "Predictor":
    """From a params tree + checkpoint meta; `forward` replaces the JAX model (e.g. a quantized one), `workdir`
    the folder holding `tokenizer/` and `config.json` (default: the run folder above `step_dir`)."""
    head = meta.get("head")
    if head not in PREDICT_HEADS:
      raise UserError(f"checkpoint {step_dir} has head {head!r}, not a fine-tuning head ({', '.join(FINETUNE_HEADS)})"
                      f" or {EMBEDDING_HEAD}; fine-tune it first (configs/glue.py, ner.py, squad.py, classify.py)")
    workdir = workdir or workdir_of(step_dir)
    data = training_config(workdir)
    tok_src = tokenizer or (paths.join(workdir, "tokenizer") if workdir else None)
    if not tok_src or not paths.exists(tok_src):
      raise UserError(f"no tokenizer next to checkpoint {step_dir} (expected <workdir>/tokenizer/); pass --tokenizer")
    tok = glue.as_tokenizer(toklib.load(tok_src))
    cfg = factory.config_from_meta(meta)
    max_len = int(max_seq_length or data.get("max_seq_length") or min(cfg.max_position_embeddings, 512))
    if max_len > cfg.max_position_embeddings:
      raise UserError(f"--max_seq_length={max_len} exceeds the model's position table ({cfg.max_position_embeddings})")
    embedding = embedding_settings(meta, cfg.hidden_size, step_dir) if head == EMBEDDING_HEAD else {}
    if forward is None:
      forward = jax_forward(factory.model_from_meta(meta, params), **model_options(embedding))
    qa = {"doc_stride": int(doc_stride or data.get("doc_stride") or 128),
          "max_query_length": int(data.get("max_query_length") or 64),
          "n_best_size": int(data.get("n_best_size") or 20),
          "max_answer_length": int(data.get("max_answer_length") or 30),
          "version_2": str(meta.get("squad_version", data.get("version", "1.1"))) == "2.0",
          "null_score_diff_threshold": float(data.get("null_score_diff_threshold") or 0.0)}
    return cls(forward, head, tok, max_len, [str(n) for n in meta.get("label_names") or []],
               str(meta.get("problem_type") or ("regression" if meta.get("num_labels") == 1 else
                                                "single_label_classification")),
               float(meta.get("threshold") or 0.5), batch_size, qa, step_dir, embedding)

  # -- batched forward ------------------------------------------------------------------------------------------
  def run(self, feats: dict[str, np.ndarray], progress: Any = None) -> list[Any]:
    """The head's outputs for every row of `feats` (each cut to the row's length), in row order."""
    lengths = feats["attention_mask"].sum(-1)
    order = np.argsort(-lengths, kind="stable")  # longest first: the first batch shows the worst-case time
    out: list[Any] = [None] * len(lengths)
    bs = self.batch_size
    for i in range(0, len(order), bs):
      idx = order[i:i + bs]
      t = bucket_length(int(lengths[idx].max()), feats["input_ids"].shape[1])
      rows = min(bs, 1 << (len(idx) - 1).bit_length())  # a small request (serving) runs a small batch
      batch = {k: np.zeros((rows, t), np.int32) for k in glue.MODEL_KEYS}
      for k in glue.MODEL_KEYS:
        batch[k][:len(idx)] = feats[k][idx, :t]
      res = self.forward(batch)
      res = [np.asarray(r) for r in res] if isinstance(res, (tuple, list)) else np.asarray(res)
      for j, row in enumerate(idx):
        out[row] = tuple(r[j, :lengths[row]] for r in res) if isinstance(res, list) else (
            res[j] if res.ndim == 2 else res[j, :lengths[row]])
      if progress is not None:
        progress.update(len(idx))
    return out

  def warmup(self) -> int:
    """Compile every (rows, length) shape `run` can use (powers of two), so no request waits for a compile."""
    lengths = predict_widths(self.max_seq_length)
    shapes = [(1 << i, t) for i in range((self.batch_size - 1).bit_length() + 1) if 1 << i <= self.batch_size
              for t in lengths]
    shapes += [(self.batch_size, t) for t in lengths if self.batch_size & (self.batch_size - 1)]
    for rows, t in shapes:
      ones = np.ones((rows, t), np.int32)
      self.forward({"input_ids": ones, "token_type_ids": 0 * ones, "attention_mask": ones})
    return len(shapes)

  # -- per head -------------------------------------------------------------------------------------------------
  def __call__(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, progress: Any = None
               ) -> list[dict[str, Any]]:
    """One dict per text (for QA: `texts` are questions, `text_pairs` contexts)."""
    texts = [str(t) for t in texts]
    if self.head == EMBEDDING_HEAD:
      if text_pairs is not None:
        raise UserError("sentence embeddings take single texts; drop the text pairs (--text_pair_field)")
      return [{"embedding": row.tolist()} for row in self.embed(texts, progress)]
    if self.head == "question_answering":
      if text_pairs is None:
        raise UserError("question answering needs contexts: pass text_pairs (--text_pair_field, default 'context')")
      return self._answers(texts, [str(t) for t in text_pairs], progress)
    if self.head == "token_classification":
      return self._entities(texts, progress)
    feats = glue.encode_pairs(self.tokenizer, texts, None if text_pairs is None else [str(t) for t in text_pairs],
                              self.max_seq_length)
    return self.classify(np.stack(self.run(feats, progress)) if texts else np.zeros((0, 1), np.float32))

  def embed(self, texts: Sequence[str], progress: Any = None) -> np.ndarray:
    """The embeddings of `texts` as one float32 array [N, D], in input order (batched by length like `run`)."""
    if self.head != EMBEDDING_HEAD:
      raise UserError(f"embed() needs a {EMBEDDING_HEAD} model; this one is {self.head}: call the predictor instead")
    if not texts:
      return np.zeros((0, int(self.embedding.get("dim") or 0)), np.float32)
    feats = glue.encode_pairs(self.tokenizer, [str(t) for t in texts], None, self.max_seq_length)
    return np.stack(self.run(feats, progress)).astype(np.float32, copy=False)

  def classify(self, logits: np.ndarray) -> list[dict[str, Any]]:
    logits = logits.astype(np.float64)
    if self.problem_type == "regression":
      return [{"score": float(x)} for x in logits[:, 0]]
    names = self.label_names or [str(i) for i in range(logits.shape[-1])]
    if self.problem_type == "multi_label_classification":
      probs = 1.0 / (1.0 + np.exp(-logits))
      return [{"labels": [n for n, p in zip(names, row) if p >= self.threshold],
               "probabilities": dict(zip(names, map(float, row)))} for row in probs]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return [{"label": names[int(row.argmax())], "probabilities": dict(zip(names, map(float, row)))} for row in probs]

  def ner_features(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], list[Any], list[int]]:
    """`[CLS] tokens [SEP]` rows of each raw text, a text longer than the model cut into consecutive pieces of
    `max_seq_length - 2` tokens; also the encodings (word ids, offsets) and each row's text index."""
    cls_id, sep_id, pad_id = glue.special_ids(self.tokenizer)
    encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    piece = self.max_seq_length - 2
    owner = [i for i, e in enumerate(encs) for _ in range(max(1, -(-len(e.ids) // piece)))]
    n, length = len(owner), self.max_seq_length
    feats = {"input_ids": np.full((n, length), pad_id, np.int32), "token_type_ids": np.zeros((n, length), np.int32),
             "attention_mask": np.zeros((n, length), np.int32)}
    first: dict[int, int] = {}
    for r, i in enumerate(owner):
      k = r - first.setdefault(i, r)  # the k-th piece of text i
      ids = encs[i].ids[k * piece:(k + 1) * piece]
      feats["input_ids"][r, :len(ids) + 2] = [cls_id, *ids, sep_id]
      feats["attention_mask"][r, :len(ids) + 2] = 1
    return feats, encs, owner

  def _entities(self, texts: list[str], progress: Any) -> list[dict[str, Any]]:
    feats, encs, owner = self.ner_features(texts)
    pieces: list[list[np.ndarray]] = [[] for _ in texts]
    for i, logits in zip(owner, self.run(feats, progress)):
      pieces[i].append(logits[1:-1])
    return [{"entities": entities(text, enc, np.concatenate(p), self.label_names)}
            for text, enc, p in zip(texts, encs, pieces)]

  def _answers(self, questions: list[str], contexts: list[str], progress: Any) -> list[dict[str, Any]]:
    q = self.qa
    examples = [squad.SquadExample(str(i), qq, c, [], []) for i, (qq, c) in enumerate(zip(questions, contexts))]
    feats = squad.convert_examples_to_features(examples, self.tokenizer, self.max_seq_length, q["doc_stride"],
                                               q["max_query_length"], is_training=False)
    if progress is not None:
      progress.total = len(feats["example_index"])
    logits = self.run(feats, progress)
    full = np.full((len(logits), self.max_seq_length), -np.inf, np.float32)
    start, end = full.copy(), full.copy()
    for i, (s, e) in enumerate(logits):
      start[i, :len(s)], end[i, :len(e)] = s, e
    out = []
    for span in squad.best_spans(examples, feats, start, end, q["n_best_size"], q["max_answer_length"]):
      if not np.isfinite(span.score) or (q["version_2"] and span.null_odds > q["null_score_diff_threshold"]):
        answer = {"text": "", "start": -1, "end": -1, "score": None}
      else:
        answer = {"text": span.text, "start": span.start, "end": span.end, "score": round(span.score, 5)}
      out.append({"answer": answer})
    return out


def entities(text: str, enc: Any, logits: np.ndarray, label_names: Sequence[str]) -> list[dict[str, Any]]:
  """Word tags (each word's first sub-token, as in training) grouped into entities with character offsets, by the
  same conlleval chunking the NER F1 uses (`tasks.metrics.get_entities`: IOB1 / IOB2 / IOBES).

  `enc` is the text's encoding without special tokens; `logits` [n, C] its (maybe cut) tokens' logits. A word
  is one of the tokenizer's pre-tokens (whitespace / punctuation split)."""
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  words: list[tuple[int, int, str, float]] = []  # (start, end, tag, prob) per word
  prev = None
  for t in range(len(logits)):
    w = enc.word_ids[t]
    if w is None:
      continue
    s, e = enc.offsets[t]
    if w != prev:
      k = int(probs[t].argmax())
      words.append((s, e, label_names[k], float(probs[t, k])))
    else:  # a continuation widens the word
      words[-1] = (words[-1][0], e, words[-1][2], words[-1][3])
    prev = w
  out = []
  for kind, i, j in get_entities([w[2] for w in words]):
    s, e = words[i][0], words[j][1]
    out.append({"entity": kind, "text": text[s:e], "start": s, "end": e,
                "score": round(float(np.mean([w[3] for w in words[i:j + 1]])), 5)})
  return out


def embedding_settings(meta: dict, hidden_size: int, where: str) -> dict:
  """The pooling, normalisation and width of a sentence_embedding checkpoint's embeddings (from its meta)."""
  pooling = str(meta.get("pooling") or "mean")
  if pooling not in POOLING:
    raise UserError(f"checkpoint {where} has pooling={pooling!r}; bertjax pools by {' or '.join(POOLING)}")
  return {"pooling": pooling, "normalize": bool(meta.get("normalize")), "dim": int(hidden_size)}


def model_options(embedding: dict) -> dict:
  """The model-call keyword arguments of `Predictor.embedding` (pooling, normalize; none for other heads)."""
  return {k: embedding[k] for k in ("pooling", "normalize")} if embedding else {}


def jax_forward(model: nnx.Module, **options: Any) -> Callable:
  """A jitted `arrays -> outputs` of an NNX model (compiled once per model and batch shape); `options` are
  keyword arguments of the model's call (an embedding model's `pooling`, `normalize`)."""
  graphdef, state = nnx.split(model)
  opts = tuple(sorted(options.items()))
  return lambda a: apply(graphdef, state, a["input_ids"], a["token_type_ids"], a["attention_mask"], options=opts)


@functools.partial(jax.jit, static_argnums=0, static_argnames="options")
def apply(graphdef, state, input_ids, token_type_ids, attention_mask, options: tuple = ()):
  """The model's deterministic forward pass; one jit for every predictor, so the same model and shapes compile
  once per process. `options`: (name, value) pairs passed to the model's call."""
  return nnx.merge(graphdef, state)(input_ids, token_type_ids, attention_mask, deterministic=True, **dict(options))


# -- files --------------------------------------------------------------------------------------------------------

def read_rows(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """Rows of a .txt (one `text` a line), .tsv (header row; quotes literal) or .jsonl file, and the column names."""
  if not os.path.isfile(path):
    raise UserError(f"input file {path} does not exist")
  ext = os.path.splitext(path)[1].lower()
  with open(path, encoding="utf-8", newline="") as f:
    raw = f.read()
  if not raw.strip():
    raise UserError(f"input file {path} is empty; expected one text per line (.txt), a header + rows (.tsv) or "
                    "JSON lines (.jsonl)")
  if ext == ".txt":
    return [{"text": line} for line in raw.splitlines()], ["text"]
  if ext == ".tsv":
    lines = list(csv.reader(raw.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    header = lines[0]
    rows = []
    for n, vals in enumerate(lines[1:], 2):
      if not vals:  # a blank line
        continue
      if len(vals) != len(header):
        raise UserError(f"{path}:{n}: {len(vals)} tab-separated fields but the header has {len(header)}")
      rows.append(dict(zip(header, vals)))
    return rows, header
  if ext in (".jsonl", ".json"):
    rows, cols = [], {}
    for n, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:
        raise UserError(f"{path}:{n}: not a JSON object ({e})") from None
      if not isinstance(row, dict):
        raise UserError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
      rows.append(row)
      cols.update(dict.fromkeys(row))
    return rows, list(cols)
  raise UserError(f"input {path}: unknown file type {ext!r}; use .txt, .tsv or .jsonl")


def pick_field(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], path: str, flag: str) -> str:
  if wanted:
    if wanted not in columns:
      raise UserError(f"{path} has no column {wanted!r} (columns: {', '.join(columns)}); pass {flag}=<column>")
    return wanted
  for d in defaults:
    if d in columns:
      return d
  raise UserError(f"{path} has none of the columns {list(defaults)} (columns: {', '.join(columns)}); "
                  f"pass {flag}=<column>")


def flat_row(pred: dict[str, Any]) -> dict[str, Any]:
  """A prediction as TSV columns: probabilities as `prob_<label>`, entities as JSON, the answer's parts."""
  out = {}
  for k, v in pred.items():
    if k == "probabilities":
      out.update({f"prob_{n}": f"{p:.6f}" for n, p in v.items()})
    elif k == "answer":
      out.update({"answer": v["text"], "answer_start": v["start"], "answer_end": v["end"], "answer_score": v["score"]})
    elif isinstance(v, (list, dict)):
      out[k] = json.dumps(v, ensure_ascii=False)
    else:
      out[k] = v
  return out


@contextlib.contextmanager
def output_file(path: str, binary: bool = False) -> Iterator[IO]:
  """A file to write `path` through: a temporary file beside it that replaces `path` only when the block ends
  without an error (an existing output stays as it was otherwise)."""
  with paths.staged(os.path.dirname(os.path.abspath(path))) as folder:
    final = os.path.join(folder, os.path.basename(path))
    tmp = f"{final}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as f:
        yield f
      os.replace(tmp, final)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def write_rows(path: str, rows: Sequence[dict[str, Any]], predictions: Sequence[dict[str, Any]]) -> None:
  """Each input row with its prediction fields added (a prediction field replaces an input field of that name)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".jsonl", ".tsv"):
    raise UserError(f"output {path}: unknown file type {ext!r}; use .jsonl or .tsv")
  with output_file(path) as f:
    if ext == ".jsonl":
      f.writelines(json.dumps({**r, **p}, ensure_ascii=False) + "\n" for r, p in zip(rows, predictions))
    else:
      merged = [{**r, **flat_row(p)} for r, p in zip(rows, predictions)]
      cols = list(dict.fromkeys(k for m in merged for k in m))
      f.write("\t".join(cols) + "\n")
      f.writelines("\t".join(_cell(m.get(c, "")) for c in cols) + "\n" for m in merged)


def _cell(v: Any) -> str:
  s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else \
      "" if v is None else str(v)
  return s.replace("\t", " ").replace("\n", " ")


def read_input(input_path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """`read_rows` of a prediction input, refusing one without rows (checked before any model is loaded)."""
  rows, cols = read_rows(input_path)
  if not rows:
    raise UserError(f"input file {input_path} has no rows (only a header?); give at least one text")
  return rows, cols


def predict_file(predictor: Predictor, input_path: str, output_path: str, text_field: str | None = None,
                 text_pair_field: str | None = None, progress: bool = True,
                 rows: tuple[list[dict[str, Any]], list[str]] | None = None) -> int:
  """Predict every row of `input_path` (or its already read `rows`) into `output_path`; returns the row count.
  An embedding model may write `.npy`: its embeddings as one float32 array [N, D] in input order."""
  rows, cols = rows or read_input(input_path)
  npy = os.path.splitext(output_path)[1].lower() == ".npy"
  if npy and (predictor.head != EMBEDDING_HEAD or text_pair_field):
    raise UserError(f"output {output_path}: .npy holds the embeddings of single texts (a {EMBEDDING_HEAD} model, "
                    f"no --text_pair_field); this is {predictor.head}: write .jsonl or .tsv")
  qa = predictor.head == "question_answering"
  tf = pick_field(cols, text_field, ("question",) if qa else ("text", "sentence"), input_path, "--text_field")
  pf = (pick_field(cols, text_pair_field, ("context",) if qa else (), input_path, "--text_pair_field")
        if qa or text_pair_field else None)
  for n, r in enumerate(rows, 1):
    for f in (tf, pf) if pf else (tf,):
      if f not in r:
        raise UserError(f"{input_path}: row {n} has no field {f!r}")
  bar = progress_bar(len(rows)) if progress else None
  try:
    if npy:
      embeddings = predictor.embed([r[tf] for r in rows], progress=bar)
    else:
      preds = predictor([r[tf] for r in rows], [r[pf] for r in rows] if pf else None, progress=bar)
  finally:
    if bar is not None:
      bar.close()
  if npy:
    with output_file(output_path, binary=True) as f:
      np.save(f, embeddings)
  else:
    write_rows(output_path, rows, preds)
  return len(rows)


def progress_bar(total: int, desc: str = "predict"):
  return tqdm(total=total, unit="row", desc=desc, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
