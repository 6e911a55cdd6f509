"""bertjax's Dropout: the fused Threefry hash equals jax.random's bit for bit, the mask has the right statistics,
keys of other implementations take nnx.Dropout's path, and the model's dropout is driven by its key only."""

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bertjax.models.dropout import Dropout, keep_mask, threefry2x32


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
