"""BERT-base pretraining-step throughput and MFU on one accelerator, for every attention kernel it has.

  python benchmarks/accelerator.py            # on a GPU / TPU machine: BERT-base, seq 128 and 512, bfloat16
  python benchmarks/accelerator.py --smoke    # a tiny CPU run (seconds) that the test suite runs

Each row is one full training step of the Trainer's own step function (`bertjax.train.step`: forward, backward,
AdamW, divergence guard) with the pretraining task's loss (MLM at 15% of the positions + NSP) on one device, attention dropout 0 (what lets the fused kernels run), hidden dropout 0.1.
MFU = model FLOP/s over the chip's peak dense bf16 FLOP/s (a table by `device_kind`) and over a large bf16 matmul
measured in this run. Model FLOPs per sequence: 6 * N * T (N = encoder parameters without the embeddings)
+ 12 * L * d * T^2 (attention scores and values, forward + backward) + 6 * P * (d^2 + d * V) (the MLM head at P
masked positions). The smoke mode runs float32 and reports MFU against the measured float32 matmul only.
It imports only jax, flax, optax, numpy and bertjax modules made of those (a lent machine may have nothing else)
and starts no new row after `--budget_s`, so that it ends in under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bertjax.models.bert import BertConfig, train_flops_per_sequence  # noqa: E402
from bertjax.models.heads import BertForPreTraining  # noqa: E402
from bertjax.tasks import losses  # noqa: E402  (jax, optax and the numpy-only loader)
from bertjax.tasks.losses import pretraining_weights  # noqa: E402
from bertjax.train.step import make_train_step  # noqa: E402  (jax, optax, flax: the Trainer's step)

# Peak dense bfloat16 TFLOP/s per chip (vendor data sheets, without sparsity), matched as substrings of
# `device_kind`, most specific first.
PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
    ("TPU7x", 2307.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0), ("TPU v2", 45.0),
]
KERNELS = {"gpu": ("xla", "cudnn"), "tpu": ("xla", "splash"), "cpu": ("xla",)}


def chip_peak(kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None


def matmul_peak(n: int, reps: int, dtype=jnp.bfloat16) -> float:
  """Measured FLOP/s of an n x n x n matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  scale = 1 / np.sqrt(n)  # keeps the chained products finite
  f = jax.jit(lambda x: ((x @ x) * scale).astype(dtype))
  f(a).block_until_ready()
  t = time.perf_counter()
  out = a
  for _ in range(reps):
    out = f(out)  # chained, so no call can be skipped
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t)


def make_batch(cfg: BertConfig, b: int, t: int, p: int, seed: int = 0, lengths=None) -> dict[str, jax.Array]:
  """A random pretraining batch [b, t]; rows are full unless `lengths` [b] gives each row's real tokens (the rest
  is padding); `p` masked positions per row among the real tokens."""
  r = np.random.RandomState(seed)
  lengths = np.full(b, t) if lengths is None else np.minimum(np.asarray(lengths), t)
  real = np.arange(t)[None] < lengths[:, None]
  ids = np.where(real, r.randint(5, cfg.vocab_size, (b, t)), 0).astype(np.int32)
  types = ((np.arange(t)[None] >= lengths[:, None] // 2) & real).astype(np.int32)
  pos = np.stack([np.sort(r.choice(np.arange(1, n), min(p, n - 1), replace=False)).tolist()
                  + [0] * (p - min(p, n - 1)) for n in lengths]).astype(np.int32)
  batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": real.astype(np.int32),
           "masked_positions": pos, "masked_labels": np.take_along_axis(ids, pos, 1),
           "masked_weights": (np.arange(p)[None] < np.minimum(p, lengths - 1)[:, None]).astype(np.float32),
           "nsp_labels": r.randint(0, 2, (b,)).astype(np.int32), "nsp_weights": np.ones(b, np.float32)}
  return {k: jnp.asarray(v) for k, v in batch.items()}


def train_step_fn(cfg: BertConfig, batch: dict):
  """(run one step, compile seconds, non-embedding parameter count) for the Trainer's own train step
  (`bertjax.train.step.make_train_step`: gradient, AdamW update, divergence guard, metrics) on the pretraining
  task's own loss (`bertjax.tasks.losses.pretraining`), jitted for one device; each call of the first dispatches
  one step on `batch` (a new dropout key each time) and returns its loss. A packed batch (`segment_ids`,
  `position_ids`, `cls_positions`, `nsp_weights` [B, k]) runs the model's packed path."""
  model = BertForPreTraining(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  lr = 1e-4
  tx = optax.adamw(lr, weight_decay=0.01)
  opt = tx.init(params)
  step = make_train_step(graphdef, lambda p, frozen: p, pretraining_loss, pretraining_weights, tx,
                         optax.constant_schedule(lr), accum=1)
  rng = jax.random.key_data(jax.random.key(0))
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 2)).lower(params, {}, opt, batch, np.int32(0), rng).compile()
  compile_s = time.perf_counter() - t0
  n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
          if "embeddings" not in jax.tree_util.keystr(path) and "'bert'" in jax.tree_util.keystr(path))
  state = {"params": params, "opt": opt, "i": 0}

  def run_one() -> jax.Array:
    state["params"], state["opt"], m = compiled(state["params"], {}, state["opt"], batch, np.int32(state["i"]), rng)
    state["i"] += 1
    total, count = m["loss"]
    return total / count  # not waited for: steps queue up on the device

  return run_one, compile_s, n


def pretraining_loss(model, batch, rngs, deterministic):
  return losses.pretraining(model, batch, rngs, deterministic, {})  # no per-kind metrics: no masked_kinds


def finite(loss: jax.Array) -> float:
  """Wait for `loss`; raise when it is not finite."""
  value = float(loss)
  if not np.isfinite(value):
    raise FloatingPointError(f"loss {value}")
  return value


def train_step_time(cfg: BertConfig, batch: dict, steps: int) -> tuple[float, float, int]:
  """(seconds per step, compile seconds, non-embedding parameter count) of a jitted AdamW step."""
  run_one, compile_s, n = train_step_fn(cfg, batch)
  finite(run_one())  # warm-up
  t0 = time.perf_counter()
  for _ in range(steps):
    loss = run_one()
  finite(loss)
  return (time.perf_counter() - t0) / steps, compile_s, n


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny model and shapes (CPU, seconds)")
  ap.add_argument("--preset", default=None)
  ap.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 128,512)")
  ap.add_argument("--tokens_per_batch", type=int, default=None, help="batch = this / seq (default 16384)")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--dtype", default=None, help="compute dtype (default bfloat16; float32 with --smoke)")
  ap.add_argument("--kernels", default=None, help="comma-separated attention paths (default: all on this platform)")
  ap.add_argument("--budget_s", type=float, default=240.0, help="start no new row after this many seconds")
  a = ap.parse_args(argv)
  start = time.perf_counter()
  dev = jax.devices()[0]
  smoke = a.smoke
  preset = a.preset or ("tiny" if smoke else "base")
  seqs = [int(s) for s in (a.seqs or ("16" if smoke else "128,512")).split(",")]
  dtype = a.dtype or ("float32" if smoke else "bfloat16")  # CPUs emulate bfloat16 matmuls slowly
  tokens = a.tokens_per_batch or (64 if smoke else 16384)
  steps = a.steps or (2 if smoke else 10)
  vocab = 512 if smoke else 30522
  kernels = a.kernels.split(",") if a.kernels else list(KERNELS.get(dev.platform, ("xla",)))
  peak = chip_peak(dev.device_kind) if dtype != "float32" else None  # the table holds bf16 peaks
  mm_n, mm_reps = (256, 3) if smoke else (8192, 20)
  measured = matmul_peak(mm_n, mm_reps, jnp.dtype(dtype))
  print(f"device: {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s), JAX {jax.__version__}; "
        f"one device used")
  table = ("not used (float32)" if dtype == "float32" else "unknown for this device_kind" if peak is None
           else f"{peak / 1e12:,.0f} TFLOP/s (table)")
  print(f"peak bf16: {table}; "
        f"measured {mm_n}^3 {dtype} matmul: {measured / 1e12:,.3f} TFLOP/s")
  print(f"model: {preset}, vocab {vocab}, dtype {dtype}, AdamW, attention dropout 0, {steps} timed steps")
  header = f"{'seq':>5} {'batch':>6} {'attention':>9} {'compile s':>9} {'ms/step':>9} {'seq/s':>10} " \
           f"{'MFU(peak)':>9} {'MFU(matmul)':>11}"
  print(header)
  rows = []
  for t in seqs:
    b = max(1, tokens // t)
    p = max(1, round(0.15 * t))
    for kernel in kernels:
      if time.perf_counter() - start > a.budget_s:
        print(f"{t:>5} {b:>6} {kernel:>9}  skipped: the {a.budget_s:.0f} s budget is spent")
        continue
      cfg = BertConfig.from_preset(preset, vocab_size=vocab, dtype=dtype, max_position_embeddings=max(512, t),
                                   attention_probs_dropout_prob=0.0, attention=kernel)
      batch = make_batch(cfg, b, t, p)
      try:
        dt, compile_s, n = train_step_time(cfg, batch, steps)
      except Exception as e:  # a kernel this machine's JAX / driver cannot run: report it, go on
        print(f"{t:>5} {b:>6} {kernel:>9}  failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}")
        continue
      fps = train_flops_per_sequence(cfg, n, t, p) * b / dt
      row = dict(seq=t, batch=b, attention=kernel, compile_s=compile_s, step_s=dt, seq_per_s=b / dt,
                 mfu_peak=None if peak is None else fps / peak, mfu_matmul=fps / measured)
      rows.append(row)
      mfu_peak = "-" if peak is None else f"{row['mfu_peak']:.1%}"
      print(f"{t:>5} {b:>6} {kernel:>9} {compile_s:>9.1f} {dt * 1e3:>9.1f} {b / dt:>10,.1f} {mfu_peak:>9} "
            f"{row['mfu_matmul']:>11.1%}")
  print(f"total {time.perf_counter() - start:.0f} s")
  return rows


if __name__ == "__main__":
  main()
