"""Pretraining real-token throughput: bertjax vs transformers' BertForPreTraining (PyTorch), presets in one run.

  python benchmarks/pretrain_throughput.py --presets=tiny,mini,base --batch=32 --seq=128 --steps=10
  python benchmarks/pretrain_throughput.py --presets=mini --lengths=default_corpus   # the default run's pairs,
                                                                                    # unpacked and packed

Both sides run a full training step (forward, backward, AdamW) on the same random token ids with 15% masked
positions. Rows hold `--seq` tokens, or, with `--lengths=default_corpus`, the lengths of a random sample of the
default run's NSP pairs (BBC News, `configs/mlm.py`; built or read from the bertjax cache), the rest padding.
Throughput counts real (non-pad) tokens only. bertjax pads every batch to `--seq` and computes MLM logits only
at the masked positions (its design); transformers runs as its users run it: `BertForPreTraining` with
`labels` (logits at every position), each batch padded to its longest row (`DataCollatorForLanguageModeling`'s
dynamic padding). With `--lengths=default_corpus` bertjax also runs packed (`--packing=4`, what
`data.packing=True` does): `--batch` rows drawn from the default corpus packed first-fit with at most 4 pairs a
row, segment ids, restarting position ids and NSP at each pair's [CLS]; transformers runs unpacked, as its users
run it, and each ratio divides real tokens/s by real tokens/s. MFU uses FLOPs/token = 6N + 12*L*d*T
(N = non-embedding parameters) against a float32 matmul peak measured in this run. Each side reports its median
step time over `--steps` steps (after a warm-up step), so that a slow spell of a shared machine does not move the
ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accelerator import finite, make_batch, matmul_peak, train_step_fn  # noqa: E402  (benchmarks/accelerator.py)

from bertjax.models.bert import BertConfig  # noqa: E402


def default_corpus_pairs(seq: int) -> dict:
  """The default pretraining run's NSP pairs (configs/mlm.py: BBC News) at length `seq`, built or read from the
  bertjax cache."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import mlm
  from bertjax.tasks.pretraining import PretrainingTask
  config = mlm.get_config()
  config.data.max_seq_length = seq
  task = PretrainingTask(config, "/tmp/bertjax_throughput_unused")
  task.prepare()
  lengths = np.asarray(task.train_pairs["lengths"])
  print(f"default corpus: {len(lengths):,} pairs at length {seq}; real tokens {lengths.mean() / seq:.1%} of the "
        f"padded rows")
  return task.train_pairs


def sample_lengths(pairs: dict, n: int, seed: int = 0) -> np.ndarray:
  """Real lengths of `n` random pairs of `pairs` (`default_corpus_pairs`)."""
  return np.random.RandomState(seed).choice(np.asarray(pairs["lengths"]), n, replace=False)


def packed_batch(cfg: BertConfig, pairs: dict, b: int, p: int, k: int, seed: int = 0) -> dict:
  """`b` random rows of the default corpus packed as `data.packing=True` packs it (`pack_pairs`: first-fit, at
  most `k` pairs per row), with the pipeline's segment ids, restarting position ids, each pair's [CLS] column and
  NSP label; random token ids at the real positions (as `make_batch`) and `p` masked positions per row."""
  import jax.numpy as jnp
  from bertjax.data.pretraining import pack_pairs, padding_share
  packed = pack_pairs(pairs, k)
  width = packed["input_ids"].shape[1]
  print(f"packed (at most {k} pairs per row): {len(packed['lengths']):,} rows; padding "
        f"{padding_share(np.asarray(pairs['lengths']), width):.1%} unpacked -> "
        f"{padding_share(packed['lengths'], width):.1%} packed")
  r = np.random.RandomState(seed)
  rows = r.choice(len(packed["lengths"]), b, replace=False)
  seg = packed["segment_ids"][rows]
  real = seg > 0
  ids = np.where(real, r.randint(5, cfg.vocab_size, seg.shape), 0).astype(np.int32)
  cls = packed["cls_positions"][rows]
  pos, weights = [], []
  for i in range(b):
    cand = np.setdiff1d(np.flatnonzero(real[i]), cls[i])
    pick = np.sort(r.choice(cand, min(p, len(cand)), replace=False))
    pos.append(np.concatenate([pick, np.zeros(p - len(pick), np.int64)]))
    weights.append(np.arange(p) < len(pick))
  pos = np.stack(pos).astype(np.int32)
  batch = {"input_ids": ids, "token_type_ids": packed["token_type_ids"][rows], "attention_mask": real.astype(np.int32),
           "masked_positions": pos, "masked_labels": np.take_along_axis(ids, pos, 1),
           "masked_weights": np.stack(weights).astype(np.float32), "segment_ids": seg, "position_ids": packed["position_ids"][rows], "cls_positions": cls,
           "nsp_labels": packed["nsp_labels"][rows], "nsp_weights": packed["nsp_slots"][rows].astype(np.float32)}
  return {key: jnp.asarray(v) for key, v in batch.items()}


def torch_step_fn(cfg: BertConfig, batch: dict):
  """One training step of transformers' BertForPreTraining + torch AdamW on `batch` per call (None without torch)."""
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
  longest = int(np.asarray(batch["attention_mask"]).sum(1).max())  # dynamic padding: the longest row
  cut = lambda k: torch.tensor(np.asarray(batch[k])[:, :longest], dtype=torch.long)
  ids = cut("input_ids")
  labels = torch.full_like(ids, -100)
  rows = torch.arange(ids.shape[0])[:, None]
  pos = torch.tensor(np.asarray(batch["masked_positions"]), dtype=torch.long)
  labels[rows, pos] = torch.tensor(np.asarray(batch["masked_labels"]), dtype=torch.long)
  inputs = dict(input_ids=ids, token_type_ids=cut("token_type_ids"), attention_mask=cut("attention_mask"),
                labels=labels, next_sentence_label=torch.tensor(np.asarray(batch["nsp_labels"]), dtype=torch.long))

  def one():
    opt.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    opt.step()

  return one


def median_step(run, steps: int) -> float:
  """Median seconds per step of `run` (a callable doing one step; a JAX loss it returns is waited for inside the
  timing), after one warm-up step. The median keeps a slow spell of a shared machine out of the figure. The
  runs are timed one after another, not interleaved: interleaved one step each, BERT-base's bertjax step took
  4.91 s after a PyTorch step against 3.7-3.9 s alone (probably PyTorch's OpenMP threads still spinning)."""
  def timed():
    t = time.perf_counter()
    out = run()
    if out is not None:
      finite(out)
    return time.perf_counter() - t

  timed()
  return float(np.median([timed() for _ in range(steps)]))


def run_preset(preset: str, a, peak: float, lengths, pairs) -> None:
  vocab = a.vocab or 30522
  cfg = BertConfig.from_preset(preset, vocab_size=vocab, dtype=a.dtype)
  batch = make_batch(cfg, a.batch, a.seq, a.max_predictions, lengths=lengths)
  real = {"bertjax": int(np.asarray(batch["attention_mask"]).sum())}
  bertjax_run, _, n = train_step_fn(cfg, batch)
  runs = {"bertjax": bertjax_run}
  if a.explain:
    nodrop = dataclasses.replace(cfg, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runs["bertjax_nodrop"] = train_step_fn(nodrop, batch)[0]
  if pairs is not None and a.packing:
    packed = packed_batch(cfg, pairs, a.batch, a.max_predictions, a.packing)
    real["bertjax_packed"] = int(np.asarray(packed["attention_mask"]).sum())
    runs["bertjax_packed"] = train_step_fn(cfg, packed)[0]
  torch_run = None if a.no_torch else torch_step_fn(cfg, batch)
  if torch_run is not None:
    runs["transformers"] = torch_run
    real["transformers"] = real["bertjax"]  # the same unpacked rows
  med = {name: median_step(run, a.steps) for name, run in runs.items()}
  flops_per_token = 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq
  print(f"[{preset}] L={cfg.num_hidden_layers}, d={cfg.hidden_size}, non-embedding N={n:,} | batch {a.batch} x seq "
        f"{a.seq} | vocab {vocab} | median of {a.steps} steps")
  labels = {"bertjax": "bertjax", "bertjax_packed": f"bertjax packed (<= {a.packing} pairs/row)",
            "transformers": "transformers"}
  for name, label in labels.items():
    if name not in med:
      continue
    tps = real[name] / med[name]
    extra = f"  (PyTorch {__import__('torch').__version__}, CPU)" if name == "transformers" else ""
    print(f"  {label + ':':32s} {med[name] * 1e3:9.1f} ms/step  {real[name]:6,} real tokens "
          f"({1 - real[name] / (a.batch * a.seq):5.1%} padding)  {tps:10,.0f} real tokens/s  "
          f"MFU {tps * flops_per_token / peak:6.1%}{extra}")
  if torch_run is None:
    print("  transformers: not measured (torch/transformers not installed or --no_torch)")
  else:
    ref = real["transformers"] / med["transformers"]
    for name in ("bertjax", "bertjax_packed"):
      if name in med:
        print(f"  ratio {labels[name]} / transformers real tokens/s: {real[name] / med[name] / ref:.2f}x")
  if a.explain:
    explain(cfg, a, med["bertjax"], med["bertjax_nodrop"], peak)


def gemm_rate(m: int, d: int, f: int, reps: int = 5) -> float:
  """FLOP/s of one encoder layer's matmuls at m tokens (Q, K, V, output d x d; FFN d x f and f x d), each with its
  two backward products (input and weight gradients), as XLA runs them here."""
  import jax
  import jax.numpy as jnp
  shapes = [(m, d, d)] * 4 + [(m, d, f), (m, f, d)]
  key = jax.random.key(0)
  ops, flops = [], 0
  for i, (mm, k, n) in enumerate(shapes):
    x, w, g = (jax.random.normal(jax.random.fold_in(key, 3 * i + j), s, jnp.float32)
               for j, s in enumerate(((mm, k), (k, n), (mm, n))))
    ops.append((x, w, g))
    flops += 3 * 2 * mm * k * n

  @jax.jit
  def layer(ops):
    return [(x @ w, g @ w.T, x.T @ g) for x, w, g in ops]

  jax.block_until_ready(layer(ops))
  t = time.perf_counter()
  for _ in range(reps):
    out = layer(ops)
  jax.block_until_ready(out)
  return flops * reps / (time.perf_counter() - t)


def explain(cfg: BertConfig, a, dt: float, dt0: float, peak: float) -> None:
  """What limits bertjax's step: the matmul rate its own shapes allow, and the cost of dropout."""
  rate = gemm_rate(a.batch * a.seq, cfg.hidden_size, cfg.intermediate_size)
  print(f"  limits: this preset's layer matmuls (forward + both gradients, {a.batch * a.seq} tokens) run at "
        f"{rate / 1e9:,.1f} GFLOP/s = {rate / peak:.0%} of the {peak / 1e9:,.1f} GFLOP/s peak; "
        f"without dropout the step takes {dt0 * 1e3:,.1f} ms ({1 - dt0 / dt:.1%} less)")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--presets", default="tiny,mini,base")
  ap.add_argument("--preset", default=None, help="one preset (the same as --presets=NAME)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--max_predictions", type=int, default=20)
  ap.add_argument("--vocab", type=int, default=None, help="default 30522")
  ap.add_argument("--lengths", default="full", help="full | default_corpus")
  ap.add_argument("--packing", type=int, default=4,
                  help="with --lengths=default_corpus, also time bertjax on packed rows of the default corpus, at "
                       "most this many pairs per row (data.max_segments_per_row); 0: no packed run")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=10, help="timed steps of each run (the median is reported)")
  ap.add_argument("--no_torch", action="store_true")
  ap.add_argument("--explain", action="store_true",
                  help="also measure what limits the step: the matmul rate at the preset's own layer shapes and the "
                       "step time without dropout")
  a = ap.parse_args()
  import jax
  pairs = default_corpus_pairs(a.seq) if a.lengths == "default_corpus" else None
  lengths = None if pairs is None else sample_lengths(pairs, a.batch)
  peak = matmul_peak(2048, 10, np.float32)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; measured float32 matmul peak "
        f"{peak / 1e9:,.1f} GFLOP/s; dtype {a.dtype}")
  for preset in (a.preset or a.presets).split(","):
    run_preset(preset, a, peak, lengths, pairs)


if __name__ == "__main__":
  main()
