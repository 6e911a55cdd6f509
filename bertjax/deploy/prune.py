"""Structured attention-head pruning by importance (Michel et al. 2019): `python -m bertjax.prune`.

    python -m bertjax.prune --checkpoint=workdirs/sst2 --out=workdirs/sst2_p25 --prune_heads=0.25 \
        [--num_examples=512] [--recover_steps=100]

Head importance is the paper's I_h = E_x |dL(x)/d xi_h|: a mask xi of ones multiplies every head's output, and
the gradient of the task's own training loss with respect to it is taken on the first `num_examples` training
examples of the run (in the run's data order; one mask per example, so each example's gradient is its own, in
one backward pass per batch). Scores are normalised per layer by their L2 norm (as in the paper and
transformers' bertology example), then the globally least important `prune_heads` fraction of all heads is
removed, every layer keeping at least one head. Removed heads' columns of the query / key / value kernels and
rows of the attention output dense are cut out, so the new checkpoint's layers really are smaller; its model
config records `heads_per_layer` and its meta the kept heads' original indices (`pruning.kept_heads`).

The output folder is a run folder like training leaves: `checkpoints/0/` (params + meta), `tokenizer/`,
`config.json` (the run's), `prune.json` (scores, removed heads, sizes). `predict`, `export`, `quantize`,
`serve`, `convert to_hf`, `load_params` and `--config.init_checkpoint` take it. With `--recover_steps=N` the
pruned model goes to `<out>/pruned/` and `<out>` becomes the workdir of a short fine-tune from it: the run's
own config (task, data, optimizer, seed) with `training.num_train_steps=N`, run by the normal trainer.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bertjax import paths, tasks
from bertjax.artifacts import checkpoint, factory, load as artifacts_load
from bertjax.artifacts.workdir import copy_run_files, find_checkpoint, workdir_of
from bertjax.deploy.cli import Parser, add_out, check_out, clear_out, prog, run_cli
from bertjax.errors import UserError
from bertjax.train.trainer import train_and_evaluate

PRUNE_REPORT = "prune.json"
PRUNED_SUBDIR = "pruned"  # with --recover_steps: the pruned model before recovery


# -- importance ---------------------------------------------------------------------------------------------------

def attention_layers(model: Any) -> list:
  """The BertSelfAttention module of every encoder layer of a head model (or a bare BertModel), in order."""
  bert = model.bert if hasattr(model, "bert") else model
  return [layer.attention.self for layer in bert.encoder.layer]


def head_importance(model: Any, loss_fn: Callable[[Any, dict], Any], batches: Iterable[dict]) -> list[np.ndarray]:
  """Per layer, [heads] sum over examples of |d loss(example) / d head_mask| (not normalised).

  `loss_fn(model, batch)` is the batch's mean loss: each row gets its own mask, so the gradient with respect to
  row r's mask is that row's own gradient (scaled by the batch's weight of it)."""

  graphdef, state = nnx.split(model)
  heads = [a.num_heads for a in attention_layers(model)]

  @jax.jit
  def per_batch(state, batch):
    rows = batch["input_ids"].shape[0]

    def loss(masks):
      m = nnx.merge(graphdef, state)
      for att, mask in zip(attention_layers(m), masks):
        att.head_mask = mask
      return loss_fn(m, batch)

    grads = jax.grad(loss)([jnp.ones((rows, h), jnp.float32) for h in heads])
    return [jnp.abs(g).sum(0) for g in grads]

  total = [np.zeros(h, np.float64) for h in heads]
  for batch in batches:
    for t, g in zip(total, per_batch(state, batch)):
      t += np.asarray(g, np.float64)
  return total


def normalise(scores: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each layer's scores divided by their L2 norm (Michel et al. 2019; transformers' bertology example)."""
  return [s / (np.linalg.norm(s) + 1e-20) for s in scores]


def removable(heads: Sequence[int]) -> int:
  """How many heads can go with every layer keeping one."""
  return int(sum(heads) - len(heads))


def heads_to_remove(heads: Sequence[int], fraction: float) -> int:
  """round(fraction x all heads); a UserError when that would empty a layer."""
  n = int(round(fraction * sum(heads)))
  if n > removable(heads):
    raise UserError(f"--prune_heads={fraction:g} would remove {n} of {sum(heads)} heads but every layer keeps at "
                    f"least one: at most {removable(heads)} ({removable(heads) / sum(heads):.3f}) can go")
  return n


def choose_kept(scores: Sequence[np.ndarray], n_remove: int) -> list[list[int]]:
  """Remove the `n_remove` globally least important heads (ties: earlier layer, lower head first), never a layer's
  last one; the kept head indices of each layer, ascending."""
  kept = [set(range(len(s))) for s in scores]
  order = sorted((float(s[h]), i, h) for i, s in enumerate(scores) for h in range(len(s)))
  for _, i, h in order:
    if n_remove == 0:
      break
    if len(kept[i]) > 1:
      kept[i].discard(h)
      n_remove -= 1
  return [sorted(k) for k in kept]


# -- slicing ------------------------------------------------------------------------------------------------------

def prune_params(params: dict, cfg: Any, kept: Sequence[Sequence[int]]) -> tuple[dict, Any]:
  """(params with only the `kept` heads of each layer, the pruned BertConfig). Head indices count the layer's
  current heads; a head's q / k / v columns and output-dense rows go together, so the kept heads compute
  exactly what they computed before."""
  out = copy.deepcopy(params)
  bert = out["bert"] if "bert" in out else out
  for i, heads in enumerate(kept):
    cols = cfg.head_columns(heads)
    att = bert["encoder"]["layer"][i]["attention"]
    for name in ("query", "key", "value"):
      att["self"][name]["kernel"] = np.ascontiguousarray(att["self"][name]["kernel"][:, cols])
      att["self"][name]["bias"] = np.ascontiguousarray(att["self"][name]["bias"][cols])
    att["output"]["dense"]["kernel"] = np.ascontiguousarray(att["output"]["dense"]["kernel"][cols, :])
  pruned = dataclasses.replace(cfg, heads_per_layer=tuple(len(h) for h in kept))
  return out, pruned


def count_params(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


# -- the run's task and data --------------------------------------------------------------------------------------

def run_config(workdir: str | None, step_dir: str) -> Any:
  """The training run's resolved config (`<workdir>/config.json`) as a ConfigDict."""
  f = paths.join(workdir, "config.json") if workdir else None
  if not f or not paths.exists(f):
    raise UserError(f"no config.json beside checkpoint {step_dir}: pruning scores heads on the run's own training "
                    "data; pass a workdir written by bertjax.main")
  return ConfigDict(json.loads(paths.read_text(f)))


def training_batches(config: Any, step_dir: str, workdir: str, num_examples: int) -> tuple[Any, list[dict]]:
  """(the run's task, prepared on its training data, and its first training batches covering `num_examples`)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.init_checkpoint, c.init_from_hf = step_dir, ""
    c.data.tokenizer = paths.join(workdir, "tokenizer")
    c.data.packing = False  # one mask per example
  task = tasks.get(c.task)(c, os.path.join(workdir, ".prune-scratch"))  # a workdir that does not exist: no resume
  task.prepare()
  source = task.train_source()
  steps = -(-num_examples // source.local_batch)
  batches = []
  for step in range(steps):
    b = source.batch(step)
    batches.append({k: v for k, v in b.items() if np.asarray(v).dtype.kind in "biuf"})
  return task, batches


# -- the command --------------------------------------------------------------------------------------------------

def check_args(fraction: float, out: str, num_examples: int, recover_steps: int, overwrite: bool = False) -> None:
  if not 0 <= fraction < 1:
    raise UserError(f"--prune_heads={fraction:g} must be a fraction of the heads in [0, 1), e.g. 0.25")
  if num_examples < 1:
    raise UserError(f"--num_examples={num_examples} must be >= 1 (a few hundred training examples)")
  if recover_steps < 0:
    raise UserError(f"--recover_steps={recover_steps} must be >= 0 (0: no recovery fine-tune)")
  check_out(out, overwrite)


def prune(checkpoint_path: str, out: str, fraction: float, num_examples: int = 512, recover_steps: int = 0,
          log: Callable[[str], None] = print, overwrite: bool = False) -> dict:
  """Score, prune and write `out` (see the module docstring); returns the prune report."""
  check_args(fraction, out, num_examples, recover_steps, overwrite)
  step_dir = find_checkpoint(checkpoint_path)
  meta = checkpoint.read_meta(step_dir)
  if (meta.get("peft") or {}).get("method") == "adapter":
    raise UserError(f"checkpoint {step_dir} holds Houlsby adapters; pruning takes full or LoRA checkpoints")
  cfg = factory.config_from_meta(meta, dtype="float32")
  heads = [cfg.layer_heads(i) for i in range(cfg.num_hidden_layers)]
  n_remove = heads_to_remove(heads, fraction)
  workdir = workdir_of(step_dir)
  config = run_config(workdir, step_dir)
  params, meta = artifacts_load.load_params(step_dir)  # LoRA merged
  task, batches = training_batches(config, step_dir, workdir, num_examples)
  model = factory.build_model(cfg, meta["head"], int(meta.get("num_labels") or 0) or None, params)
  scores = normalise(head_importance(model, lambda m, b: task.loss_fn(m, b, None, True)[0], batches))
  kept = choose_kept(scores, n_remove)
  new_params, new_cfg = prune_params(params, cfg, kept)
  old_kept = (meta.get("pruning") or {}).get("kept_heads") or [list(range(h)) for h in heads]
  kept_orig = [[old_kept[i][h] for h in k] for i, k in enumerate(kept)]
  n_examples = sum(len(b["input_ids"]) for b in batches)
  report = {"source": step_dir, "prune_heads": fraction, "examples_scored": n_examples,
            "heads_before": int(sum(heads)), "heads_removed": n_remove,
            "heads_per_layer": list(new_cfg.heads_per_layer),
            "kept_heads": kept_orig, "importance": [[round(float(x), 6) for x in s] for s in scores],
            "parameters_before": count_params(params), "parameters_after": count_params(new_params)}
  new_meta = {k: v for k, v in meta.items() if k != "peft"}
  new_meta.update(checkpoint.model_meta(new_cfg, meta["head"]))
  new_meta["model_config"]["dtype"] = meta["model_config"].get("dtype", "float32")
  new_meta["pruning"] = {k: report[k] for k in ("source", "prune_heads", "examples_scored", "kept_heads")}
  pruned_dir = os.path.join(out, PRUNED_SUBDIR) if recover_steps else out
  clear_out(out)  # empty unless --overwrite (check_args)
  write_run(pruned_dir, new_params, new_meta, workdir)
  log(f"scored {sum(heads)} heads on {n_examples} training examples; removed {n_remove}; heads per layer "
      f"{list(new_cfg.heads_per_layer)}; parameters {report['parameters_before']:,} -> "
      f"{report['parameters_after']:,}; wrote {pruned_dir}")
  if recover_steps:
    report["recovery"] = recover(config, pruned_dir, out, recover_steps)
    log(f"recovery fine-tune: {recover_steps} steps into {out}: {report['recovery']}")
  with open(os.path.join(out, PRUNE_REPORT), "w") as f:
    json.dump(report, f, indent=1)
  return report


def write_run(folder: str, params: dict, meta: dict, workdir: str) -> str:
  """A run folder: `checkpoints/0`, the run's `tokenizer/` and `config.json`."""
  os.makedirs(folder, exist_ok=True)
  copy_run_files(workdir, folder)
  return checkpoint.save_params(folder, 0, params, meta)


def recover(config: Any, pruned_dir: str, out: str, steps: int) -> dict:
  """A short fine-tune of the pruned model by the normal trainer: the run's config, `steps` steps, into `out`."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.init_checkpoint, c.init_from_hf = pruned_dir, ""
    c.data.tokenizer = ""
    c.training.num_train_steps = steps
    c.training.eval_only = False
    if "peft" in c:
      c.peft.method = "none"  # recovery fine-tunes the whole pruned model
  metrics = train_and_evaluate(c, out)
  return {"steps": steps, **{k: float(v) for k, v in dict(metrics or {}).items()
                             if isinstance(v, (int, float, np.floating))}}


def parser() -> argparse.ArgumentParser:
  p = Parser(prog=prog("bertjax.prune"), description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="fine-tuned workdir (its best checkpoint), <workdir>/best or "
                 "a step folder")
  add_out(p, "the pruned model")
  p.add_argument("--prune_heads", type=float, required=True, help="fraction of all attention heads to remove, "
                 "[0, 1)")
  p.add_argument("--num_examples", type=int, default=512, help="training examples to score the heads on")
  p.add_argument("--recover_steps", type=int, default=0, help="steps of recovery fine-tuning (0: none)")
  return p


def main(argv: Iterable[str] | None = None) -> int:

  def run():
    a = parser().parse_args(argv)
    prune(a.checkpoint, a.out, a.prune_heads, a.num_examples, a.recover_steps,
          log=lambda s: print(s, file=sys.stderr), overwrite=a.overwrite)

  return run_cli("bertjax.prune", run)


if __name__ == "__main__":
  sys.exit(main())
