"""Dropout whose mask is one vectorised kernel on every backend.

`nnx.Dropout` draws its mask with `jax.random.bernoulli`. With the default Threefry key, XLA's CPU backend lowers
Threefry as a 5-iteration while loop that writes two full uint32 arrays to memory on every iteration; on BERT-base
that was 6.8% of a CPU training step (3.6% with this module, `benchmarks/pretrain_throughput.py --explain`).
`Dropout` computes the same Threefry-2x32 hash (20 rounds, the function `jax.random` uses; `tests/test_dropout.py`
checks it bit for bit against `jax.extend.random.threefry_2x32`) as straight-line jnp code over the element
indices, written once per mask, and the index counters partition like any iota under a sharded mesh.

Keys of another implementation (`jax_default_prng_impl=rbg` / `unsafe_rbg`, e.g. to use a TPU's hardware
generator) go through `nnx.Dropout`'s own `jax.random.bernoulli` path unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def keep_mask(key, shape, keep_prob: float):
  """Bernoulli(keep_prob) mask of `shape` from a Threefry key: element i keeps when the first word of
  threefry2x32(key, (i, 0)) is below keep_prob * 2**32. Indices past 2**32 elements wrap (masks repeat)."""
  k0, k1 = jax.random.key_data(key).reshape(-1)[:2]
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  bits, _ = threefry2x32(k0, k1, index, jnp.zeros_like(index))
  threshold = np.uint32(min(round(keep_prob * 2.0**32), 2**32 - 1))
  # Materialise the hash once per mask. XLA fuses integer-only ("cheap") producers into every consumer, so the
  # forward and backward kernels would each recompute it (3-4 times per dropout on BERT; `optimization_barrier`
  # does not survive XLA's CPU pipeline). A reduction is only ever a fusion root: max over a leading zero is the
  # identity on the values and makes XLA write the words to memory once (a leading axis keeps the kernel vectorised).
  bits = jnp.max(jnp.pad(bits[None], [(0, 1)] + [(0, 0)] * len(shape)), axis=0)
  return bits < threshold


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
    if key is None or not _is_threefry(key):
      return super().__call__(inputs, deterministic=deterministic, rngs=key)
    keep_prob = 1.0 - self.rate
    mask = keep_mask(key, inputs.shape, keep_prob)
    return jax.lax.select(mask, inputs / jnp.asarray(keep_prob, inputs.dtype), jnp.zeros_like(inputs))
