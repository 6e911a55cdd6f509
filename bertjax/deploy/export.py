"""A deployable export of a fine-tuned model: `python -m bertjax.export --checkpoint=... --out=DIR`.

DIR holds
  model.jax       the forward pass serialized with `jax.export` (weights baked in as constants), with symbolic
                  batch and sequence dimensions ("b, t"; t <= the position table): int32 `input_ids`,
                  `token_type_ids`, `attention_mask` [b, t] -> the head's float32 outputs (embeddings [b, D])
  tokenizer.json  the run's tokenizer (HF `tokenizers`)
  predictor.json  head, labels, maximum length, QA window settings, an embedding model's pooling and
                  normalisation (applied inside model.jax), the platforms it was lowered for
It needs only jax, numpy and tokenizers to run (`load_forward`): no bertjax model code, no orbax, no flax.
`python -m bertjax.serve --model=DIR` and `python -m bertjax.predict --checkpoint=DIR` take it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bertjax.artifacts import factory, load as artifacts_load
from bertjax.artifacts.workdir import find_checkpoint
from bertjax.data import glue, tokenizer as toklib
from bertjax.deploy import quantize
from bertjax.deploy.cli import Parser, add_out, check_out, clear_out, prog, run_cli
from bertjax.deploy.predictor import Predictor, model_options
from bertjax.errors import UserError

FORWARD_FILE, SPEC_FILE, TOKENIZER_FILE = "model.jax", "predictor.json", "tokenizer.json"
PLATFORMS = ("cpu", "cuda", "tpu")


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, FORWARD_FILE)) and os.path.isfile(os.path.join(path, SPEC_FILE))


def export(predictor: Any, params: dict | None, meta: dict, out: str, platforms: tuple[str, ...] = PLATFORMS,
           model: Any = None) -> dict:
  """Serialize `predictor`'s model (a checkpoint's `params` + `meta`, or a built NNX `model`, e.g. quantized) into
  `out`; returns the spec written."""
  cfg = factory.config_from_meta(meta)
  if model is None:
    model = factory.model_from_meta(meta, params)
  graphdef, state = nnx.split(model)
  state = jax.tree.map(jnp.asarray, state)

  options = model_options(predictor.embedding)

  def forward(input_ids, token_type_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, token_type_ids, attention_mask, deterministic=True, **options)

  b, t = jax.export.symbolic_shape("b, t", constraints=[f"t <= {cfg.max_position_embeddings}"])
  spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
  try:
    exp = jax.export.export(jax.jit(forward), platforms=platforms)(spec, spec, spec)
  except Exception:  # a platform that cannot be lowered here: the host's own platform still serves
    platforms = (jax.default_backend(),)
    exp = jax.export.export(jax.jit(forward), platforms=platforms)(spec, spec, spec)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, FORWARD_FILE), "wb") as f:
    f.write(exp.serialize())
  predictor.tokenizer.save(os.path.join(out, TOKENIZER_FILE))
  info = {"head": predictor.head, "label_names": predictor.label_names, "problem_type": predictor.problem_type,
          "threshold": predictor.threshold, "max_seq_length": predictor.max_seq_length, "qa": predictor.qa,
          "max_position_embeddings": cfg.max_position_embeddings, "platforms": list(platforms),
          "embedding": predictor.embedding, "source": predictor.source,
          "inputs": ["input_ids", "token_type_ids", "attention_mask"]}
  with open(os.path.join(out, SPEC_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return info


def load_forward(folder: str) -> Callable[[dict[str, np.ndarray]], Any]:
  """The exported forward pass as `arrays -> outputs` (jax, numpy only)."""
  with open(os.path.join(folder, FORWARD_FILE), "rb") as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  call = jax.jit(exp.call)
  return lambda a: call(*(np.asarray(a[k], np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")))


def load_predictor(folder: str, *, max_seq_length: int | None = None, tokenizer: str | None = None,
                   batch_size: int = 32, doc_stride: int | None = None):
  """A `Predictor` running the export (its pre- and post-processing, the export's forward)."""
  with open(os.path.join(folder, SPEC_FILE)) as f:
    spec = json.load(f)
  max_len = int(max_seq_length or spec["max_seq_length"])
  if max_len > spec["max_position_embeddings"]:
    raise UserError(f"--max_seq_length={max_len} exceeds the model's position table "
                    f"({spec['max_position_embeddings']})")
  qa = dict(spec.get("qa") or {})
  if doc_stride:
    qa["doc_stride"] = int(doc_stride)
  tok = glue.as_tokenizer(toklib.load(tokenizer or os.path.join(folder, TOKENIZER_FILE)))
  return Predictor(load_forward(folder), spec["head"], tok, max_len, list(spec["label_names"]), spec["problem_type"],
                   float(spec["threshold"]), batch_size, qa, folder, dict(spec.get("embedding") or {}))


def main(argv: list[str] | None = None) -> int:
  p = Parser(prog=prog("bertjax.export"), description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="workdir (its best checkpoint), <workdir>/best or step folder; "
                 "or a quantized model folder")
  add_out(p, "the export")
  p.add_argument("--platforms", default=",".join(PLATFORMS), help="lowering platforms, comma-separated")

  def run():
    a = p.parse_args(argv)
    check_out(a.out, a.overwrite)
    if quantize.is_quantized(a.checkpoint):
      model, meta = quantize.load_model(a.checkpoint)
      predictor = Predictor.from_params({}, meta, a.checkpoint, forward=lambda _: None, workdir=a.checkpoint)
    else:
      step_dir = find_checkpoint(a.checkpoint)
      params, meta = artifacts_load.load_params(step_dir)
      predictor = Predictor.from_params(params, meta, step_dir, forward=lambda _: None)
      model = None
    clear_out(a.out)
    info = export(predictor, params if model is None else None, meta, a.out, tuple(a.platforms.split(",")),
                  model=model)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"exported {info['head']} from {info['source']} to {a.out} ({size / 2**20:.1f} MiB, platforms "
          f"{','.join(info['platforms'])})", file=sys.stderr)

  return run_cli("bertjax.export", run)


if __name__ == "__main__":
  sys.exit(main())
