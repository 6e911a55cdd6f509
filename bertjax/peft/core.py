"""Which parameters a PEFT run trains, and the trainable / frozen split the trainer carries.

The trainable tree has the params' nesting but only the trained leaves: the task head (+ the pooler for sequence
classification), `peft.modules_to_save`, adapter parameters (and, as in Houlsby et al., the encoder LayerNorms),
and for LoRA a `lora_A` [in, r] / `lora_B` [r, out] pair next to each targeted `kernel` [in, out]. The frozen tree
holds every other leaf. `combine` rebuilds the model's params inside the jitted step: kernel + alpha/r * A @ B.
Only the trainable tree is differentiated, carried in the optimizer state and checkpointed.
With `peft.method = "none"` everything is trainable and the frozen tree is empty (the trainer's one code path).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from bertjax.errors import UserError

METHODS = ("none", "lora", "adapter")
# Trained fully with every method (transformers' head modules; peft's `modules_to_save`).
HEAD_PATTERNS = {
    "sequence_classification": (r"^classifier/", r"^bert/pooler/"),
    "token_classification": (r"^classifier/",),
    "question_answering": (r"^qa_outputs/",),
    "pretraining": (r"^cls/",),
    "masked_lm": (r"^cls/",),
}
ADAPTER_PATTERNS = (r"/adapter/", r"^bert/encoder/layer/\d+/.*LayerNorm/")
LORA_LEAVES = ("lora_A", "lora_B")


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def leaves(tree: Mapping[Any, Any], prefix: tuple = ()) -> list[tuple[tuple, Any]]:
  """[(path tuple, leaf)] of a nested dict, in insertion order."""
  out = []
  for k, v in tree.items():
    out.extend(leaves(v, prefix + (k,)) if isinstance(v, Mapping) else [(prefix + (k,), v)])
  return out


def select(tree: Mapping[Any, Any], keep: Callable[[tuple], bool], prefix: tuple = ()) -> dict:
  """The nested dict of the leaves whose path `keep` accepts (empty branches dropped)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = select(v, keep, prefix + (k,))
      if sub:
        out[k] = sub
    elif keep(prefix + (k,)):
      out[k] = v
  return out


def merge(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> dict:
  """Deep union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
  return out


def _node(tree: dict, path: tuple) -> dict:
  for p in path:
    tree = tree.setdefault(p, {})
  return tree


def check(cfg: ConfigDict | None) -> str:
  """The method, after the config checks that need no model; raises UserError."""
  method = str((cfg or {}).get("method", "none") or "none")
  if method not in METHODS:
    raise UserError(f"peft.method={method!r}; use 'none', 'lora' or 'adapter'")
  if method == "lora":
    if int(cfg.rank) < 1:
      raise UserError(f"peft.rank={cfg.rank} must be >= 1 (e.g. 8)")
    if float(cfg.get("dropout", 0.0) or 0.0):
      raise UserError(f"peft.dropout={cfg.dropout}: bertjax merges LoRA into the kernels each step, which has no "
                      "input dropout; set --config.peft.dropout=0 (the model's own dropout still applies)")
  if method == "adapter" and int(cfg.adapter_size) < 1:
    raise UserError(f"peft.adapter_size={cfg.adapter_size} must be >= 1 (e.g. 64)")
  for name in ("target_modules", "modules_to_save"):
    for pat in list((cfg or {}).get(name, []) or []):
      try:
        re.compile(pat)
      except re.error as e:
        raise UserError(f"peft.{name} has an invalid regex {pat!r} ({e}); fix the pattern") from None
  return method


class Split:
  """The trainable / frozen partition of one model's params for `cfg` (a `config.peft`) and task `head`."""

  def __init__(self, cfg: ConfigDict | None, abstract: Mapping[Any, Any], head: str):
    self.method = check(cfg)
    self.cfg = cfg
    flat = leaves(abstract)
    if self.method == "none":
      self.trained, self.lora, self.scale = {p for p, _ in flat}, [], 0.0
      return
    pats = [re.compile(p) for p in (*HEAD_PATTERNS.get(head, ()), *(cfg.get("modules_to_save", []) or []),
                                    *(ADAPTER_PATTERNS if self.method == "adapter" else ()))]
    self.trained = {p for p, _ in flat if any(r.search(path_str(p)) for r in pats)}
    self.lora, self.scale = [], 0.0
    if self.method == "lora":
      targets = [re.compile(t) for t in cfg.target_modules]
      self.lora = [p[:-1] for p, v in flat if p[-1] == "kernel" and len(v.shape) == 2 and p not in self.trained
                   and any(r.search(path_str(p[:-1])) for r in targets)]
      if not self.lora:
        raise UserError(f"peft.target_modules={list(cfg.target_modules)} match no Linear layer of the {head} model; "
                        "use regexes over module paths such as 'query', 'value' or 'attention/output/dense'")
      self.rank, self.scale = int(cfg.rank), float(cfg.alpha) / int(cfg.rank)
    self.shapes = {p: tuple(v.shape) for p, v in flat}

  @property
  def active(self) -> bool:
    return self.method != "none"

  # -- trees --------------------------------------------------------------------------------------------
  def split(self, full: Mapping[Any, Any], key: jax.Array | None = None) -> tuple[dict, dict]:
    """(trainable, frozen) from full params; LoRA pairs start as peft does (A ~ U(+-1/sqrt(in)), B = 0)."""
    trainable = select(full, lambda p: p in self.trained)
    frozen = select(full, lambda p: p not in self.trained)
    for i, mod in enumerate(self.lora):
      din, dout = self.shapes[mod + ("kernel",)]
      k = jax.random.fold_in(key if key is not None else jax.random.key(0), i)
      bound = 1.0 / din ** 0.5
      node = _node(trainable, mod)
      node["lora_A"] = jax.random.uniform(k, (din, self.rank), jnp.float32, -bound, bound)
      node["lora_B"] = jnp.zeros((self.rank, dout), jnp.float32)
    return trainable, frozen

  def combine(self, trainable: Mapping[Any, Any], frozen: Mapping[Any, Any]) -> dict:
    """The model's params: frozen + trainable, each LoRA pair merged into its kernel (and removed)."""
    if not frozen:
      return dict(trainable)
    full = merge(frozen, select(trainable, lambda p: p[-1] not in LORA_LEAVES))
    for mod in self.lora:
      pair = _get(trainable, mod)
      delta = self.scale * (pair["lora_A"] @ pair["lora_B"])
      full = _with(full, mod + ("kernel",), lambda w, d=delta: w + d.astype(w.dtype))
    return full

  def shardings(self, full_sh: Mapping[Any, Any], mesh) -> tuple[dict, dict]:
    """(trainable, frozen) NamedShardings: LoRA A takes the kernel's input-dim spec, B its output-dim spec."""
    if not self.active:
      return dict(full_sh), {}
    trainable = select(full_sh, lambda p: p in self.trained)
    frozen = select(full_sh, lambda p: p not in self.trained)
    for mod in self.lora:
      spec = tuple(_get(full_sh, mod + ("kernel",)).spec) + (None, None)
      node = _node(trainable, mod)
      node["lora_A"] = NamedSharding(mesh, P(spec[0], None))
      node["lora_B"] = NamedSharding(mesh, P(None, spec[1]))
    return trainable, frozen

  # -- reporting ----------------------------------------------------------------------------------------
  def meta(self) -> dict:
    """What a checkpoint records to rebuild the model (the base reference is added by the trainer)."""
    if not self.active:
      return {}
    c = self.cfg
    out = {"method": self.method, "modules_to_save": list(c.get("modules_to_save", []) or [])}
    if self.method == "lora":
      out.update(rank=self.rank, alpha=float(c.alpha), target_modules=list(c.target_modules),
                 lora_modules=[path_str(m) for m in self.lora])
    else:
      out.update(adapter_size=int(c.adapter_size), dropout=float(c.get("dropout", 0.0) or 0.0))
    return out


def _get(tree: Mapping[Any, Any], path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _with(tree: Mapping[Any, Any], path: tuple, fn: Callable[[Any], Any]) -> dict:
  """A copy of `tree` (only along `path`) with the leaf at `path` replaced by fn(leaf)."""
  if not path:
    return fn(tree)
  out = dict(tree)
  out[path[0]] = _with(tree[path[0]], path[1:], fn)
  return out


def count(tree: Mapping[Any, Any] | Any) -> tuple[int, int]:
  """(number of values, bytes) over the leaves of a tree of arrays or ShapeDtypeStructs."""
  ls = jax.tree_util.tree_leaves(tree)
  return (sum(math.prod(x.shape) for x in ls),
          sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in ls))


@jax.jit
def _checksums(tree):
  return [jnp.sum(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32), dtype=jnp.uint32)
          for x in jax.tree_util.tree_leaves(tree)]


def fingerprint(frozen: Mapping[Any, Any]) -> str:
  """Hash of the frozen base: every leaf's path, shape and a wrapping uint32 sum of its float32 bits (integer
  addition: the same value on any mesh or host count). One device reduction and one host read."""
  items = sorted((path_str(p), v) for p, v in leaves(frozen))
  sums = jax.device_get(_checksums([v for _, v in items]))
  h = hashlib.sha256()
  for (name, v), s in zip(items, sums):
    h.update(f"{name}:{tuple(v.shape)}:{int(s)};".encode())
  return h.hexdigest()[:20]
