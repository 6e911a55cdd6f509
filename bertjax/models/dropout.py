"""Dropout whose mask is one vectorised kernel on every backend.

`nnx.Dropout` draws its mask with `jax.random.bernoulli`. With the default Threefry key, XLA's CPU backend lowers
Threefry as a 5-iteration while loop that writes two full uint32 arrays to memory on every iteration; on BERT-base
that was 6.8% of a CPU training step (3.6% with this module, `benchmarks/pretrain_throughput.py --explain`).
`Dropout` computes the same Threefry-2x32 hash (20 rounds, the function `jax.random` uses; `tests/test_dropout.py`
checks it bit for bit against `jax.extend.random.threefry_2x32`) as straight-line jnp code over the element
indices, written once per mask, and the index counters partition like any iota under a sharded mesh.

Element i hashes the counter (low word, high word) of its 64-bit flat index, so masks never repeat (a 32-bit count
would wrap past 2**32 elements: BERT-large attention dropout at sequence 512 and a global batch of ~1,024). Below
2**32 elements the high word is 0 and the masks are those of earlier versions bit for bit.

The fused mask is for XLA:CPU only. On accelerators (the platform of the devices in scope not "cpu") dropout is
`nnx.Dropout`'s `jax.random.bernoulli`, whose Threefry counters are partitionable (`jax_threefry_partitionable`, on
by default since jax 0.5; a sharded mask is generated shard by shard, with no all-gather) and 64-bit. Keys of another
implementation (`jax_default_prng_impl=rbg` / `unsafe_rbg`, e.g. to use a TPU's hardware generator) go through that
path too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bertjax.models import partitioning

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k0, k1, x0, x1):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on uint32 arrays: the hash behind `jax.random`."""
  ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
      x1 = x1 ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _mul_wide(a, b: int):
  """(low, high) words of the 64-bit product of uint32 array `a` and a constant `b` < 2**32 (16-bit halves)."""
  lo16, b_lo, b_hi = np.uint32(0xFFFF), np.uint32(b & 0xFFFF), np.uint32(b >> 16)
  a_lo, a_hi = a & lo16, a >> np.uint32(16)
  ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
  mid = (ll >> np.uint32(16)) + (lh & lo16) + (hl & lo16)
  return (ll & lo16) | (mid << np.uint32(16)), hh + (lh >> np.uint32(16)) + (hl >> np.uint32(16)) + (mid >> np.uint32(16))


def element_counters(shape, indices=None):
  """(low, high) uint32 words of each element's row-major flat index in an array of `shape`: the Threefry
  counters of `keep_mask`. `indices` (one uint32 index array per axis, broadcastable; default: every element)
  picks elements, so a test can look at elements past 2**32 without allocating them."""
  if indices is None:
    indices = [jax.lax.broadcasted_iota(jnp.uint32, shape, axis) for axis in range(len(shape))]
  n = math.prod(shape)
  if n > 2**64:
    raise ValueError(f"dropout of {shape}: more than 2**64 elements")
  strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
  if n <= 2**32:  # the high word is 0: the flat index in uint32
    return sum(jnp.asarray(i, jnp.uint32) * np.uint32(st % 2**32) for i, st in zip(indices, strides)), jnp.uint32(0)
  lo, hi = jnp.uint32(0), jnp.uint32(0)
  for i, st in zip(indices, strides):
    i = jnp.asarray(i, jnp.uint32)
    t_lo, t_hi = _mul_wide(i, st % 2**32)
    new_lo = lo + t_lo
    hi = hi + t_hi + i * np.uint32(st >> 32) + (new_lo < lo).astype(jnp.uint32)  # carry of the low word
    lo = new_lo
  return lo, hi


def keep_mask(key, shape, keep_prob: float, indices=None):
  """Bernoulli(keep_prob) mask of `shape` from a Threefry key: element i keeps when the first word of
  threefry2x32(key, (low, high) words of i) is below keep_prob * 2**32 (`indices`: see `element_counters`)."""
  k0, k1 = jax.random.key_data(key).reshape(-1)[:2]
  lo, hi = element_counters(shape, indices)
  lo, hi = jnp.broadcast_arrays(lo, hi)
  bits, _ = threefry2x32(k0, k1, lo, hi)
  threshold = np.uint32(min(round(keep_prob * 2.0**32), 2**32 - 1))
  # Materialise the hash once per mask. XLA fuses integer-only ("cheap") producers into every consumer, so the
  # forward and backward kernels would each recompute it (3-4 times per dropout on BERT; `optimization_barrier`
  # does not survive XLA's CPU pipeline). A reduction is only ever a fusion root: max over a leading zero is the
  # identity on the values and makes XLA write the words to memory once (a leading axis keeps the kernel vectorised).
  bits = jnp.max(jnp.pad(bits[None], [(0, 1)] + [(0, 0)] * bits.ndim), axis=0)
  return bits < threshold


def fused_here() -> bool:
  """Whether `Dropout` uses the fused mask: on XLA:CPU only. The platform is that of the devices in scope
  (`partitioning.platform`), so `bertjax.compile` on a CPU host traces a TPU / GPU target's `jax.random` path."""
  return partitioning.platform()[0] == "cpu"


def _is_threefry(key) -> bool:
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(jax.random.key_impl(key)) == "threefry2x32"
  return key.dtype == jnp.uint32 and key.shape[-1:] == (2,)  # a raw (legacy) Threefry key


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same arguments, views and rngs handling) with the fused Threefry mask above."""

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic or self.rate == 0.0 or self.rate == 1.0 or self.broadcast_dims:
      return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
    rngs = self.rngs if rngs is None else rngs
    if isinstance(rngs, nnx.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, nnx.RngStream):
      key = rngs()
    else:
      key = rngs
    if key is None or not _is_threefry(key) or not fused_here():
      return super().__call__(inputs, deterministic=deterministic, rngs=key)
    keep_prob = 1.0 - self.rate
    mask = keep_mask(key, inputs.shape, keep_prob)
    return jax.lax.select(mask, inputs / jnp.asarray(keep_prob, inputs.dtype), jnp.zeros_like(inputs))
