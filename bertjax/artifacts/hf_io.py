"""Reading Hugging Face BERT folders (config, weights, tokenizer files) with numpy only; never runs remote code."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Any

import ml_dtypes
import numpy as np
from huggingface_hub import snapshot_download
from tokenizers import BertWordPieceTokenizer

from bertjax.errors import UserError
from bertjax.models.bert import BertConfig

CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}
# + the files that say a folder is a sentence-transformers model (its pooling and normalisation)
_HUB_CONFIG = ["config.json", "vocab.txt", "tokenizer*.json", "special_tokens_map.json", "modules.json",
               "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/config.json"]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# transformers hidden_act -> bertjax hidden_act (gelu_pytorch_tanh is the same tanh formula as gelu_new).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                  "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")


def resolve_source(name_or_path: str) -> str:
  """A local folder, or a hub model name fetched with `huggingface_hub.snapshot_download` -> local folder."""
  path = os.path.abspath(os.path.expanduser(name_or_path))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise UserError(f"{name_or_path} is a file; pass the HF model folder that holds config.json")
  if not _HUB_ID.match(name_or_path):
    raise UserError(f"{name_or_path} is neither a folder nor a Hugging Face Hub model name (org/name)")
  try:
    # safetensors first; the pickle only when a repo has no safetensors (never both, never other variants)
    folder = snapshot_download(name_or_path, allow_patterns=_HUB_CONFIG + [
        "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"])
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
      folder = snapshot_download(name_or_path, allow_patterns=_HUB_CONFIG + [
          "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"])
  except Exception as e:  # network, auth, unknown repo, offline cache miss
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(f"could not fetch {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}: {msg}); "
                    "check the name and network (or HF_HUB_OFFLINE cache), or pass a local folder") from None
  return folder


def read_config(folder: str) -> tuple[BertConfig, dict]:
  """config.json -> (bertjax BertConfig, the raw HF dict); rejects what bertjax can't represent."""
  hf = read_hf_config(folder)
  return bert_config(hf, os.path.join(folder, CONFIG_FILE)), hf


def read_hf_config(folder: str) -> dict:
  """config.json as a dict, after checking it is a BERT encoder bertjax can represent."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f"no {CONFIG_FILE} in {folder}; pass a Hugging Face BERT model folder")
  try:
    with open(path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  if model_type is None and archs and not all(str(a).startswith("Bert") for a in archs):
    model_type = str(archs[0])
  if model_type not in (None, "bert"):
    raise UserError(f"{path} has model_type={model_type!r}; bertjax converts BERT only (model_type 'bert'), "
                    "use a BERT checkpoint")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UserError(f"{path} has position_embedding_type={hf['position_embedding_type']!r}; bertjax supports "
                    "'absolute' positions only")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise UserError(f"{path} describes a BERT decoder (is_decoder/add_cross_attention); bertjax converts "
                    "bidirectional encoders only")
  act = hf.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise UserError(f"{path} has hidden_act={act!r}; bertjax supports {sorted(_ACTIVATIONS)}")
  return hf


def bert_config(hf: dict, path: str = CONFIG_FILE) -> BertConfig:
  """A checked HF config dict -> bertjax BertConfig (missing fields take transformers' defaults)."""
  fields = {k: hf[k] for k in _CONFIG_FIELDS if hf.get(k) is not None}
  try:
    return BertConfig(hidden_act=_ACTIVATIONS[hf.get("hidden_act", "gelu")], **fields)
  except UserError as e:
    raise UserError(f"{path}: {e}") from None
  except TypeError as e:
    raise UserError(f"{path} has an invalid field ({e}); fix config.json") from None


# ---------------------------------------------------------------------------------------------- weights

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors(path: str, lazy: bool = False) -> dict[str, np.ndarray]:
  """A .safetensors file -> {key: numpy array}, exact dtypes (bfloat16 via ml_dtypes), no torch needed.

  With `lazy` the arrays are read-only views of a memory map: indexing one reads only the bytes of that slice,
  so a process that places a sharded parameter reads just the part its devices hold."""
  try:
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n else b""
  except (OSError, ValueError, struct.error) as e:
    raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
  header.pop("__metadata__", None)
  out = {}
  for key, info in header.items():
    name = _ST_DTYPES.get(info["dtype"])
    if name is None:
      raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    start, end = info["data_offsets"]
    view = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    out[key] = view if lazy else view.copy()
  del data
  return out


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # optional [hf] extra, imported only where used
  except ImportError:
    raise UserError(f"{path} is a PyTorch pickle and torch is not installed; pip install 'bertjax[hf]' or "
                    "provide model.safetensors") from None
  try:
    sd = torch.load(path, weights_only=True, map_location="cpu")
  except Exception as e:
    raise UserError(f"could not load {path} with torch.load(weights_only=True) ({type(e).__name__}); "
                    "provide model.safetensors instead") from None
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise UserError(f"{path} does not hold a flat state dict of tensors; save it with save_pretrained")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}


def _shards(index: str) -> list[str]:
  with open(index) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


def read_weights(folder: str, lazy: bool = False) -> tuple[dict[str, np.ndarray], str]:
  """The state dict of `folder` (model.safetensors, sharded safetensors, or pytorch_model.bin) and its file.

  `lazy`: safetensors tensors are memory-mapped views (see `read_safetensors`); pickles are always read whole."""
  join = lambda name: os.path.join(folder, name)
  safetensors = lambda path: read_safetensors(path, lazy)
  if os.path.isfile(join("model.safetensors")):
    return safetensors(join("model.safetensors")), "model.safetensors"
  for index, reader in (("model.safetensors.index.json", safetensors),
                        ("pytorch_model.bin.index.json", _torch_load)):
    if os.path.isfile(join(index)):
      out: dict[str, np.ndarray] = {}
      for shard in _shards(join(index)):
        if not os.path.isfile(join(shard)):
          raise UserError(f"{join(index)} lists {shard}, which is missing; re-download the model")
        out.update(reader(join(shard)))
      return out, index
  if os.path.isfile(join("pytorch_model.bin")):
    return _torch_load(join("pytorch_model.bin")), "pytorch_model.bin"
  other = sorted(f for f in os.listdir(folder) if f.endswith((".h5", ".msgpack", ".onnx", ".ckpt.index")))
  found = f" (found only {', '.join(other)})" if other else ""
  raise UserError(f"no weights in {folder}{found}: expected model.safetensors, model.safetensors.index.json or "
                  "pytorch_model.bin")


# -------------------------------------------------------------------------------------------- tokenizer

def has_tokenizer(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.txt", "tokenizer.json"))


def _load_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _lowercase_in(normalizer: dict | None) -> bool | None:
  if not normalizer:
    return None
  if normalizer.get("type") == "BertNormalizer":
    return bool(normalizer.get("lowercase"))
  if normalizer.get("type") == "Lowercase":
    return True
  if normalizer.get("type") == "Sequence":
    found = [_lowercase_in(n) for n in normalizer.get("normalizers", [])]
    return any(found) if any(f is not None for f in found) else None
  return None


def do_lower_case(folder: str) -> bool:
  """tokenizer_config.json, else the tokenizer.json normalizer, else: no upper-case word in vocab.txt."""
  cfg = _load_json(os.path.join(folder, "tokenizer_config.json")) or {}
  if "do_lower_case" in cfg:
    return bool(cfg["do_lower_case"])
  found = _lowercase_in((_load_json(os.path.join(folder, "tokenizer.json")) or {}).get("normalizer"))
  if found is not None:
    return found
  with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
    return not any(w.lower() != w for w in (line.rstrip("\n") for line in f) if not w.startswith("["))


def export_tokenizer(src: str, dst: str, model_max_length: int | None = None) -> dict[str, Any]:
  """Copy a BERT WordPiece tokenizer into `dst` as vocab.txt + tokenizer.json + tokenizer_config.json +
  special_tokens_map.json, building whichever of vocab.txt / tokenizer.json is missing from the other.

  Returns {"do_lower_case": bool, "vocab_size": int, "files": [...], "built": [...]}.
  """
  if not has_tokenizer(src):
    raise UserError(f"no vocab.txt or tokenizer.json in {src}")
  os.makedirs(dst, exist_ok=True)
  copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  for f in copied:
    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
  built = []
  if "vocab.txt" not in copied:  # from tokenizer.json's WordPiece vocab
    model = (_load_json(os.path.join(dst, "tokenizer.json")) or {}).get("model", {})
    if model.get("type") != "WordPiece":
      raise UserError(f"{src}/tokenizer.json is a {model.get('type')} tokenizer, not BERT WordPiece")
    with open(os.path.join(dst, "vocab.txt"), "w", encoding="utf-8") as f:
      f.writelines(w + "\n" for w, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    built.append("vocab.txt")
  lower = do_lower_case(dst)
  if "tokenizer.json" not in copied:
    BertWordPieceTokenizer(os.path.join(dst, "vocab.txt"), lowercase=lower).save(os.path.join(dst, "tokenizer.json"))
    built.append("tokenizer.json")
  cfg = _load_json(os.path.join(dst, "tokenizer_config.json"))
  if cfg is None:
    cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, "tokenize_chinese_chars": True,
           "strip_accents": None, "clean_up_tokenization_spaces": False, **SPECIAL_TOKENS}
    built.append("tokenizer_config.json")
  cfg["do_lower_case"] = lower
  if model_max_length and not (0 < int(cfg.get("model_max_length", 0)) <= model_max_length):
    cfg["model_max_length"] = model_max_length
  with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  if "special_tokens_map.json" not in copied:
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
      json.dump(SPECIAL_TOKENS, f, indent=2)
    built.append("special_tokens_map.json")
  with open(os.path.join(dst, "vocab.txt"), encoding="utf-8") as f:
    size = sum(1 for _ in f)
  return {"do_lower_case": lower, "vocab_size": size, "files": copied, "built": built}
