"""Pretraining train-step throughput: bertjax vs transformers' BertForPreTraining (PyTorch) on the same shapes.

  python benchmarks/pretrain_throughput.py --preset=mini --batch=32 --seq=128 --steps=10

Both sides run a full training step (forward, backward, AdamW update) on the same random batch shape with
15% masked positions. bertjax computes MLM logits only at the `max_predictions` masked positions (its
design); transformers computes them at every position (its `BertForPreTraining` API). MFU uses
FLOPs/token = 6N + 12*L*d*T (N = non-embedding parameters) against a matmul peak measured in this run.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bertjax.models.bert import BertConfig
from bertjax.models.heads import BertForPreTraining


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """Measured float32 matmul FLOP/s of the default JAX device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t)


def make_batch(cfg: BertConfig, b: int, t: int, p: int, seed: int = 0) -> dict[str, np.ndarray]:
  r = np.random.RandomState(seed)
  ids = r.randint(5, cfg.vocab_size, (b, t)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, t // 2:] = 1
  pos = np.sort(np.stack([r.choice(np.arange(1, t), p, replace=False) for _ in range(b)]), 1).astype(np.int32)
  return {"input_ids": ids, "token_type_ids": types, "attention_mask": np.ones_like(ids),
          "masked_positions": pos, "masked_labels": np.take_along_axis(ids, pos, 1),
          "nsp_labels": r.randint(0, 2, (b,)).astype(np.int32)}


def bertjax_step_time(cfg: BertConfig, batch: dict, steps: int) -> tuple[float, int]:
  model = BertForPreTraining(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt = tx.init(params)

  def loss_fn(p, b, key):
    m = nnx.merge(graphdef, p)
    mlm, nsp = m(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"],
                 deterministic=False, rngs=nnx.Rngs(dropout=key))
    return (optax.softmax_cross_entropy_with_integer_labels(mlm, b["masked_labels"]).mean()
            + optax.softmax_cross_entropy_with_integer_labels(nsp, b["nsp_labels"]).mean())

  def step(p, o, b, key):
    loss, g = jax.value_and_grad(loss_fn)(p, b, key)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(0)
  params, opt, loss = step(params, opt, b, key)  # compile
  loss.block_until_ready()
  t = time.perf_counter()
  for i in range(steps):
    params, opt, loss = step(params, opt, b, jax.random.fold_in(key, i))
  loss.block_until_ready()
  dt = (time.perf_counter() - t) / steps
  n_nonembed = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                   if "embeddings" not in jax.tree_util.keystr(path))
  return dt, n_nonembed


def torch_step_time(cfg: BertConfig, batch: dict, steps: int) -> float | None:
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                   num_hidden_layers=cfg.num_hidden_layers,
                                   num_attention_heads=cfg.num_attention_heads,
                                   intermediate_size=cfg.intermediate_size,
                                   max_position_embeddings=cfg.max_position_embeddings)
  model = transformers.BertForPreTraining(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  labels = torch.full_like(ids, -100)
  rows = torch.arange(ids.shape[0])[:, None]
  pos = torch.tensor(batch["masked_positions"], dtype=torch.long)
  labels[rows, pos] = torch.tensor(batch["masked_labels"], dtype=torch.long)
  inputs = dict(input_ids=ids, token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long), labels=labels,
                next_sentence_label=torch.tensor(batch["nsp_labels"], dtype=torch.long))

  def one():
    opt.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    opt.step()

  one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return (time.perf_counter() - t) / steps


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="mini")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--max_predictions", type=int, default=20)
  ap.add_argument("--vocab", type=int, default=30522)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--no_torch", action="store_true")
  a = ap.parse_args()
  cfg = BertConfig.from_preset(a.preset, vocab_size=a.vocab, dtype=a.dtype)
  batch = make_batch(cfg, a.batch, a.seq, a.max_predictions)
  tokens = a.batch * a.seq
  peak = matmul_peak()
  dt, n = bertjax_step_time(cfg, batch, a.steps)
  flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq
  tps = tokens / dt
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | preset {a.preset} "
        f"(L={cfg.num_hidden_layers}, d={cfg.hidden_size}, non-embedding N={n:,}) | batch {a.batch} x seq {a.seq} "
        f"| vocab {a.vocab} | dtype {a.dtype}")
  print(f"measured matmul peak: {peak / 1e9:,.1f} GFLOP/s; FLOPs/token = 6N + 12*L*d*T = {flops_per_token / 1e6:,.1f} M")
  print(f"bertjax:      {dt * 1e3:8.1f} ms/step  {tps:10,.0f} tokens/s  MFU {tps * flops_per_token / peak:6.1%}")
  ref = None if a.no_torch else torch_step_time(cfg, batch, a.steps)
  if ref is None:
    print("transformers: not measured (torch/transformers not installed or --no_torch)")
    return
  print(f"transformers: {ref * 1e3:8.1f} ms/step  {tokens / ref:10,.0f} tokens/s  "
        f"MFU {tokens / ref * flops_per_token / peak:6.1%}  (PyTorch {__import__('torch').__version__}, CPU)")
  print(f"ratio bertjax / transformers tokens/s: {ref / dt:.2f}x")


if __name__ == "__main__":
  main()
