"""LoRA checkpoints <-> Hugging Face PEFT folders (`adapter_config.json` + `adapter_model.safetensors`).

Export (`to_hf --peft`): bertjax keeps `lora_A` [in, r] / `lora_B` [r, out] next to a Linear `kernel` [in, out];
peft stores `base_model.model.<module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r] (transposes), and the
fully trained head (+ pooler, `modules_to_save`) under `base_model.model.<key>`. `peft.PeftModel.from_pretrained`
puts them onto the transformers model of the base folder the run started from (`init_from_hf`). Houlsby adapters
have no peft type for BERT, so adapter checkpoints are not exported (one line says so).
Import (`from_hf --peft`): a peft LoRA folder on an HF base -> a bertjax PEFT checkpoint referencing that base.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from bertjax.artifacts import checkpoint, factory, load, weights
from bertjax.artifacts.mapping import AUTO_CLASS, hf_key, to_hf_state
from bertjax.convert import verify as parity
from bertjax.errors import UserError
from bertjax.peft import core

TASK_TYPE = {"sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS",
             "question_answering": "QUESTION_ANS"}
HEAD_OF_TASK = {v: k for k, v in TASK_TYPE.items()}
PREFIX = "base_model.model."
Log = Callable[[str], None]


def _dotted(path: str) -> str:
  return path.replace("/", ".")


def adapter_state(trained: dict, meta: dict) -> tuple[dict[str, np.ndarray], list[str]]:
  """peft state dict of a LoRA checkpoint's trained leaves, and its `modules_to_save` module names."""
  lora = [tuple(int(x) if x.isdigit() else x for x in m.split("/")) for m in meta["peft"]["lora_modules"]]
  state = {}
  for mod in lora:
    pair = core._get(trained, mod)
    name = PREFIX + ".".join(str(p) for p in mod)
    state[name + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(pair["lora_A"]).T)
    state[name + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(pair["lora_B"]).T)
  rest = core.select(trained, lambda p: p[-1] not in core.LORA_LEAVES)
  state.update({PREFIX + k: v for k, v in to_hf_state(rest).items()})
  saved = sorted({hf_key(p).rsplit(".", 1)[0] for p, _ in core.leaves(rest)})
  return state, saved


def adapter_config(meta: dict, base: str, saved: list[str]) -> dict:
  p = meta["peft"]
  return {"peft_type": "LORA", "task_type": TASK_TYPE[meta["head"]], "base_model_name_or_path": base,
          "r": int(p["rank"]), "lora_alpha": float(p["alpha"]), "lora_dropout": 0.0, "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
          "inference_mode": True, "target_modules": [_dotted(m) for m in p["lora_modules"]],
          "modules_to_save": saved, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
          "layers_pattern": None, "revision": None}


def check_exportable(meta: dict, step_dir: str) -> str:
  """The HF base folder of a LoRA checkpoint; one UserError line for anything peft cannot load."""
  p = meta.get("peft") or {}
  if not p:
    raise UserError(f"checkpoint {step_dir} is not a PEFT checkpoint (peft.method=none); export it without --peft")
  if p["method"] == "adapter":
    raise UserError(f"checkpoint {step_dir} holds Houlsby adapters, which HF peft has no type for on BERT (and "
                    "which cannot be merged into BERT's weights); they load only in bertjax, from the workdir")
  if meta.get("head") not in TASK_TYPE:
    raise UserError(f"checkpoint {step_dir} has head={meta.get('head')!r}; --peft exports "
                    f"{', '.join(TASK_TYPE)} (export the merged model without --peft)")
  base = (p.get("base") or {}).get("init_from_hf")
  if not base:
    where = (p.get("base") or {}).get("init_checkpoint")
    raise UserError(f"checkpoint {step_dir} was trained on a bertjax base ({where}); --peft needs an HF base folder: "
                    "export the merged model without --peft")
  return base


def write(out_dir: str, trained: dict, meta: dict, step_dir: str, log: Log) -> str:
  """Write adapter_config.json + adapter_model.safetensors into `out_dir`; returns the base folder."""
  base = check_exportable(meta, step_dir)
  state, saved = adapter_state(trained, meta)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(adapter_config(meta, base, saved), f, indent=2)
  save_file({k: v.astype(np.float32) for k, v in state.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  log(f"wrote {len(state)} tensors as an HF peft LoRA adapter (r={meta['peft']['rank']}, modules_to_save "
      f"{', '.join(saved)}) for base {base}")
  return base


def load_peft_model(folder: str, base: str, head: str, num_labels: int | None):
  """transformers model of `base` with the peft adapter folder applied (float32, eval)."""
  import peft  # optional [hf] extra, imported only where used
  import transformers  # optional [hf] extra, imported only where used
  transformers.utils.logging.set_verbosity_error()
  kw = {"num_labels": num_labels} if num_labels else {}
  model = getattr(transformers, AUTO_CLASS[head]).from_pretrained(base, **kw)
  return peft.PeftModel.from_pretrained(model, folder).float().eval()


def verify(folder: str, base: str, meta: dict, merged: dict, atol: float) -> dict[str, float]:
  """Max abs diff of the head outputs: bertjax (merged params) vs peft on transformers (unmerged LoRA)."""
  import torch  # optional [hf] extra, imported only where used

  head = meta["head"]
  n = factory.num_labels(merged, head)
  cfg = factory.config_from_meta(meta, dtype="float32")
  batch = parity.fixed_batch(cfg)
  ours = parity.bertjax_outputs(factory.build_model(cfg, head, n, merged), head, batch)
  model = load_peft_model(folder, base, head, n)
  with torch.no_grad():
    full = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()})
  names = parity.HEAD_OUTPUTS[head]
  theirs = {k: getattr(full, k).numpy() for k in names}
  diffs = parity.max_abs_diffs({k: ours[k] for k in names}, theirs, batch["attention_mask"], parity.token_level(head))
  bad = {k: v for k, v in diffs.items() if not v <= atol}
  if bad:
    raise parity.ParityError("peft output differs from bertjax beyond --atol="
                             f"{atol:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()))
  return diffs


def import_folder(adapter_dir: str, base: str, out_dir: str, log: Log) -> tuple[dict, dict]:
  """A peft LoRA folder on HF `base` -> (trained leaves, meta) of a bertjax PEFT checkpoint."""
  cfg_file = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.isfile(cfg_file):
    raise UserError(f"--peft={adapter_dir} has no adapter_config.json; pass a folder written by peft's save_pretrained")
  with open(cfg_file) as f:
    pc = json.load(f)
  unsupported = {k: pc.get(k) for k in ("fan_in_fan_out", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                                        "layers_to_transform") if pc.get(k)}
  if pc.get("peft_type") != "LORA" or unsupported or pc.get("task_type") not in HEAD_OF_TASK:
    raise UserError(f"{cfg_file}: bertjax imports plain LoRA for {', '.join(HEAD_OF_TASK)} "
                    f"(got peft_type={pc.get('peft_type')}, task_type={pc.get('task_type')}, {unsupported or ''})")
  head = HEAD_OF_TASK[pc["task_type"]]
  state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  lora = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})
  rest = {k[len(PREFIX):]: v for k, v in state.items() if ".lora_" not in k}
  n = int(rest["classifier.weight"].shape[0]) if "classifier.weight" in rest else None
  bcfg, bstate, _ = weights.load_pretrained(base)
  rank = int(pc["r"])
  p_meta = {"method": "lora", "rank": rank, "alpha": float(pc["lora_alpha"]), "dropout": 0.0,
            "target_modules": ["^" + m.replace(".", "/") + "$" for m in lora],
            "modules_to_save": ["^" + k.rsplit(".", 1)[0].replace(".", "/") + "/" for k in rest]}
  template = factory.abstract_params(bcfg, head, n)
  full, _ = weights.init_params(template, {**bstate, **rest}, head)
  split = core.Split(load.peft_config(p_meta), template, head)
  frozen = core.select(full, lambda p: p not in split.trained)
  trained = core.select(full, lambda p: p in split.trained)
  for mod in split.lora:
    key = PREFIX + ".".join(str(x) for x in mod)
    node = core._node(trained, mod)
    node["lora_A"] = np.asarray(state[key + ".lora_A.weight"], np.float32).T
    node["lora_B"] = np.asarray(state[key + ".lora_B.weight"], np.float32).T
  p_meta.update(lora_modules=[core.path_str(m) for m in split.lora],
                base={"init_from_hf": os.path.abspath(base) if os.path.exists(base) else base, "seed": 0,
                      "fingerprint": core.fingerprint(frozen)})
  meta = checkpoint.model_meta(bcfg, head, num_labels=n, source=adapter_dir, peft=p_meta)
  log(f"imported {len(lora)} LoRA pairs (r={rank}) and {len(rest)} head tensors from {adapter_dir} onto {base}")
  return trained, meta
