"""Post-training int8 quantization with qwix: `python -m bertjax.quantize --checkpoint=... --out=DIR --mode=int8`.

qwix (Google's JAX quantization library) intercepts the model's `dot_general`s: every Linear kernel (Q/K/V,
attention output, FFN, pooler, head) becomes int8 with one absmax scale per output channel.
  --mode=int8          weight-only: int8 weights, float32 activations (smaller on disk and in memory)
  --mode=int8_dynamic  also quantizes each matmul's activations to int8 on the fly (dynamic range)
Embedding tables (gathers, not matmuls) and LayerNorms stay float32, so the file shrinks by less than 4x.

DIR holds `quantized.npz` (the quantized parameter leaves by path), `meta.json` (the checkpoint's meta plus
the mode), `tokenizer/` and `config.json` copied from the run; `bertjax.predict --checkpoint=DIR`,
`bertjax.serve --model=DIR` and `bertjax.export --checkpoint=DIR` take it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from bertjax.artifacts import checkpoint, factory, load as artifacts_load
from bertjax.artifacts.workdir import copy_run_files, find_checkpoint, workdir_of
from bertjax.deploy.cli import Parser, add_out, check_out, clear_out, prog, run_cli
from bertjax.deploy.predictor import FINETUNE_HEADS, Predictor, apply
from bertjax.errors import UserError

MODES = ("int8", "int8_dynamic")
PARAMS_FILE, META_FILE = "quantized.npz", "meta.json"


def is_quantized(path: str) -> bool:
  return os.path.isfile(os.path.join(path, PARAMS_FILE)) and os.path.isfile(os.path.join(path, META_FILE))


def _rules(mode: str):
  if mode not in MODES:
    raise UserError(f"--mode={mode!r} is unknown; choose one of {', '.join(MODES)}")
  act = jnp.int8 if mode == "int8_dynamic" else None
  return [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act)]


def quantized_model(model: Any, mode: str) -> Any:
  """`model` (NNX, float) with its matmul weights quantized by qwix PTQ (runs it once on a dummy batch)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  return qwix.quantize_model(model, qwix.PtqProvider(_rules(mode)), ids, ids, jnp.ones_like(ids))


def _leaves(state: Any) -> tuple[list[tuple[str, Any]], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  return [(jax.tree_util.keystr(p), v) for p, v in flat], treedef


def quantize(step_dir: str, out: str, mode: str) -> dict:
  """Quantize the checkpoint at `step_dir` into the folder `out`; returns sizes in bytes."""
  params, meta = artifacts_load.load_params(step_dir)
  model = factory.model_from_meta(meta, params)
  qmodel = quantized_model(model, mode)
  leaves, _ = _leaves(nnx.state(qmodel))
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, PARAMS_FILE), **{k: np.asarray(v) for k, v in leaves})
  with open(os.path.join(out, META_FILE), "w") as f:
    json.dump({**meta, "quantization": {"mode": mode, "library": f"qwix {_version()}", "source": step_dir}}, f)
  copy_run_files(workdir_of(step_dir), out)
  return {"float32_bytes": int(sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(params))),
          "quantized_bytes": int(sum(np.asarray(v).nbytes for _, v in leaves)),
          "file_bytes": os.path.getsize(os.path.join(out, PARAMS_FILE))}


def _version() -> str:
  return getattr(qwix, "__version__", "?")


def load_model(folder: str) -> tuple[Any, dict]:
  """(the quantized NNX model, meta) of a `quantize` output folder."""
  with open(os.path.join(folder, META_FILE)) as f:
    meta = json.load(f)
  mode = meta["quantization"]["mode"]
  head = meta.get("head")
  abstract = nnx.eval_shape(lambda: quantized_model(factory.model_from_meta(meta), mode))
  graphdef, state = nnx.split(abstract)
  want, treedef = _leaves(state)
  with np.load(os.path.join(folder, PARAMS_FILE)) as z:
    if sorted(z.files) != sorted(k for k, _ in want):
      raise UserError(f"{folder}/{PARAMS_FILE} does not match a {head} model quantized with mode {mode}; "
                      "quantize the checkpoint again with this bertjax")
    arrays = [jnp.asarray(z[k]) for k, _ in want]
  for (k, w), a in zip(want, arrays):
    if tuple(w.shape) != a.shape or w.dtype != a.dtype:
      raise UserError(f"{folder}/{PARAMS_FILE}: {k} is {a.dtype}{list(a.shape)}, expected {w.dtype}{list(w.shape)}")
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, arrays)), meta


def load_predictor(folder: str, **kw: Any):
  """A `Predictor` running the quantized model."""
  model, meta = load_model(folder)
  graphdef, state = nnx.split(model)
  forward = lambda a: apply(graphdef, state, a["input_ids"], a["token_type_ids"], a["attention_mask"])
  return Predictor.from_params({}, meta, folder, forward=forward, workdir=folder, **kw)


def main(argv: list[str] | None = None) -> int:
  p = Parser(prog=prog("bertjax.quantize"), description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="workdir (its best checkpoint), <workdir>/best or step folder")
  add_out(p, "the quantized model")
  p.add_argument("--mode", default="int8", help="|".join(MODES))

  def run():
    a = p.parse_args(argv)
    _rules(a.mode)
    check_out(a.out, a.overwrite)
    step_dir = find_checkpoint(a.checkpoint)
    head = checkpoint.read_meta(step_dir).get("head")
    if head not in FINETUNE_HEADS:
      raise UserError(f"checkpoint {step_dir} has head {head!r}, not a fine-tuning head; fine-tune it first")
    clear_out(a.out)
    sizes = quantize(step_dir, a.out, a.mode)
    print(f"quantized {step_dir} ({a.mode}, qwix {_version()}) to {a.out}: parameters "
          f"{sizes['float32_bytes'] / 2**20:.1f} MiB -> {sizes['quantized_bytes'] / 2**20:.1f} MiB "
          f"({sizes['file_bytes'] / 2**20:.1f} MiB file)", file=sys.stderr)

  return run_cli("bertjax.quantize", run)


if __name__ == "__main__":
  sys.exit(main())
