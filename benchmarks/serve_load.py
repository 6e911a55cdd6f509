"""Bounded loopback load test of `bertjax.serve`: requests/s, p50 / p99 latency and errors per concurrency.

    python benchmarks/serve_load.py --model=<export | checkpoint> [--requests=1000] [--concurrency=1,8,32]
        [--workers=1,2] [--route=/predict | /embed] [--checkout=<another bertjax checkout, e.g. an older commit>]

For each worker count it starts `python -m bertjax.serve` (from this checkout, or `--checkout`) on a free loopback
port with an API key, waits until it answers GET /health, then sends `--requests` one-sentence POST requests to
`--route` (/predict; /embed for a sentence_embedding model) (SST-2 dev sentences, cycled) from N client threads for
each concurrency N, over keep-alive connections. Where the server has /metrics, it is scraped during and after each
round and its counter of 200s on that route must grow by the requests sent. The server is stopped with SIGTERM and
must exit 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

KEY = "load-test-key"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, bytes]:
  c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  c.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
  r = c.getresponse()
  out = r.status, r.read()
  c.close()
  return out


def _route_count(port: int, route: str) -> float | None:
  try:
    status, body = _get(port, "/metrics")
  except OSError:
    return None
  if status != 200:
    return None
  m = re.search(rf'bertjax_requests_total\{{route="{re.escape(route)}",status="200"\}} (\S+)', body.decode())
  return float(m.group(1)) if m else 0.0


def run_server(a, workers: int, texts: list[str]) -> dict:
  port = _free_port()
  env = dict(os.environ, BERTJAX_API_KEYS=KEY, PYTHONPATH=a.checkout)
  cmd = [sys.executable, "-m", "bertjax.serve", f"--model={a.model}", f"--port={port}", "--max_batch_size=64",
         "--max_wait_ms=2"] + ([f"--workers={workers}"] if workers > 1 else [])
  proc = subprocess.Popen(cmd, cwd=a.checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while True:
    try:
      if _get(port, "/health")[0] == 200:
        break
    except OSError:
      pass
    if proc.poll() is not None or time.time() - t0 > 600:
      raise SystemExit(f"server did not come up: {proc.stderr.read()[-2000:]}")
    time.sleep(0.5)
  if workers > 1:  # every worker loads its own model: wait until all say ready
    while (m := _get(port, "/metrics")) and f"bertjax_ready {float(workers)}" not in m[1].decode():
      time.sleep(1)
  local = threading.local()

  def post(text: str) -> tuple[int | str, float]:
    """(HTTP status, or the client-side exception's name; seconds)."""
    if not hasattr(local, "conn"):
      local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.perf_counter()
    try:
      local.conn.request("POST", a.route, body=json.dumps({"text": text}),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
      r = local.conn.getresponse()
      r.read()
      status: int | str = r.status
    except (OSError, http.client.HTTPException) as e:
      local.conn.close()
      local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
      status = type(e).__name__
    return status, time.perf_counter() - t

  results = {}
  try:
    for c in (int(x) for x in a.concurrency.split(",")):
      before = _route_count(port, a.route)
      scraped_during = []
      stop = threading.Event()

      def scrape():
        while not stop.wait(0.5):
          scraped_during.append(_route_count(port, a.route))

      scraper = threading.Thread(target=scrape, daemon=True)
      scraper.start()
      t0 = time.perf_counter()
      with ThreadPoolExecutor(c) as pool:
        out = list(pool.map(post, (texts[i % len(texts)] for i in range(a.requests))))
      wall = time.perf_counter() - t0
      stop.set()
      scraper.join()
      after = _route_count(port, a.route)
      lat = np.array([x[1] for x in out]) * 1000
      results[c] = {"requests": a.requests, "requests_per_s": round(a.requests / wall, 1),
                    "p50_ms": round(float(np.percentile(lat, 50)), 1),
                    "p99_ms": round(float(np.percentile(lat, 99)), 1),
                    "errors": sum(s != 200 for s, _ in out)}
      if results[c]["errors"]:  # which: an HTTP status from the server, or an exception on the client's side
        kinds = [str(s) for s, _ in out if s != 200]
        results[c]["error_kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
      if after is not None:
        results[c]["metrics_counted"] = int(after - before)
        results[c]["scrapes_during"] = len([x for x in scraped_during if x is not None])
      print(f"workers {workers}, concurrency {c}: {json.dumps(results[c])}", flush=True)
  finally:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  return {"exit_code": rc, "by_concurrency": results}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", required=True)
  ap.add_argument("--requests", type=int, default=1000)
  ap.add_argument("--concurrency", default="1,8,32")
  ap.add_argument("--workers", default="1,2")
  ap.add_argument("--route", default="/predict", choices=("/predict", "/embed"),
                  help="/embed for a sentence_embedding model")
  ap.add_argument("--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  ap.add_argument("--glue_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
  a = ap.parse_args()
  a.model, a.checkout = os.path.abspath(a.model), os.path.abspath(a.checkout)
  lines = open(os.path.join(a.glue_dir, "SST-2", "dev.tsv"), encoding="utf-8").read().splitlines()[1:]
  texts = [line.split("\t")[0] for line in lines]
  report = {str(w): run_server(a, int(w), texts) for w in a.workers.split(",")}
  print(json.dumps({"model": a.model, "route": a.route, "checkout": a.checkout, "by_workers": report}, indent=2))


if __name__ == "__main__":
  main()
