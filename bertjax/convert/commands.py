"""`from_hf` and `to_hf`: whole-folder conversions, written atomically (temp dir next to `out`, then rename)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
from safetensors.numpy import save_file

from bertjax import paths
from bertjax.artifacts import checkpoint, factory, hf_io, load, st_format, weights, workdir
from bertjax.artifacts.mapping import HF_ARCHITECTURE, to_hf_state
from bertjax.convert import peft_hf, verify as parity
from bertjax.errors import UserError
from bertjax.models.bert import BertConfig
from bertjax.models.heads import POOLING

HEAD_CHOICES = ("auto", *HF_ARCHITECTURE)
EMBEDDING = "sentence_embedding"
FORMATS = ("transformers", "sentence-transformers")
NOT_HF_FIELDS = ("dtype", "heads_per_layer", *factory.COMPUTE_FIELDS)  # not transformers' architecture
Log = Callable[[str], None]


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool) -> Iterator[str]:
  """Yield a temp folder that replaces `out` only if the block succeeds; refuse a non-empty `out`."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} is a file; pass a folder path")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out={out} is not empty; pass --overwrite to replace it, or choose another folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)
  try:
    yield tmp
    if os.path.exists(out):
      old = tmp + ".old"
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _refuse_inside(out: str, src: str, what: str) -> None:
  """Replacing `out` must not delete the input."""
  out, src = os.path.realpath(os.path.abspath(out)), os.path.realpath(src)
  if os.path.commonpath([out, src]) == out:
    raise UserError(f"--out={out} contains the {what} {src}; write to another folder")


def _num_labels(hf_cfg: dict, state: dict, requested: int | None) -> tuple[int, list[str] | None]:
  """--num_labels, else the source's id2label / num_labels / classifier rows, else 2; plus label names."""
  id2label = hf_cfg.get("id2label") or {}
  names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
  if names and all(n == f"LABEL_{i}" for i, n in enumerate(names)):
    names = None
  rows = next((np.shape(v)[0] for k, v in state.items() if k.endswith("classifier.weight")), None)
  n = requested or rows or (len(id2label) if id2label else None) or hf_cfg.get("num_labels") or 2
  if names and len(names) != n:
    names = None
  return int(n), names


def _check_vocab(info: dict, cfg: BertConfig, log: Log) -> None:
  if info["vocab_size"] > cfg.vocab_size:
    log(f"WARNING: the tokenizer has {info['vocab_size']} tokens but the model vocab_size is {cfg.vocab_size}; "
        "ids past the embedding table would be out of range")


def from_hf(src: str, out: str, head: str = "auto", num_labels: int | None = None, overwrite: bool = False,
            seed: int = 0, log: Log = print) -> str:
  """HF BERT folder/hub name -> bertjax workdir `out` (checkpoints/0 + tokenizer/). Returns the step dir."""
  if head not in HEAD_CHOICES:
    raise UserError(f"--head={head} is unknown; choose one of {', '.join(HEAD_CHOICES)}")
  if num_labels is not None and num_labels < 1:
    raise UserError(f"--num_labels={num_labels} must be >= 1")
  if num_labels is not None and head not in ("auto", *factory.CLASSIFIER_HEADS):
    raise UserError(f"--num_labels applies to --head=sequence_classification or token_classification, not {head}")
  with atomic_dir(out, overwrite) as tmp:
    folder = hf_io.resolve_source(src)
    _refuse_inside(out, folder, "source")
    try:
      st = st_format.read_pooling(folder) if head in ("auto", EMBEDDING) else None
    except UserError as e:
      if head != "auto":
        raise
      raise UserError(f"{e}; to import the encoder alone pass another --head (e.g. pretraining)") from None
    folder = st["transformer_dir"] if st else folder
    hf_cfg = hf_io.read_hf_config(folder)
    state, weights_file = hf_io.read_weights(folder)
    cfg = hf_io.bert_config(hf_cfg, os.path.join(folder, hf_io.CONFIG_FILE))
    log(f"read {len(state)} tensors from {os.path.join(folder, weights_file)}")
    if head == "auto" and st:
      head = EMBEDDING
      log(f"head: {head} (auto, from {st_format.MODULES_FILE})")
    elif head == "auto":
      head = weights.detect_head(hf_cfg, state)
      why = f"architectures {hf_cfg['architectures']}" if hf_cfg.get("architectures") else "the keys present"
      log(f"head: {head} (auto, from {why})")
    if num_labels is not None and head not in factory.CLASSIFIER_HEADS:
      raise UserError(f"--num_labels needs a classification head but the source is {head}; pass "
                      "--head=sequence_classification or --head=token_classification")
    n, names = _num_labels(hf_cfg, state, num_labels) if head in factory.CLASSIFIER_HEADS else (None, None)
    params, report = weights.init_params(factory.abstract_params(cfg, head, n), state, head, seed=seed,
                                    initializer_range=cfg.initializer_range)
    for line in report.lines():
      log(line)
    extra: dict[str, Any] = {"num_labels": n, "source": src, "fresh": report.fresh}
    if names:
      extra["label_names"] = names
    if head == EMBEDDING:
      extra.update(_embedding_meta(st, folder, log))
    tok_dir = os.path.join(tmp, "tokenizer")
    if hf_io.has_tokenizer(folder):
      info = hf_io.export_tokenizer(folder, tok_dir, cfg.max_position_embeddings)
      extra["do_lower_case"] = info["do_lower_case"]
      built = f"; built {', '.join(info['built'])}" if info["built"] else ""
      log(f"tokenizer: copied {', '.join(info['files'])}{built} (do_lower_case={info['do_lower_case']})")
      _check_vocab(info, cfg, log)
    else:
      log(f"WARNING: no vocab.txt/tokenizer.json in {folder}; {out}/tokenizer not written")
    checkpoint.save_params(tmp, 0, params, checkpoint.model_meta(cfg, head, **extra))
  step_dir = os.path.join(os.path.abspath(out), checkpoint.CHECKPOINT_SUBDIR, "0")
  log(f"wrote {step_dir}")
  return step_dir


def _embedding_meta(st: dict | None, folder: str, log: Log) -> dict[str, Any]:
  """Pooling, normalisation and max_seq_length of a sentence-transformers folder; mean pooling without
  normalisation for a plain transformers folder."""
  if st is None:
    log(f"pooling: mean, not normalized (no {st_format.MODULES_FILE} in {folder})")
    return {"pooling": "mean", "normalize": False}
  log(f"pooling: {st['pooling']}, {'normalized' if st['normalize'] else 'not normalized'}, max_seq_length "
      f"{st['max_seq_length']} (sentence-transformers modules)")
  meta = {"pooling": st["pooling"], "normalize": st["normalize"]}
  return {**meta, "max_seq_length": st["max_seq_length"]} if st["max_seq_length"] else meta


def from_hf_peft(adapter_dir: str, base: str, out: str, overwrite: bool = False, log: Log = print) -> str:
  """HF peft LoRA folder + its HF base -> bertjax workdir `out` holding a PEFT checkpoint (step 0) that references
  the base, plus the base's tokenizer. Returns the step dir."""
  with atomic_dir(out, overwrite) as tmp:
    folder = hf_io.resolve_source(base)
    trained, meta = peft_hf.import_folder(adapter_dir, folder, tmp, log)
    if hf_io.has_tokenizer(folder):
      hf_io.export_tokenizer(folder, os.path.join(tmp, "tokenizer"), meta["model_config"]["max_position_embeddings"])
    checkpoint.save_params(tmp, 0, trained, meta)
  step_dir = os.path.join(os.path.abspath(out), checkpoint.CHECKPOINT_SUBDIR, "0")
  log(f"wrote {step_dir}")
  return step_dir


def _workdir_tokenizer(step_dir: str) -> str:
  """`<workdir>/tokenizer` for `<workdir>/checkpoints/<step>` and for `<workdir>/best/checkpoints/<step>`."""
  root = os.path.dirname(os.path.dirname(step_dir))
  tok = paths.join(root, "tokenizer")
  if not paths.isdir(tok) and os.path.basename(root) == "best":
    tok = paths.join(os.path.dirname(root), "tokenizer")
  return tok


def hf_config(cfg: BertConfig, head: str, num_labels: int | None, label_names: list[str] | None,
              problem_type: str | None = None) -> dict:
  """transformers `config.json` for `cfg` and `head`."""
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_HF_FIELDS}
  out: dict[str, Any] = {"architectures": [HF_ARCHITECTURE[head]], "model_type": "bert", **fields,
                         "position_embedding_type": "absolute", "classifier_dropout": None, "is_decoder": False,
                         "add_cross_attention": False, "use_cache": True, "tie_word_embeddings": True,
                         "dtype": "float32"}
  if head in factory.CLASSIFIER_HEADS:
    names = label_names if label_names and len(label_names) == num_labels else [
        f"LABEL_{i}" for i in range(num_labels or 2)]
    out["id2label"] = {str(i): n for i, n in enumerate(names)}
    out["label2id"] = {n: i for i, n in enumerate(names)}
    if num_labels == 1 or problem_type:
      out["problem_type"] = problem_type or "regression"  # multi-label: pipelines then apply a sigmoid
  return out


def _export_tokenizer(step_dir: str, out: str, cfg: BertConfig, log: Log) -> dict | None:
  """The run's tokenizer files into `out`; their `export_tokenizer` info, None (and a warning) without any."""
  tok_src = _workdir_tokenizer(step_dir)
  info = None
  if paths.isdir(tok_src):
    with paths.staged_read(tok_src) as local:  # a gs:// workdir's tokenizer is read from a local copy
      if hf_io.has_tokenizer(local):
        info = hf_io.export_tokenizer(local, out, cfg.max_position_embeddings)
  if info:
    log(f"tokenizer from {tok_src}: {', '.join(info['files'] + info['built'])} "
        f"(do_lower_case={info['do_lower_case']})")
    _check_vocab(info, cfg, log)
  else:
    log(f"WARNING: no tokenizer in {tok_src}; the folder has no tokenizer files")
  return info


def _to_hf_peft(step_dir: str, tmp: str, verify: bool | None, atol: float, log: Log) -> dict[str, float]:
  """A LoRA checkpoint -> HF peft adapter folder (+ tokenizer), checked against peft on transformers."""
  trained, meta = load.load_params(step_dir, merge=False)
  peft_hf.check_exportable(meta, step_dir)
  merged = load.merged(trained, meta, step_dir)  # also checks that the base is still the one trained on
  base = peft_hf.write(tmp, trained, meta, step_dir, log)
  _export_tokenizer(step_dir, tmp, factory.config_from_meta(meta, dtype="float32"), log)
  if verify is False or (verify is None and not parity.torch_available()):
    log("parity check skipped" + ("" if verify is False else " (torch/transformers not installed)"))
    return {}
  diffs = peft_hf.verify(tmp, base, meta, merged, atol)
  log("parity vs peft on transformers (max abs diff): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
      + f" <= atol {atol:g}")
  return diffs


def to_hf(checkpoint_path: str, out: str, verify: bool | None = None, atol: float = 1e-4,
          overwrite: bool = False, log: Log = print, peft: bool = False, fmt: str | None = None) -> dict[str, float]:
  """bertjax checkpoint -> HF folder (config.json, model.safetensors, tokenizer). Returns the parity diffs.

  verify: None = check parity when torch + transformers (+ sentence-transformers) import, True = require it,
  False = skip.
  peft: a LoRA checkpoint as an HF peft adapter folder instead (without it LoRA is exported merged).
  fmt: "transformers" or "sentence-transformers"; None = the checkpoint's own, sentence-transformers for a
  sentence_embedding checkpoint (a transformers folder alone has no place for its pooling), else transformers.
  """
  if fmt not in (None, *FORMATS):
    raise UserError(f"--format={fmt} is unknown; choose one of {', '.join(FORMATS)}")
  if peft and fmt == "sentence-transformers":
    raise UserError("--peft writes an HF peft adapter folder, which has no sentence-transformers layout; drop --peft "
                    "to export the merged model")
  if verify and not parity.torch_available():
    raise UserError("--verify needs torch and transformers; pip install 'bertjax[hf]' or pass --no-verify")
  with atomic_dir(out, overwrite) as tmp:
    step_dir = checkpoint.resolve_step_dir(checkpoint_path)
    _refuse_inside(out, step_dir, "checkpoint")
    if peft:
      diffs = _to_hf_peft(step_dir, tmp, verify, atol, log)
    else:
      diffs = _to_hf_full(step_dir, tmp, verify, atol, log, fmt)
  log(f"wrote {os.path.abspath(out)}")
  return diffs


def full_shape(params: dict, cfg: BertConfig, kept_heads: list | None) -> tuple[dict, BertConfig]:
  """A pruned model (`cfg.heads_per_layer`) at full shape: each kept head back at its original index
  (`kept_heads`, else the first slots) and the removed heads' query / key / value columns and attention-output
  rows zero. A zero head adds nothing: its values are 0 whatever its (uniform) attention, and so are its output
  rows. An unpruned model is returned as it is."""
  if cfg.heads_per_layer is None:
    return params, cfg
  out = copy.deepcopy(params)
  bert = out["bert"] if "bert" in out else out
  for i, n in enumerate(cfg.heads_per_layer):
    slots = kept_heads[i] if kept_heads else list(range(n))
    cols = cfg.head_columns(slots)
    att = bert["encoder"]["layer"][i]["attention"]
    for name in ("query", "key", "value"):
      kernel = np.zeros((cfg.hidden_size, cfg.hidden_size), np.float32)
      kernel[:, cols] = att["self"][name]["kernel"]
      bias = np.zeros(cfg.hidden_size, np.float32)
      bias[cols] = att["self"][name]["bias"]
      att["self"][name] = {"kernel": kernel, "bias": bias}
    kernel = np.zeros((cfg.hidden_size, cfg.hidden_size), np.float32)
    kernel[cols, :] = att["output"]["dense"]["kernel"]
    att["output"]["dense"]["kernel"] = kernel
  return out, dataclasses.replace(cfg, heads_per_layer=None)


def _pick_format(fmt: str | None, head: str, step_dir: str) -> str:
  if fmt is None:
    return "sentence-transformers" if head == EMBEDDING else "transformers"
  if fmt == "sentence-transformers" and head != EMBEDDING:
    raise UserError(f"--format=sentence-transformers exports sentence embedding checkpoints (head {EMBEDDING}) but "
                    f"{step_dir} has head {head!r}; drop --format")
  if fmt == "transformers" and head == EMBEDDING:
    raise UserError(f"{step_dir} is a sentence embedding model, whose pooling a transformers folder cannot hold; "
                    "drop --format=transformers (the sentence-transformers folder loads in transformers' AutoModel "
                    "too)")
  return fmt


def _to_hf_full(step_dir: str, tmp: str, verify: bool | None, atol: float, log: Log,
                fmt: str | None = None) -> dict[str, float]:
  """The whole model (LoRA merged) as a transformers folder, checked against transformers; a sentence embedding
  model as a sentence-transformers folder, checked against sentence-transformers."""
  if (checkpoint.read_meta(step_dir).get("peft") or {}).get("method") == "adapter":  # before reading the base
    raise UserError(f"checkpoint {step_dir} holds Houlsby adapters, which cannot be merged into BERT's weights "
                    "and have no HF peft type; they load only in bertjax, from the workdir")
  params, meta = load.load_params(step_dir)
  head = meta.get("head")
  if head not in HF_ARCHITECTURE:
    raise UserError(f"checkpoint {step_dir} has head={head!r}; to_hf exports {', '.join(HF_ARCHITECTURE)}")
  if not isinstance(meta.get("model_config"), dict):
    raise UserError(f"checkpoint {step_dir} has no model_config in its meta; it was not written by bertjax")
  fmt = _pick_format(fmt, head, step_dir)
  cfg = factory.config_from_meta(meta, dtype="float32")
  full_params, full_cfg = full_shape(params, cfg, (meta.get("pruning") or {}).get("kept_heads"))
  if full_cfg is not cfg:
    log(f"pruned model ({list(cfg.heads_per_layer)} heads per layer): exported at full shape with the removed "
        "heads' weights zeroed (transformers 5 has no pruned_heads)")
  if fmt == "sentence-transformers":
    return _to_sentence_transformers(step_dir, tmp, params, meta, cfg, full_params, full_cfg, verify, atol, log)
  num_labels = None
  if head in factory.CLASSIFIER_HEADS:
    num_labels = int(np.shape(params["classifier"]["kernel"])[1])
    if meta.get("num_labels") not in (None, num_labels):
      log(f"WARNING: meta num_labels={meta['num_labels']} but the classifier has {num_labels} outputs; using "
          f"{num_labels}")
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_config(full_cfg, head, num_labels, meta.get("label_names"), meta.get("problem_type")), f, indent=2)
  state = to_hf_state(full_params)
  save_file({k: v.astype(np.float32) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"})
  log(f"wrote {len(state)} tensors as {HF_ARCHITECTURE[head]} from {step_dir}")
  _export_tokenizer(step_dir, tmp, cfg, log)
  diffs: dict[str, float] = {}
  if verify is False or (verify is None and not parity.torch_available()):
    log("parity check skipped" + ("" if verify is False else " (torch/transformers not installed)"))
  else:
    diffs = parity.verify_folder(tmp, cfg, head, params, num_labels, atol)
    log("parity vs transformers (max abs diff): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        + f" <= atol {atol:g}")
  return diffs


def _embedding_settings(meta: dict, step_dir: str, cfg: BertConfig, log: Log) -> tuple[str, bool, int]:
  """(pooling, normalize, max_seq_length) of a sentence embedding checkpoint: pooling and normalisation from its
  meta, max_seq_length from its run's data.max_seq_length, else the meta's (an import), else the position table."""
  pooling, normalize = meta.get("pooling"), bool(meta.get("normalize", False))
  if pooling is None:
    pooling = "mean"
    log(f"WARNING: checkpoint {step_dir} does not say its pooling (meta.pooling); exporting mean pooling")
  if pooling not in POOLING:
    raise UserError(f"checkpoint {step_dir} has pooling={pooling!r}; the sentence-transformers export supports "
                    f"{', '.join(POOLING)}")
  said = workdir.training_config(workdir.workdir_of(step_dir)).get("max_seq_length") or meta.get("max_seq_length")
  return pooling, normalize, min(int(said or cfg.max_position_embeddings), cfg.max_position_embeddings)


def bert_model_state(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
  """transformers `BertModel` keys (no `bert.` prefix) of an encoder without a pooler, plus a zero pooler:
  transformers' BertModel always builds one and would report it missing (initialised at random) on every load.
  Sentence embeddings never use it (tanh(0) = 0 as pooler_output)."""
  state = {k.removeprefix("bert."): v for k, v in to_hf_state(params).items()}
  h = cfg.hidden_size
  state.setdefault("pooler.dense.weight", np.zeros((h, h), np.float32))
  state.setdefault("pooler.dense.bias", np.zeros(h, np.float32))
  return state


def _to_sentence_transformers(step_dir: str, tmp: str, params: dict, meta: dict, cfg: BertConfig, full_params: dict,
                              full_cfg: BertConfig, verify: bool | None, atol: float, log: Log) -> dict[str, float]:
  """A sentence embedding model as a sentence-transformers folder: the encoder as a transformers BertModel folder
  at the top, then the Pooling (and Normalize) modules; checked by encoding texts with sentence-transformers."""
  if verify and not parity.st_available():
    raise UserError("--verify of a sentence embedding export needs sentence-transformers; pip install "
                    "'bertjax[hf]' or pass --no-verify")
  pooling, normalize, max_len = _embedding_settings(meta, step_dir, cfg, log)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(hf_config(full_cfg, EMBEDDING, None, None), f, indent=2)
  state = bert_model_state(full_params, full_cfg)
  save_file({k: np.asarray(v, np.float32) for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"})
  log(f"wrote {len(state)} tensors as BertModel from {step_dir} (the pooler is zero: sentence embeddings do not "
      "use it)")
  if _export_tokenizer(step_dir, tmp, cfg, log) is None:
    raise UserError(f"no tokenizer beside {step_dir}; a sentence-transformers folder needs one: put the run's "
                    "tokenizer/ folder back")
  st_format.write_modules(tmp, cfg.hidden_size, pooling, normalize, max_len)
  log(f"sentence-transformers: Transformer (max_seq_length {max_len}) -> Pooling ({pooling})"
      + (" -> Normalize" if normalize else ""))
  if verify is False or (verify is None and not parity.st_available()):
    log("parity check skipped" + ("" if verify is False else " (torch/sentence-transformers not installed)"))
    return {}
  diffs = parity.verify_sentence_transformers(tmp, cfg, params, pooling, normalize, max_len, atol)
  log(f"parity vs sentence-transformers on {len(parity.ST_TEXTS)} texts: max abs diff {diffs['max_abs_diff']:.2e} "
      f"<= atol {atol:g}, min cosine {diffs['min_cosine']:.8f} >= {parity.MIN_COSINE}")
  return diffs
