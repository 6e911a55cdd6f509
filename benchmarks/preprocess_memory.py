"""Peak host memory and speed of pretraining preprocessing alone (no model, no training step).

Each measurement runs `PretrainingTask.prepare()` (corpus -> tokenizer -> tokenized documents -> NSP pairs, train
and eval) in a fresh subprocess with an empty cache, and reports that child's `ru_maxrss` against its own
baseline: the same process after importing bertjax and starting the JAX CPU client (which prepare() queries for
the process count), so the XLA runtime is in the baseline, not in the increase. A thread also samples the
anonymous and file-backed parts of the resident set (memory-mapped caches count in ru_maxrss but are page cache).
`num_proc` workers are reported separately (RUSAGE_CHILDREN: the largest worker).

Corpora: `bbc_news` (1x, the default) and the same articles repeated `--scale` times in shuffled order, written
to a local JSON-lines file. The repeats are exact copies: nothing in the pipeline deduplicates documents.

  python benchmarks/preprocess_memory.py                      # this checkout, 1x and 10x, num_proc 1 and 2
  python benchmarks/preprocess_memory.py --code-root /tmp/old # the same measurement of another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RssSampler(threading.Thread):
  """Peaks of anonymous and file-backed resident memory (/proc/self/status, every 20 ms; Linux).

  ru_maxrss counts both; file-backed pages of memory-mapped caches (Arrow, .npy) are clean page cache that the
  kernel reclaims under pressure, anonymous pages are what the process really holds.
  """

  def __init__(self):
    super().__init__(daemon=True)
    self.peak = {"RssAnon": 0, "RssFile": 0}
    self.done = threading.Event()

  def sample(self) -> dict:
    with open("/proc/self/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in self.peak:
          self.peak[key] = max(self.peak[key], int(value.split()[0]))
    return dict(self.peak)

  def run(self):
    while not self.done.wait(0.02):
      self.sample()


def child(args: dict) -> dict:
  """Runs inside the measured subprocess."""
  import resource

  import jax

  from bertjax.tasks.pretraining import PretrainingTask
  from configs import mlm

  if args["load_only"]:  # convert the corpus into the datasets cache, measure nothing
    from bertjax.data import corpus
    corpus.load_documents(args["corpus"], args["cache_dir"])
    return {}
  jax.process_count()  # start the CPU client before the baseline: prepare() asks for the process count
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  sampler = RssSampler()
  base_anon = sampler.sample()["RssAnon"]
  sampler.start()
  config = mlm.get_config()
  config.data.corpus = args["corpus"]
  config.data.cache_dir = args["cache_dir"]
  config.data.num_proc = args["num_proc"]
  task = PretrainingTask(config, args["workdir"])
  t0 = time.perf_counter()
  task.prepare()
  wall = time.perf_counter() - t0
  sampler.done.set()
  rss = sampler.sample()
  n_train, n_eval = len(task.train_pairs["nsp_labels"]), len(task.eval_pairs["nsp_labels"])
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return {"baseline_mib": base / 1024, "peak_mib": peak / 1024, "increase_mib": (peak - base) / 1024,
          "workers_peak_mib": workers / 1024, "anon_baseline_mib": base_anon / 1024,
          "anon_peak_mib": rss["RssAnon"] / 1024, "file_peak_mib": rss["RssFile"] / 1024, "wall_s": wall,
          "train_pairs": n_train, "eval_pairs": n_eval, "pairs_per_s": (n_train + n_eval) / wall}


def write_repeated(src: str, dst: str, times: int, seed: int = 0) -> int:
  with open(src, encoding="utf-8") as f:
    lines = [ln for ln in f if ln.strip()]
  rows = lines * times
  random.Random(seed).shuffle(rows)
  with open(dst, "w", encoding="utf-8") as f:
    f.writelines(rows)
  return len(rows)


def measure(code_root: str, corpus: str, num_proc: int, scratch: str, corpus_cached: bool) -> dict:
  """One cold prepare() in a fresh child; `corpus_cached`: the corpus's JSON -> Arrow conversion done before."""
  run_dir = tempfile.mkdtemp(dir=scratch)
  args = {"corpus": corpus, "num_proc": num_proc, "cache_dir": os.path.join(run_dir, "cache"),
          "workdir": os.path.join(run_dir, "work"), "load_only": False}
  env = dict(os.environ, PYTHONPATH=f"{code_root}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
  env.pop("XLA_FLAGS", None)
  for load_only in [True] * corpus_cached + [False]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps({**args, "load_only": load_only})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
      raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--code-root", default=REPO, help="checkout whose bertjax is measured (configs/ from there too)")
  p.add_argument("--scale", type=int, default=10)
  p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
  p.add_argument("--scratch", default="", help="folder for corpora and caches (default: a temp folder)")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    print(json.dumps(child(json.loads(a.child))))
    return
  scratch = a.scratch or tempfile.mkdtemp(prefix="bertjax-preprocess-")
  sys.path.insert(0, a.code_root)
  from bertjax.data import corpus  # noqa: E402 (only to materialise the BBC JSON lines)
  bbc = corpus.bbc_news_jsonl(os.path.join(scratch, "bbc"))
  big = os.path.join(scratch, f"bbc_x{a.scale}.jsonl")
  n_docs = write_repeated(bbc, big, a.scale)
  print(f"code {a.code_root}; corpora: bbc_news and {big} ({n_docs} documents)")
  results = []
  for cached in (False, True):
    print("corpus conversion (JSON -> Arrow by datasets) " + ("done before, not measured" if cached else "included"))
    for name, spec in (("1x", "bbc_news"), (f"{a.scale}x", big)):
      for num_proc in a.num_proc:
        r = {"corpus": name, "num_proc": num_proc, "corpus_cached": cached,
             **measure(a.code_root, spec, num_proc, scratch, cached)}
        results.append(r)
        report(r)
    by = {(r["corpus"], r["num_proc"]): r for r in results if r["corpus_cached"] == cached}
    for num_proc in a.num_proc:
      one, big_r = by[("1x", num_proc)], by[(f"{a.scale}x", num_proc)]
      print(f"  num_proc={num_proc}: {a.scale}x / 1x peak = {big_r['peak_mib'] / one['peak_mib']:.2f} (increase over "
            f"baseline {big_r['increase_mib']:.0f} vs {one['increase_mib']:.0f} MiB; anonymous peak "
            f"{big_r['anon_peak_mib']:.0f} vs {one['anon_peak_mib']:.0f} MiB)")
  print(json.dumps(results))


def report(r: dict) -> None:
  print(f"  {r['corpus']:>4} num_proc={r['num_proc']}: peak {r['peak_mib']:.0f} MiB (baseline {r['baseline_mib']:.0f}, "
        f"+{r['increase_mib']:.0f}; anonymous {r['anon_baseline_mib']:.0f} -> {r['anon_peak_mib']:.0f}, file-backed "
        f"peak {r['file_peak_mib']:.0f}; largest worker {r['workers_peak_mib']:.0f}) | {r['train_pairs']} train + "
        f"{r['eval_pairs']} eval pairs in {r['wall_s']:.1f} s = {r['pairs_per_s']:.0f} pairs/s", flush=True)


if __name__ == "__main__":
  main()
