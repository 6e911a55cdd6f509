"""Helpers shared by tasks: the model config from `config.model` (or a pretrained checkpoint), checks, caches, and
the prediction rows of the fine-tuning tasks."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import uuid
import zipfile
from typing import Any, Callable, Mapping

import jax
import numpy as np
from ml_collections import ConfigDict

from bertjax.artifacts.factory import pretrained_model_config, pretrained_tokenizer_dir
from bertjax.data import corpus, loader, tokenizer as toklib
from bertjax.data.glue import MODEL_KEYS  # noqa: F401  (the encoder inputs; re-exported for the tasks)
from bertjax.errors import UserError
from bertjax.models import attention
from bertjax.models.bert import RUNTIME_FIELDS, BertConfig

_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps",
                "initializer_range")
_RUN_FIELDS = RUNTIME_FIELDS  # taken from config.model, never from a checkpoint (the trainer uses it on resume)
MIN_SEQ_LENGTH = 8  # fine-tuning
MIN_PRETRAINING_SEQ_LENGTH = 16  # see check_seq_length


def check_seq_length(config: ConfigDict) -> None:
  """Fail fast when max_seq_length exceeds the position table the config asks for."""
  mpe = config.model.get("max_position_embeddings")
  if mpe and config.data.max_seq_length > mpe:
    raise UserError(f"data.max_seq_length={config.data.max_seq_length} exceeds the model's position table "
                    f"(model.max_position_embeddings={mpe}); lower max_seq_length or raise the table")
  # Pretraining pairs spend 3 positions on [CLS]/[SEP]/[SEP] and mask 15% of the rest: at 16 tokens that is 13
  # text tokens in two segments and 2 masked ones, the least that still teaches MLM and NSP anything; below it
  # most pairs are cut to a word or two per segment. A fine-tuning input ([CLS] text [SEP]) can be shorter.
  least = MIN_PRETRAINING_SEQ_LENGTH if config.get("task") == "pretraining" else MIN_SEQ_LENGTH
  if config.data.max_seq_length < least:
    raise UserError(f"data.max_seq_length={config.data.max_seq_length} is too short for {config.get('task') or 'this'} "
                    f"task; use at least {least}")


def check_config(config: ConfigDict) -> None:
  """Cheap static checks of `config.model` / `config.data` / `config.training` / `config.optimizer` before any data
  is loaded (and before anything is written to the workdir)."""
  check_seq_length(config)
  t, o = config.training, config.optimizer
  if config.model.get("dtype") == "float16" and not t.get("eval_only"):  # inference in float16 is fine
    raise UserError("model.dtype=float16 is not supported for training (there is no loss scaling, so small "
                    "gradients underflow to 0); use model.dtype=bfloat16")
  for name in ("global_batch_size", "eval_batch_size"):
    if int(t[name]) < 1:
      raise UserError(f"training.{name}={t[name]} must be a positive number of examples")
  if not float(o.learning_rate) > 0:  # also catches NaN
    raise UserError(f"optimizer.learning_rate={o.learning_rate} must be positive (e.g. 1e-4)")
  if not (config.get("init_checkpoint") or config.get("init_from_hf")):
    model_config(config, vocab_size=1)  # raises on e.g. a hidden size the head count does not divide


def model_config(config: ConfigDict, vocab_size: int, tokenizer: Any = None) -> BertConfig:
  """BertConfig from a pretrained source (`init_from_hf` / `init_checkpoint`) or the preset + overrides."""
  m = config.model
  run = {k: m[k] for k in _RUN_FIELDS if m.get(k) is not None}
  pretrained = pretrained_model_config(config)
  if pretrained is not None:
    cfg = BertConfig(**{**pretrained, **run})
  else:
    arch = {k: m[k] for k in _ARCH_FIELDS if m.get(k) is not None}
    if m.get("preset"):
      cfg = BertConfig.from_preset(m.preset, vocab_size=vocab_size, **arch, **run)
    else:
      cfg = BertConfig(vocab_size=vocab_size, **arch, **run)
  if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
    raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                    f"{cfg.vocab_size}; use the checkpoint's own tokenizer")
  if config.data.max_seq_length > cfg.max_position_embeddings:
    raise UserError(f"data.max_seq_length={config.data.max_seq_length} exceeds the model's position table "
                    f"(max_position_embeddings={cfg.max_position_embeddings}); lower data.max_seq_length")
  # a fused kernel that cannot run here fails now, before anything is written
  attention.choose(cfg.attention, dtype=cfg.compute_dtype, dropout=cfg.attention_probs_dropout_prob,
                   seq_len=config.data.max_seq_length, head_dim=cfg.hidden_size // cfg.num_attention_heads)
  return cfg


def cached_arrays(cache_dir: str, kind: str, key: str, build: Callable[[], dict]) -> dict[str, np.ndarray]:
  """`build()` once per key, kept as `<cache_dir>/<kind>/<hash>.npz`.

  Written to a temporary file of this process and renamed, so a crash never leaves a half-written cache; a file
  that is not a readable `.npz` (truncated, corrupt, overwritten by something else) is rebuilt with a warning,
  and an unwritable cache only warns.
  """
  path = os.path.join(cache_dir, kind, hashlib.sha256(key.encode()).hexdigest()[:16] + ".npz")
  if os.path.exists(path):
    try:
      z = np.load(path)  # allow_pickle=False: a pickle raises ValueError
      if not isinstance(z, np.lib.npyio.NpzFile):  # e.g. a bare .npy array
        raise ValueError(f"not an .npz archive but {type(z).__name__}")
      with z:
        return {k: z[k] for k in z.files}  # reads every member: a bad CRC or a short member raises here
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      logging.warning("rebuilding unreadable cache file %s (%s)", path, e)
  out = build()
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npz"  # unique across processes and hosts
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(tmp, **out)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("could not cache features in %s (%s)", path, e)
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


def cache_dir_of(config: ConfigDict) -> str:
  return config.data.get("cache_dir") or corpus.default_cache_dir()


def file_key(path: str) -> str:
  """Cache-key part naming one file's exact contents cheaply (path, mtime, size)."""
  st = os.stat(path)
  return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}"


def packer(config: ConfigDict, examples: Mapping[str, np.ndarray], global_batch: int, token_keys=MODEL_KEYS,
           fill: Mapping[str, int] | None = None) -> loader.Packer | None:
  """`data.packing` (on by default for fine-tuning): several examples per row (`loader.Packer`: each example keeps
  its own positions and attends only to itself), rows in multiples of the local devices and of an eighth of the
  local batch, so that few row counts compile. None when off, or with gradient accumulation (whose micro-batches
  split example rows; length buckets are used instead)."""
  if not config.data.get("packing", False):
    return None
  if int(config.training.get("grad_accum_steps", 1)) > 1:
    logging.info("data.packing with training.grad_accum_steps > 1: packing off, length buckets instead")
    return None
  rows = math.lcm(jax.local_device_count(), max(1, global_batch // jax.process_count() // 8))
  return loader.Packer(examples, rows, token_keys=token_keys, fill=fill)


def valid_rows(outputs: list[Mapping[str, np.ndarray]], width: int = 0) -> dict[str, np.ndarray]:
  """Concatenate predict outputs and drop the eval padding rows (`example_weights == 0`); per-token outputs of
  length-bucketed batches are padded back to `width` (the padded length) columns."""
  if not outputs:
    return {}
  cat = {k: np.concatenate(_same_width([np.asarray(o[k]) for o in outputs], width)) for k in outputs[0]}
  keep = cat.pop("example_weights") > 0
  return {k: v[keep] for k, v in cat.items()}


def _same_width(arrays: list[np.ndarray], width: int = 0) -> list[np.ndarray]:
  """Per-token outputs of length-bucketed batches padded back to one width, at least `width` (floats with -1e9,
  like masked logits; others with 0); the padded columns are padding positions, which no postprocessing reads."""
  width = max([a.shape[1] for a in arrays if a.ndim >= 2] + [width if any(a.ndim >= 2 for a in arrays) else 0])
  if all(a.ndim < 2 or a.shape[1] == width for a in arrays):
    return arrays
  fill = lambda a: -1e9 if np.issubdtype(a.dtype, np.floating) else 0
  return [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=fill(a))
          if a.ndim >= 2 else a for a in arrays]


def load_tokenizer(config: ConfigDict, workdir: str) -> tuple[Any, str]:
  """A fine-tuning run's tokenizer: the workdir's saved one (resume), else `data.tokenizer`, else the init
  checkpoint's / HF folder's; (tokenizer, where it came from)."""
  d = config.data
  tok, src = toklib.for_run(workdir, lambda: d.get("tokenizer") or pretrained_tokenizer_dir(config),
                            bool(d.get("lowercase", True)))
  if tok is None:
    where = config.get("init_checkpoint") or config.get("init_from_hf")
    raise UserError("no tokenizer: set config.data.tokenizer (vocab.txt, tokenizer.json or HF folder)"
                    + (f"; {where} has none" if where else " or start from a pretrained model with "
                       "config.init_from_hf / config.init_checkpoint"))
  return tok, src
