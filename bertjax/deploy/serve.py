"""HTTP JSON endpoint: `python -m bertjax.serve --model=<export | checkpoint> --port=8080`.

Built on the standard library's `http.server.ThreadingHTTPServer` (one thread per connection, no extra
dependency). Request threads hand their texts to one batcher thread, which gathers what arrives within
`--max_wait_ms` (up to `--max_batch_size` texts) into one forward pass, so concurrent requests share batches.

  GET  /health   -> {"status": "ok", "head": ..., "model": ...}
  POST /predict  {"texts": [...], "text_pairs": [...]}  (or "text" / "text_pair"; QA: "question" + "context")
                 -> {"predictions": [{"label": ..., "probabilities": {...}} | {"score": ...} |
                                     {"entities": [...]} | {"answer": {...}}, ...]}
A bad request gets a 4xx and `{"error": "<one line>"}` (malformed JSON, wrong types, too many or too long texts,
a body over `--max_request_bytes`, unknown routes); the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from bertjax.deploy.cli import Parser, prog, run_cli
from bertjax.deploy.loading import load
from bertjax.errors import UserError


class BadRequest(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Batcher:
  """Runs `predictor(texts, pairs)` for several requests at once on one thread."""

  def __init__(self, predictor: Any, max_batch_size: int = 64, max_wait_ms: float = 5.0):
    self.predictor, self.max_batch_size, self.max_wait = predictor, max_batch_size, max_wait_ms / 1000
    self.queue: queue.Queue = queue.Queue()
    self.batches = 0
    self.thread = threading.Thread(target=self._loop, name="bertjax-batcher", daemon=True)
    self.thread.start()

  def submit(self, texts: list[str], pairs: list[str] | None) -> list[dict]:
    fut: Future = Future()
    self.queue.put((texts, pairs, fut))
    return fut.result()

  def close(self) -> None:
    self.queue.put(None)
    self.thread.join()

  def _loop(self) -> None:
    while True:
      item = self.queue.get()
      if item is None:
        return
      jobs, n = [item], len(item[0])
      deadline = time.monotonic() + self.max_wait  # one wait per batch, not per arrival
      while n < self.max_batch_size:
        try:
          nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if nxt is None:
          self.queue.put(None)
          break
        jobs.append(nxt)
        n += len(nxt[0])
      for group in (True, False):  # pairs and single texts cannot share one call
        part = [j for j in jobs if (j[1] is not None) == group]
        if part:
          self._run(part)

  def _run(self, jobs: list) -> None:
    texts = [t for j in jobs for t in j[0]]
    pairs = [t for j in jobs for t in j[1]] if jobs[0][1] is not None else None
    try:
      preds = self.predictor(texts, pairs)
      self.batches += 1
    except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
      for j in jobs:
        j[2].set_exception(e)
      return
    start = 0
    for texts_j, _, fut in jobs:
      fut.set_result(preds[start:start + len(texts_j)])
      start += len(texts_j)


def parse_request(body: bytes, head: str, max_texts: int, max_chars: int) -> tuple[list[str], list[str] | None]:
  """(texts, pairs) of a /predict body; BadRequest(400 / 413) with a one-line reason otherwise."""
  try:
    req = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(400, f"body is not valid JSON ({e})") from None
  if not isinstance(req, dict):
    raise BadRequest(400, f"body must be a JSON object, got {type(req).__name__}")
  qa = head == "question_answering"
  keys = (("questions", "question"), ("contexts", "context")) if qa and ("question" in req or "questions" in req) \
      else (("texts", "text"), ("text_pairs", "text_pair"))
  texts, pairs = _field(req, *keys[0]), _field(req, *keys[1])
  if texts is None:
    raise BadRequest(400, f"missing {keys[0][0]!r} (a list of strings) or {keys[0][1]!r} (a string)")
  if qa and pairs is None:
    raise BadRequest(400, "question answering needs 'contexts' / 'context' (or 'text_pairs') next to the questions")
  if pairs is not None and len(pairs) != len(texts):
    raise BadRequest(400, f"{len(texts)} texts but {len(pairs)} text pairs")
  if not texts:
    raise BadRequest(400, "no texts to predict")
  if len(texts) > max_texts:
    raise BadRequest(413, f"{len(texts)} texts in one request; the limit is {max_texts}")
  longest = max(len(t) for t in texts + (pairs or []))
  if longest > max_chars:
    raise BadRequest(413, f"a text of {longest} characters; the limit is {max_chars}")
  return texts, pairs


def _field(req: dict, many: str, one: str) -> list[str] | None:
  if many in req:
    v = req[many]
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
      raise BadRequest(400, f"{many!r} must be a list of strings")
    return v
  if one in req:
    if not isinstance(req[one], str):
      raise BadRequest(400, f"{one!r} must be a string, got {type(req[one]).__name__}")
    return [req[one]]
  return None


class _Server(ThreadingHTTPServer):
  # socketserver listens with a backlog of 5: a burst of more new connections than that overflows the accept
  # queue, and clients whose handshake the kernel dropped see "connection reset by peer" (benchmarks/serve_load.py
  # at concurrency 32 did). One thread per connection, so the backlog only has to hold a burst.
  request_queue_size = 1024
  daemon_threads = True


def make_server(predictor: Any, host: str = "127.0.0.1", port: int = 8080, max_batch_size: int = 64,
                max_wait_ms: float = 5.0, max_request_bytes: int = 1 << 20, max_texts: int = 256,
                max_chars: int = 20_000) -> ThreadingHTTPServer:
  """A ready server (call `serve_forever()`; `shutdown()` + `server_close()` stop it; `port=0` picks a free one)."""
  batcher = Batcher(predictor, max_batch_size, max_wait_ms)
  health = json.dumps({"status": "ok", "head": predictor.head, "model": str(predictor.source)}).encode()

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # no line per request
      pass

    def _send(self, status: int, payload: bytes) -> None:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
      self._send(status, json.dumps({"error": " ".join(message.split())}).encode())

    def do_GET(self):
      if self.path.rstrip("/") == "/health":
        self._send(200, health)
      else:
        self._error(404, f"no route GET {self.path}; use GET /health or POST /predict")

    def do_POST(self):
      try:
        if self.path.rstrip("/") != "/predict":
          raise BadRequest(404, f"no route POST {self.path}; use POST /predict")
        try:
          size = int(self.headers.get("Content-Length", ""))
        except ValueError:
          raise BadRequest(411, "a Content-Length header is required") from None
        if size > max_request_bytes:
          self.close_connection = True  # the unread body cannot be skipped safely
          raise BadRequest(413, f"request body of {size} bytes; the limit is {max_request_bytes}")
        texts, pairs = parse_request(self.rfile.read(size), predictor.head, max_texts, max_chars)
        preds = batcher.submit(texts, pairs)
        self._send(200, json.dumps({"predictions": preds}, ensure_ascii=False).encode())
      except BadRequest as e:
        self._error(e.status, str(e))
      except Exception as e:  # noqa: BLE001 - a failure inside the model: 500, keep serving
        logging.exception("prediction failed")
        self._error(500, f"prediction failed: {type(e).__name__}: {e}")

  server = _Server((host, port), Handler)
  server.batcher = batcher  # type: ignore[attr-defined]
  close = server.server_close

  def server_close():
    close()
    batcher.close()

  server.server_close = server_close  # type: ignore[method-assign]
  return server


def main(argv: Sequence[str] | None = None) -> int:
  p = Parser(prog=prog("bertjax.serve"), description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="an export folder (python -m bertjax.export) or a checkpoint")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
  p.add_argument("--max_batch_size", type=int, default=64, help="texts per forward pass")
  p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for more requests")
  p.add_argument("--max_request_bytes", type=int, default=1 << 20)
  p.add_argument("--max_texts", type=int, default=256, help="texts per request")
  p.add_argument("--max_chars", type=int, default=20_000, help="characters per text")
  p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="compile every batch shape before listening")

  def run():
    a = p.parse_args(argv)
    predictor = load(a.model, batch_size=a.max_batch_size)
    if a.warmup:
      print(f"compiled {predictor.warmup()} batch shapes", file=sys.stderr, flush=True)
    try:
      server = make_server(predictor, a.host, a.port, a.max_batch_size, a.max_wait_ms, a.max_request_bytes,
                           a.max_texts, a.max_chars)
    except OSError as e:
      raise UserError(f"cannot listen on {a.host}:{a.port} ({e.strerror}); pick another --port") from None
    print(f"serving {predictor.head} from {predictor.source} on http://{a.host}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()

  return run_cli("bertjax.serve", run)


if __name__ == "__main__":
  sys.exit(main())
