"""The Trainer's train step as a plain function of jax / optax / flax alone.

`bertjax.train.trainer.Trainer` jits it with its mesh's shardings; `benchmarks/accelerator.py` jits the same
function on one device (a lent accelerator machine may have only jax, flax, optax and numpy), so the benchmark
times the step that training runs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def make_train_step(graphdef, combine: Callable, loss_fn: Callable, loss_weights: Callable, tx, schedule: Callable,
                    accum: int) -> Callable:
  """`train_step(params, frozen, opt_state, batch, step, rng) -> (params, opt_state, metrics)`.

  `combine(params, frozen)` gives the full parameter tree of `graphdef` (PEFT: trainable + frozen base; only
  `params` is differentiated); `loss_fn(model, batch, rngs, deterministic)` and `loss_weights(batch)` are the
  task's (`tasks.base.Task`); `batch` arrays have a leading [accum] axis when accum > 1; `rng` is raw uint32 key
  data, the dropout key is fold_in(rng, step). Metrics are {name: (total, count)}, with `grad_norm`,
  `learning_rate` and `skipped` added.
  """
  def loss_on(params, frozen, batch, key):
    model = nnx.merge(graphdef, combine(params, frozen))
    return loss_fn(model, batch, nnx.Rngs(dropout=key), False)

  grad_fn = jax.value_and_grad(loss_on, has_aux=True)

  def train_step(params, frozen, opt_state, batch, step, rng) -> tuple[Any, Any, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    if accum == 1:
      (_, m), grads = grad_fn(params, frozen, batch, key)
    else:
      grads, m = accumulate(loss_on, loss_weights, params, frozen, batch, jax.random.split(key, accum))
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    m = dict(m)
    m["grad_norm"] = (optax.tree.norm(grads), 1.0)
    m["learning_rate"] = (schedule(step), 1.0)
    # Divergence guard: a non-finite loss, gradient or updated parameter skips the whole update (params and
    # optimizer state stay as they were) and is left out of the averaged metrics; `skipped` tells the host.
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(total)) for total, _ in m.values()]
                           + [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new_params)]))
    params, opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), (new_params, new_opt),
                                               (params, opt_state))
    m = {k: (jnp.where(ok, total, 0.0), jnp.where(ok, count, 0.0)) for k, (total, count) in m.items()}
    m["skipped"] = (1.0 - ok.astype(jnp.float32), 1.0)
    return params, opt_state, m

  return train_step


def accumulate(loss_on, loss_weights, params, frozen, batch, keys):
  """Gradient and metrics of the big batch `batch` ([accum, micro, ...] arrays) from its micro-batches in turn.

  The big-batch loss is a sum of terms `total / weight` (a term's total and weight are summed over all its rows),
  so each micro-batch's gradient is that of its term totals divided by the WHOLE step's weights, and the summed
  gradients are the big-batch gradient (as MaxText's gradient_accumulation.py does), not an average of micro-batch
  means. The weights come from `task.loss_weights` (computed from the batch alone, before the scan), or, where it
  returns None, from the count of the "loss" metric (then the summed gradient of its totals is divided at the end).
  """
  weights = jax.vmap(loss_weights)(batch)
  if weights is not None:
    inv = {k: 1.0 / jnp.maximum(jnp.sum(w), 1e-9) for k, w in weights.items()}  # a zero weight has a zero total

  def objective(p, mb, k):
    _, m = loss_on(p, frozen, mb, k)
    if weights is None:
      return m["loss"][0], m
    return sum(m[name][0] * scale for name, scale in inv.items()), m

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def micro(carry, xs):
    g_acc, m_acc, obj_acc = carry
    (obj, m), g = grad_fn(params, *xs)
    return (jax.tree_util.tree_map(jnp.add, g_acc, g), jax.tree_util.tree_map(jnp.add, m_acc, m), obj_acc + obj), None

  first = jax.tree_util.tree_map(lambda x: x[0], batch)
  m_shape = jax.eval_shape(lambda: objective(params, first, keys[0])[1])
  zeros = (jax.tree_util.tree_map(jnp.zeros_like, params),
           jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape), jnp.zeros((), jnp.float32))
  (grads, m, obj), _ = jax.lax.scan(micro, zeros, (batch, keys))
  m = dict(m)
  if weights is None:
    n = m["loss"][1]
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(n, 1e-9), grads)
    obj = obj / jnp.maximum(n, 1e-9)
  if "loss" in m:  # the big batch's loss, with the weight the metric sums over steps (1 a micro-batch, or its count)
    m["loss"] = (obj * m["loss"][1], m["loss"][1])
  return grads, m
