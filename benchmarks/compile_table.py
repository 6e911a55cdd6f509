"""docs/compile.md's table: BERT-base / -large at sequence 128 and 512 compiled by `bertjax.compile` for TPU and
GPU targets (memory per chip at a stated global batch, the largest global batch that fits with remat none and
full, the roofline estimate). Each finished cell is appended to --out as one JSON line (a rerun skips it), so
the table fills in over several runs; `--render` writes the markdown from those lines.

  PYTHONPATH=<cuda plugin dir>:. python benchmarks/compile_table.py --out=docs/compile_table.jsonl
  python benchmarks/compile_table.py --out=docs/compile_table.jsonl --render > docs/compile.md.table
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax

from bertjax import compile as bc
from configs import mlm

# (preset, sequence, predictions per sequence): BERT's own 20 at 128 and 80 at 512
SHAPES = [("base", 128, 20), ("large", 128, 20), ("base", 512, 80), ("large", 512, 80)]
TARGETS = ["v5e-8", "h100", "v4-8", "v5p-8", "v6e-8", "v5e-256", "a100-80", "h200"]
# stated global batch per chip for the memory column
PER_CHIP = {("base", 128): 32, ("large", 128): 16, ("base", 512): 8, ("large", 512): 4}


def config(preset: str, seq: int, preds: int, batch: int, remat: str):
  c = mlm.get_config()
  c.model.preset, c.model.dtype, c.model.scan_layers, c.model.remat = preset, "bfloat16", True, remat
  c.model.hidden_dropout_prob = c.model.attention_probs_dropout_prob = 0.0
  c.data.vocab_size, c.data.max_seq_length, c.data.short_seq_length = 30522, seq, 0
  c.data.max_predictions_per_seq = preds
  c.training.global_batch_size = batch
  return c


def cell(preset: str, seq: int, preds: int, target_name: str, quick: bool = False) -> dict:
  """One table cell; `quick`: the stated batch only (no search for the largest batch)."""
  target = bc.resolve_target(target_name)
  batch = PER_CHIP[(preset, seq)] * len(target.devices)
  out = {"preset": preset, "seq": seq, "target": target_name, "stated_batch": batch}
  t0 = time.time()
  for remat in ("none", "full"):
    comp = bc.Compiler(config(preset, seq, preds, batch, remat), target)
    first = comp.compile(batch)
    if remat == "none":
      out["at_stated"] = first
      if quick:
        break
    lo, hi = bc.find_max_batch(comp, first["mesh"]["data"] * first["mesh"]["fsdp"], first, resolution=8)
    out[f"max_{remat}"] = lo and {k: lo[k] for k in ("global_batch", "total_bytes", "est_step_s",
                                                     "est_sequences_per_s", "est_bound", "attention_kernel")}
    out[f"refused_{remat}"] = hi and {k: hi[k] for k in ("global_batch", "total_bytes")}
  out["wall_s"] = round(time.time() - t0, 1)
  return out


def render(rows: list[dict]) -> str:
  """The markdown table; the largest-batch columns only when some cell has them."""
  gib = lambda b: "?" if b is None else f"{b / 2**30:.1f}"
  searched = any("max_none" in r for r in rows)
  lines = ["| model | seq | target | global batch | GiB per chip (of) | est. step ms | est. seq/s | kernel | "
           "max batch remat none | max batch remat full | limit |", "|" + "---|" * 11]
  for r in rows:
    a = r["at_stated"]
    mx = lambda k: "not measured" if f"max_{k}" not in r else (
        f"{r[f'max_{k}']['global_batch']}" if r[f"max_{k}"] else "none fits") + (
        f" (refused {r[f'refused_{k}']['global_batch']})" if r[f"refused_{k}"] else "")
    limit = (f"memory at {r['refused_none']['global_batch']} without remat" if r.get("refused_none") else
             "not measured" if "max_none" not in r else "not reached")
    lines.append(f"| BERT-{r['preset']} | {r['seq']} | {r['target']} | {a['global_batch']} | "
                 f"{gib(a['total_bytes'])} ({gib(a['chip_memory_bytes'])}) | "
                 f"{a['est_step_s'] * 1e3:.1f} ({a['est_bound']}) | {a['est_sequences_per_s']:.0f} | "
                 f"{a['attention_kernel']} | {mx('none')} | {mx('full')} | {limit} |" if a.get("est_step_s") else
                 f"| BERT-{r['preset']} | {r['seq']} | {r['target']} | {a['global_batch']} | does not fit | | | | "
                 f"{mx('none')} | {mx('full')} | |")
  if not searched:
    lines = ["|".join(line.split("|")[:9]) + "|" for line in lines]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--render", action="store_true")
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--shapes", default="")
  ap.add_argument("--quick", action="store_true", help="the stated batch only, no largest-batch search")
  a = ap.parse_args()
  done = [json.loads(line) for f in a.out.split(",") if os.path.exists(f) for line in open(f)]
  if a.render:  # several files: a full cell replaces a quick one
    cells = {}
    for r in done:
      key = (r["preset"], r["seq"], r["target"])
      if key not in cells or "max_none" in r:
        cells[key] = r
    order = {(p, s): i for i, (p, s, _) in enumerate(SHAPES)}
    print(render(sorted(cells.values(), key=lambda r: (order[(r["preset"], r["seq"])], TARGETS.index(r["target"])))))
    return
  jax.config.update("jax_platforms", "cpu")
  have = {(r["preset"], r["seq"], r["target"]) for r in done}
  shapes = [s for s in SHAPES if not a.shapes or f"{s[0]}-{s[1]}" in a.shapes.split(",")]
  for preset, seq, preds in shapes:
    for t in a.targets.split(","):
      if (preset, seq, t) in have:
        continue
      r = cell(preset, seq, preds, t, a.quick)
      with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
      print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
