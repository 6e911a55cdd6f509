"""Scaled dot-product attention behind one function: XLA, cuDNN flash attention or Pallas splash attention.

`model.attention` picks the kernel: "xla" (einsum + float32 softmax, the only path with attention-probability
dropout), "cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs, bfloat16/float16),
"splash" (`jax.experimental.pallas.ops.tpu.splash_attention`, TPUs) or "auto" (a fused kernel when the platform,
dtype, shape and `attention_probs_dropout_prob == 0` allow it, else XLA; one log line says which and why). On a
mesh of several devices the fused kernels run per device under `shard_map` over batch and heads (the mesh and
rules in scope, `bertjax.models.partitioning`); the platform is that mesh's (a cross-compile's target).

Masks come in two forms: `key_mask` [B, T] bool (padding; BERT batches are right-padded, which the cuDNN path
relies on: it passes the mask as sequence lengths) or `segment_ids` [B, T] int (0 = padding, k > 0 = the k-th
packed example): a query attends to the keys with its own segment id (padding queries attend to padding, so no
softmax row is empty; their outputs are never used).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from bertjax.errors import UserError
from bertjax.models import partitioning

CHOICES = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash's tiles are multiples of 128 tokens
_logged: set[str] = set()


def _log_once(msg: str) -> None:
  if msg not in _logged:
    _logged.add(msg)
    logging.info("%s", msg)


def _platform() -> tuple[str, str]:
  platform, kind = partitioning.platform()
  return ("gpu" if platform == "cuda" else platform), kind


def _cudnn_problem(dtype, head_dim: int) -> str | None:
  """Why cuDNN flash attention cannot run here (None when it can)."""
  platform, kind = _platform()
  if platform != "gpu" or "nvidia" not in kind.lower():
    return f"needs an NVIDIA GPU (this run has {platform} {kind})".rstrip()
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"needs model.dtype bfloat16 or float16 (got {jnp.dtype(dtype).name})"
  if head_dim % 8 or head_dim > 128:
    return f"needs a head size that is a multiple of 8 and at most 128 (got {head_dim})"
  return None


def _splash_problem(seq_len: int, interpret: bool) -> str | None:
  platform, _ = _platform()
  if platform != "tpu" and not interpret:
    return f"needs a TPU (this run has {platform})"
  if seq_len % SPLASH_BLOCK:
    return f"needs a sequence length that is a multiple of {SPLASH_BLOCK} (got {seq_len})"
  return None


def choose(requested: str, *, dtype, dropout: float, seq_len: int, head_dim: int, interpret: bool = False) -> str:
  """The implementation to run: `requested` unless it is "auto". A fused kernel that cannot run here is a
  UserError (one line naming the fix); "auto" logs its choice once."""
  if requested not in CHOICES:
    raise UserError(f"model.attention={requested!r} is not one of {list(CHOICES)}")
  if requested == "xla":
    return "xla"
  if requested in ("cudnn", "splash"):
    problem = (_cudnn_problem(dtype, head_dim) if requested == "cudnn" else _splash_problem(seq_len, interpret))
    if problem:
      raise UserError(f"model.attention={requested!r} {problem}; use model.attention='auto' or 'xla'")
    if dropout:
      raise UserError(f"model.attention={requested!r} does no attention-probability dropout; set "
                      f"model.attention_probs_dropout_prob=0 or use model.attention='xla'")
    return requested
  platform, kind = _platform()
  if platform == "tpu":
    fused, problem = "splash", _splash_problem(seq_len, interpret)
  elif platform == "gpu":
    fused, problem = "cudnn", _cudnn_problem(dtype, head_dim)
  else:
    _log_once(f"model.attention=auto: using xla (no fused attention kernel on {platform})")
    return "xla"
  if problem is None and dropout:
    problem = f"does no attention dropout and model.attention_probs_dropout_prob={dropout}"
  if problem:
    _log_once(f"model.attention=auto: using xla on {kind}: {fused} {problem}")
    return "xla"
  _log_once(f"model.attention=auto: using {fused} on {kind} (dtype {jnp.dtype(dtype).name}, sequence {seq_len}, "
            "attention dropout 0)")
  return fused


def _xla(q, k, v, key_mask, segment_ids, dropout_fn):
  head_dim = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(head_dim))
  if segment_ids is not None:
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  else:
    allowed = key_mask[:, None, None, :]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_fn is not None:
    probs = dropout_fn(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _cudnn(q, k, v, key_mask, segment_ids):
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  lengths = key_mask.sum(-1).astype(jnp.int32)  # right padding: the first `length` keys are real
  return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def _splash_kernel(num_heads: int, seq_len: int, interpret: bool):
  # TPU kernel tooling (Pallas TPU ops), imported only when a TPU run picks splash attention
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  block = next(b for b in (512, 256, 128) if seq_len % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.FullMask((seq_len, seq_len))] * num_heads)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret), sk


def _splash(q, k, v, key_mask, segment_ids, interpret: bool):
  b, t, h, d = q.shape
  kernel, sk = _splash_kernel(h, t, interpret)  # built per trace: its mask arrays are constants of that trace
  seg = segment_ids if segment_ids is not None else key_mask
  seg = seg.astype(jnp.int32)
  # splash takes [heads, T, head_dim] per example and does not scale the logits itself
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  qs = heads_first(q) * jnp.asarray(1 / np.sqrt(d), q.dtype)
  out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(
      qs, heads_first(k), heads_first(v), seg)
  return heads_first(out)


def dot_product_attention(q, k, v, *, key_mask=None, segment_ids=None, implementation: str = "xla",
                          dropout_fn=None, interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v for q, k, v [B, T, H, D] -> [B, T, H, D].

  `implementation` is an already chosen "xla" | "cudnn" | "splash" (see `choose`); `dropout_fn` (probabilities
  -> probabilities) runs only on the XLA path; `interpret` runs splash in the Pallas interpreter (CPU tests).
  """
  if key_mask is None and segment_ids is None:
    key_mask = jnp.ones(q.shape[:2], bool)
  if implementation == "xla":
    return _xla(q, k, v, key_mask, segment_ids, dropout_fn)
  if implementation == "cudnn":
    return _per_device(_cudnn, q, k, v, key_mask, segment_ids)
  if implementation == "splash":
    return _per_device(lambda *a: _splash(*a, interpret), q, k, v, key_mask, segment_ids)
  raise ValueError(f"unknown attention implementation {implementation!r}")


def _per_device(kernel, q, k, v, key_mask, segment_ids):
  """A fused kernel on each device's rows and heads (`shard_map` over batch and heads, as MaxText runs splash)
  when a mesh is in scope (`partitioning.use`); the kernel as it is otherwise. The sequence stays whole."""
  scope = partitioning.current()
  if scope is None or scope[0].size == 1:
    return kernel(q, k, v, key_mask, segment_ids)
  mesh, rules = scope
  qkv, _ = partitioning.spec(("batch", None, "heads", None), q.shape, mesh, rules)
  rows, _ = partitioning.spec(("batch", None), q.shape[:2], mesh, rules)
  mask = key_mask if segment_ids is None else segment_ids
  fn = lambda q1, k1, v1, m1: kernel(q1, k1, v1, *((m1, None) if segment_ids is None else (None, m1)))
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv, check_vma=False)(q, k, v, mask)
