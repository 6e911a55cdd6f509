"""Bounded loopback load test of `bertjax.serve`: requests/s, p50 / p99 latency and errors per concurrency.

    python benchmarks/serve_load.py --model=<export folder | checkpoint> [--requests=2000] [--concurrency=1,8,32]

Starts the server in this process on a free loopback port, warms it up (every bucket shape compiled), then sends
`--requests` one-sentence POST /predict requests (SST-2 dev sentences, cycled) from N client threads for each
concurrency N, and stops the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", required=True)
  ap.add_argument("--requests", type=int, default=2000)
  ap.add_argument("--concurrency", default="1,8,32")
  ap.add_argument("--glue_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue"))
  a = ap.parse_args()
  from bertjax import predict, serve
  p = predict.load(a.model, batch_size=64)
  lines = open(os.path.join(a.glue_dir, "SST-2", "dev.tsv"), encoding="utf-8").read().splitlines()[1:]
  texts = [l.split("\t")[0] for l in lines]
  server = serve.make_server(p, port=0, max_batch_size=64, max_wait_ms=2)
  port = server.server_address[1]
  threading.Thread(target=server.serve_forever, daemon=True).start()
  local = threading.local()

  def post(text: str) -> tuple[int, float]:
    if not hasattr(local, "conn"):
      local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.perf_counter()
    local.conn.request("POST", "/predict", body=json.dumps({"text": text}),
                       headers={"Content-Type": "application/json"})
    r = local.conn.getresponse()
    r.read()
    return r.status, time.perf_counter() - t

  print(f"compiled {p.warmup()} batch shapes", flush=True)
  results = {}
  try:
    for c in (int(x) for x in a.concurrency.split(",")):
      batches0 = server.batcher.batches
      t0 = time.perf_counter()
      with ThreadPoolExecutor(c) as pool:
        out = list(pool.map(post, (texts[i % len(texts)] for i in range(a.requests))))
      wall = time.perf_counter() - t0
      lat = np.array([x[1] for x in out]) * 1000
      results[c] = {"requests": a.requests, "requests_per_s": round(a.requests / wall, 1),
                    "p50_ms": round(float(np.percentile(lat, 50)), 1),
                    "p99_ms": round(float(np.percentile(lat, 99)), 1),
                    "errors": sum(s != 200 for s, _ in out), "forward_passes": server.batcher.batches - batches0}
      print(f"concurrency {c}: {json.dumps(results[c])}", flush=True)
  finally:
    server.shutdown()
    server.server_close()
  print(json.dumps({"model": str(p.source), "head": p.head, "by_concurrency": results}, indent=2))


if __name__ == "__main__":
  main()
