"""Export (`jax.export`, symbolic batch and length) and the HTTP server (`bertjax.serve`).

The export of a tiny random-parameter classifier must run in a fresh interpreter that imports only jax, numpy
and tokenizers, at two batch sizes and two lengths, and give the checkpoint's logits. The server (started and
stopped here, on a free loopback port) answers 240 requests from 8 threads with exactly what the predictor
gives, batches them, and answers malformed, oversized and wrong-type requests with a 4xx and a one-line reason
while it keeps serving.
"""

import http.client
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from test_predict import TEXTS, make_checkpoint

STANDALONE = r"""
import json, sys
import jax, numpy as np, tokenizers
folder, want = sys.argv[1], np.load(sys.argv[2])
exp = jax.export.deserialize(bytearray(open(folder + "/model.jax", "rb").read()))
tok = tokenizers.Tokenizer.from_file(folder + "/tokenizer.json")
texts = json.loads(sys.argv[3])
cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
rows = [[cls, *tok.encode(t, add_special_tokens=False).ids, sep] for t in texts]
for t in (max(map(len, rows)), 40):  # two lengths, two batch sizes
  for lo, hi in ((0, len(rows)), (0, 2)):
    ids = np.zeros((hi - lo, t), np.int32); mask = np.zeros_like(ids)
    for i, r in enumerate(rows[lo:hi]):
      ids[i, :len(r)] = r; mask[i, :len(r)] = 1
    got = np.asarray(exp.call(ids, np.zeros_like(ids), mask))
    np.testing.assert_allclose(got, want[lo:hi], atol=2e-5)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("bertjax", "flax", "orbax", "optax", "transformers"))
assert not bad, bad
print("ok", exp.in_avals[0].shape)
"""


def test_export_runs_without_bertjax(tmp_path):
  from bertjax import export, predict
  from bertjax.data import glue
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  out = tmp_path / "export"
  assert export.main([f"--checkpoint={wd}", f"--out={out}"]) == 0
  assert export.main([f"--checkpoint={wd}", f"--out={out}"]) == 2  # never over an export
  p = predict.Predictor.from_checkpoint(wd)
  logits = np.stack(p.run(glue.encode_pairs(p.tokenizer, TEXTS, None, 40)))
  np.save(tmp_path / "want.npy", logits)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(tmp_path / "want.npy"), json.dumps(TEXTS)],
                     capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert r.returncode == 0 and r.stdout.startswith("ok (b, t)"), r.stderr[-2000:]
  # predict / serve take the export folder: the same answers as the checkpoint
  from_export = predict.load(str(out))(TEXTS)
  assert [o["label"] for o in from_export] == [o["label"] for o in p(TEXTS)]
  np.testing.assert_allclose([o["probabilities"]["pos"] for o in from_export],
                             [o["probabilities"]["pos"] for o in p(TEXTS)], atol=2e-6)


def _post(port, body: bytes, path="/predict", method="POST"):
  c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  c.request(method, path, body=body, headers={"Content-Type": "application/json"})
  r = c.getresponse()
  status, data = r.status, r.read()
  c.close()
  return status, json.loads(data)


def test_server_batches_and_rejects_bad_requests(tmp_path):
  from bertjax import predict, serve
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  p = predict.Predictor.from_checkpoint(wd, batch_size=16)
  want = {t: o for t, o in zip(TEXTS, p(TEXTS))}
  server = serve.make_server(p, port=0, max_batch_size=16, max_wait_ms=20, max_request_bytes=4096, max_texts=8,
                             max_chars=500)
  port = server.server_address[1]
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    assert _post(port, b"", "/health", "GET") == (200, {"status": "ok", "head": "sequence_classification",
                                                          "model": p.source})
    jobs = [[TEXTS[i % 6]] if i % 3 else TEXTS[i % 6:] for i in range(240)]
    with ThreadPoolExecutor(8) as pool:
      res = list(pool.map(lambda texts: _post(port, json.dumps({"texts": texts}).encode()), jobs))
    for texts, (status, body) in zip(jobs, res):
      assert status == 200 and len(body["predictions"]) == len(texts)
      for t, o in zip(texts, body["predictions"]):
        assert o["label"] == want[t]["label"]
        np.testing.assert_allclose(o["probabilities"]["pos"], want[t]["probabilities"]["pos"], atol=2e-6)
    assert server.batcher.batches < 240  # concurrent requests shared forward passes
    bad = [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"),
           (json.dumps({"texts": "one"}).encode(), 400, "list of strings"),
           (json.dumps({"text": 5}).encode(), 400, "must be a string"),
           (json.dumps({"txt": ["a"]}).encode(), 400, "missing 'texts'"),
           (json.dumps({"texts": ["a"] * 9}).encode(), 413, "limit is 8"),
           (json.dumps({"texts": ["a" * 501]}).encode(), 413, "limit is 500"),
           (json.dumps({"texts": ["a", "b"], "text_pairs": ["c"]}).encode(), 400, "2 texts but 1"),
           (b"x" * 5000, 413, "limit is 4096")]
    for body, status, reason in bad:
      got = _post(port, body)
      assert got[0] == status and reason in got[1]["error"] and "\n" not in got[1]["error"], (body[:40], got)
    assert _post(port, b"{}", "/nope")[0] == 404
    status, body = _post(port, json.dumps({"text": TEXTS[0]}).encode())  # the server still serves
    assert status == 200 and [o["label"] for o in body["predictions"]] == [want[TEXTS[0]]["label"]]
  finally:
    server.shutdown()
    server.server_close()
  thread.join(10)
  assert not thread.is_alive()


def test_server_takes_a_burst_of_new_connections(tmp_path):
  """64 clients connect before the server accepts any (socketserver's default backlog of 5 held ~6: the rest
  timed out connecting or were reset, as benchmarks/serve_load.py saw at concurrency 32); all are then served."""
  import socket
  from bertjax import predict, serve
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  server = serve.make_server(predict.Predictor.from_checkpoint(wd, batch_size=16), port=0)
  port = server.server_address[1]
  try:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(64)]  # nobody accepts yet
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for s in socks:
      s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    replies = []
    for s in socks:
      data = b""
      while chunk := s.recv(4096):
        data += chunk
      replies.append(data.split(b"\r\n", 1)[0])
      s.close()
    assert replies == [b"HTTP/1.1 200 OK"] * 64
  finally:
    server.shutdown()
    server.server_close()
