"""bertjax's Dropout: the fused Threefry hash equals jax.random's bit for bit, the mask has the right statistics,
keys of other implementations take nnx.Dropout's path, and the model's dropout is driven by its key only."""

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bertjax.models import dropout
from bertjax.models.dropout import Dropout, element_counters, keep_mask, threefry2x32


def test_threefry_matches_jax_bit_for_bit():
  r = np.random.RandomState(0)
  for _ in range(3):
    key = r.randint(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    x = r.randint(0, 2**32, (2, 1000), dtype=np.uint64).astype(np.uint32)
    ours = jax.jit(threefry2x32)(jnp.uint32(key[0]), jnp.uint32(key[1]), x[0], x[1])
    ref = jex_random.threefry_2x32(jnp.asarray(key), jnp.asarray(x.reshape(-1)))
    np.testing.assert_array_equal(np.concatenate([np.asarray(o) for o in ours]), np.asarray(ref))


def test_mask_statistics():
  shape, keep = (64, 128, 96), 0.9
  n = int(np.prod(shape))
  m1 = np.asarray(jax.jit(keep_mask, static_argnums=(1, 2))(jax.random.key(1), shape, keep))
  m2 = np.asarray(keep_mask(jax.random.key(2), shape, keep))
  m3 = np.asarray(keep_mask(jax.random.fold_in(jax.random.key(1), 0), shape, keep))
  sigma = np.sqrt(keep * (1 - keep) / n)
  for m in (m1, m2, m3):
    assert abs(m.mean() - keep) < 5 * sigma, m.mean()
    for axis in range(3):  # no row, column or depth is special
      means = m.mean(axis=tuple(a for a in range(3) if a != axis))
      per = np.sqrt(keep * (1 - keep) / (n / shape[axis]))
      assert np.abs(means - keep).max() < 5.5 * per, (axis, np.abs(means - keep).max() / per)
  # different keys give independent masks: agreement keep^2 + (1-keep)^2
  agree = keep**2 + (1 - keep)**2
  for a, b in ((m1, m2), (m1, m3), (m1[:32], m1[32:]), (m1[:, :, :48], m1[:, :, 48:])):
    assert abs((a == b).mean() - agree) < 5 * np.sqrt(agree * (1 - agree) / a.size)
  assert abs(np.asarray(keep_mask(jax.random.key(3), (4096, 64), 0.5)).mean() - 0.5) < 5 * np.sqrt(0.25 / 4096 / 64)


def test_dropout_scales_masks_and_differentiates():
  drop = Dropout(0.25)
  x = jnp.ones((8, 16, 32))
  y = drop(x, deterministic=False, rngs=jax.random.key(5))
  kept = np.asarray(y) != 0
  np.testing.assert_array_equal(kept, np.asarray(keep_mask(jax.random.key(5), x.shape, 0.75)))
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(drop(x, deterministic=True, rngs=jax.random.key(5))), np.asarray(x))
  g = jax.grad(lambda v: drop(v, deterministic=False, rngs=jax.random.key(5)).sum())(x)
  np.testing.assert_allclose(np.asarray(g), kept / 0.75, rtol=1e-7)
  # an nnx.Rngs stream gives a fresh key per call, as with nnx.Dropout
  rngs = nnx.Rngs(dropout=0)
  first, second = (np.asarray(drop(x, deterministic=False, rngs=rngs)) for _ in range(2))
  assert (first != second).any()


def test_other_key_implementations_take_nnx_path():
  x = jax.random.normal(jax.random.key(0), (4, 8, 16))
  for impl in ("rbg", "unsafe_rbg"):
    key = jax.random.key(7, impl=impl)
    ours = Dropout(0.3)(x, deterministic=False, rngs=key)
    ref = nnx.Dropout(0.3)(x, deterministic=False, rngs=key)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_counters_are_64_bit_past_2_32_elements():
  """Elements 2**32 apart (rows 0 and 1 of a (4, 2**30, 4) array: 2**34 elements, never allocated) get their own
  counters and independent masks; with a 32-bit element count they had the same counter and the same mask."""
  shape = (4, 2**30, 4)
  j = jnp.arange(1024, dtype=jnp.uint32)[:, None] * 1_000_003 % 2**30
  k = jnp.arange(4, dtype=jnp.uint32)[None, :]
  (lo0, hi0), (lo1, hi1) = (element_counters(shape, (jnp.uint32(r), j, k)) for r in (0, 1))
  np.testing.assert_array_equal(np.asarray(lo0), np.asarray(lo1))
  assert (np.asarray(hi0) == 0).all() and (np.asarray(hi1) == 1).all()
  m0, m1 = (np.asarray(keep_mask(jax.random.key(9), shape, 0.5, (jnp.uint32(r), j, k))) for r in (0, 1))
  assert abs((m0 == m1).mean() - 0.5) < 5 * np.sqrt(0.25 / m0.size), (m0 == m1).mean()
  # the two words are the exact 64-bit flat index, including carries out of the low word
  r = np.random.RandomState(0)
  shape = (3, 70_000, 50_000, 7)  # strides of 2**34.3 and 2**18.4: products and sums past 2**32
  idx = [r.randint(0, n, 500, dtype=np.int64) for n in shape]
  lo, hi = element_counters(shape, [jnp.asarray(i, jnp.uint32) for i in idx])
  flat = sum(i.astype(object) * int(np.prod(shape[a + 1:], dtype=object)) for a, i in enumerate(idx))
  np.testing.assert_array_equal(np.asarray(hi).astype(object) * 2**32 + np.asarray(lo), flat)


def test_small_masks_are_unchanged():
  """Below 2**32 elements the high word is 0: the masks of earlier versions (first word of threefry(i, 0))."""
  shape, key = (8, 16, 32), jax.random.key(3)
  i = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
  k0, k1 = np.asarray(jax.random.key_data(key))
  ref, _ = threefry2x32(jnp.uint32(k0), jnp.uint32(k1), jnp.asarray(i), jnp.zeros(shape, jnp.uint32))
  np.testing.assert_array_equal(np.asarray(keep_mask(key, shape, 0.75)), np.asarray(ref) < np.uint32(0.75 * 2**32))


def test_accelerators_use_partitionable_jax_random(monkeypatch):
  """Off XLA:CPU, dropout is jax.random.bernoulli (64-bit, partitionable Threefry counters), as nnx.Dropout."""
  assert jax.config.jax_threefry_partitionable  # the default of the installed jax
  assert dropout.fused_here() == (jax.default_backend() == "cpu")
  monkeypatch.setattr(dropout, "fused_here", lambda: False)
  x = jnp.ones((4, 8, 16))
  key = jax.random.key(11)
  ours = Dropout(0.3)(x, deterministic=False, rngs=key)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(nnx.Dropout(0.3)(x, deterministic=False, rngs=key)))
  assert (np.asarray(ours != 0) != np.asarray(keep_mask(key, x.shape, 0.7))).any()  # not the fused mask
