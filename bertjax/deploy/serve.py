"""HTTP JSON service: `python -m bertjax.serve --model=<export | checkpoint> --port=8080 [--workers=N]`.

An ASGI app (Starlette) under uvicorn. Request handlers hand their texts to one batcher thread per worker process,
which gathers what arrives within `--max_wait_ms` (up to `--max_batch_size` texts) into one forward pass, so
concurrent requests share batches.

  GET  /health/live   -> 200 {"status": "live"} while the process serves HTTP (with --workers N a worker takes
                         connections only once its model is loaded: a restarted one leaves them to the others)
  GET  /health/ready  -> 200 {"status": "ready", "head", "model"} once the model is loaded and warmed up, else 503
  GET  /health        -> /health/ready's answer with status "ok" (the first version's route)
  GET  /metrics       -> Prometheus text: requests by route and status, latency, batch sizes, queue depth,
                         model load time (all worker processes together)
  POST /predict  {"texts": [...], "text_pairs": [...]}  (or "text" / "text_pair"; QA: "question" + "context")
                 -> {"predictions": [{"label": ..., "probabilities": {...}} | {"score": ...} |
                                     {"entities": [...]} | {"answer": {...}}, ...]}
  POST /embed    {"texts": [...]}  (or "text"; a sentence_embedding model)
                 -> {"embeddings": [[float, ...], ...], "dim": D}   (the checkpoint's pooling and normalisation)
A model answers on one of the two: /predict on an embedding model, or /embed on any other, is a 400 naming the
right route.

Access: with API keys (`--api_keys_file`, one key a line, or $BERTJAX_API_KEYS, comma-separated) /predict, /embed
and /metrics need `Authorization: Bearer <key>` (compared in constant time; 401 otherwise); health routes stay open.
A bad request gets a 4xx and `{"error": "<one line>"}`; the server keeps serving. Request texts are never logged
unless `--log_requests=redacted` (one line a request, e-mail addresses, URLs and numbers masked, cut to 80
characters). SIGTERM: stop accepting connections, finish the requests in flight (at most `--drain_seconds`), exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

import prometheus_client
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bertjax import logs
from bertjax.deploy.cli import Parser, prog, run_cli
from bertjax.deploy.loading import load
from bertjax.deploy.predictor import EMBEDDING_HEAD
from bertjax.errors import UserError

MODEL_ROUTES = ("/predict", "/embed")
SETTINGS_ENV = "BERTJAX_SERVE_SETTINGS"  # how a worker process gets the settings of `python -m bertjax.serve`
API_KEYS_ENV = "BERTJAX_API_KEYS"
log = logging.getLogger("bertjax.serve")


class BadRequest(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str = ""
  max_batch_size: int = 64
  max_wait_ms: float = 5.0
  max_request_bytes: int = 1 << 20
  max_texts: int = 256
  max_chars: int = 20_000
  warmup: bool = True
  api_keys: tuple[str, ...] = ()
  log_requests: str = "off"  # off | redacted


class Batcher:
  """Runs `predictor(texts, pairs)` for several requests at once on one thread."""

  def __init__(self, predictor: Any, max_batch_size: int = 64, max_wait_ms: float = 5.0,
               on_batch: Any = None):
    self.predictor, self.max_batch_size, self.max_wait = predictor, max_batch_size, max_wait_ms / 1000
    self.on_batch = on_batch or (lambda n: None)
    self.queue: queue.Queue = queue.Queue()
    self.batches = 0
    self.thread = threading.Thread(target=self._loop, name="bertjax-batcher", daemon=True)
    self.thread.start()

  def submit(self, texts: list[str], pairs: list[str] | None) -> Future:
    """A future of the texts' predictions (for threads: `.result()` blocks)."""
    fut: Future = Future()
    self.queue.put((texts, pairs, fut, None))
    return fut

  def submit_async(self, texts: list[str], pairs: list[str] | None) -> asyncio.Future:
    """An asyncio future of the texts' predictions, on the running loop. The batcher settles all of one batch's
    futures of a loop with one `call_soon_threadsafe` (one loop wake-up a batch, not one a request, and no
    `wrap_future` hop)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    self.queue.put((texts, pairs, fut, loop))
    return fut

  def depth(self) -> int:
    return self.queue.qsize()

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
      self.on_batch(len(texts))
      outcomes, start = [], 0
      for texts_j, *_ in jobs:
        outcomes.append((preds[start:start + len(texts_j)], None))
        start += len(texts_j)
    except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
      outcomes = [(None, e)] * len(jobs)
    by_loop: dict[Any, list] = {}
    for (_, _, fut, loop), outcome in zip(jobs, outcomes):
      if loop is None:
        if outcome[1] is None:
          fut.set_result(outcome[0])
        else:
          fut.set_exception(outcome[1])
      else:
        by_loop.setdefault(loop, []).append((fut, outcome))
    for loop, settled in by_loop.items():
      with contextlib.suppress(RuntimeError):  # the loop closed (the server stopped): nobody waits
        loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list) -> None:
  """On the loop: each future's result or exception (a request whose client went away was cancelled: skipped)."""
  for fut, (result, error) in settled:
    if fut.done():
      continue
    if error is None:
      fut.set_result(result)
    else:
      fut.set_exception(error)


def parse_request(body: bytes, head: str, max_texts: int, max_chars: int) -> tuple[list[str], list[str] | None]:
  """(texts, pairs) of a /predict or /embed body; BadRequest(400 / 413) with a one-line reason otherwise."""
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
  if head == EMBEDDING_HEAD and pairs is not None:
    raise BadRequest(400, "sentence embeddings take single texts; drop 'text_pairs' / 'text_pair'")
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


# -- access, logging ------------------------------------------------------------------------------------------------

def read_api_keys(path: str | None) -> tuple[str, ...]:
  """Keys from `path` (one a line; blank lines and `#` comments skipped), else from $BERTJAX_API_KEYS."""
  if path:
    try:
      with open(path, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except OSError as e:
      raise UserError(f"--api_keys_file={path} cannot be read ({e.strerror}); pass a file with one key a line") \
          from None
    if not keys:
      raise UserError(f"--api_keys_file={path} holds no key; put one key a line")
    return tuple(keys)
  return tuple(k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip())


class KeyCheck:
  """`Authorization: Bearer <key>` against the configured keys. Digests of equal length are compared with
  `hmac.compare_digest` against every key, so the time taken says nothing about which key or how much matched."""

  def __init__(self, keys: Sequence[str]):
    self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

  @property
  def enabled(self) -> bool:
    return bool(self.digests)

  def allows(self, header: str | None) -> bool:
    if not self.digests:
      return True
    scheme, _, token = (header or "").partition(" ")
    given = hashlib.sha256(token.strip().encode()).digest()
    ok = False
    for d in self.digests:
      ok |= hmac.compare_digest(given, d)
    return ok and scheme.lower() == "bearer"


_MASKS = ((re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "<email>"), (re.compile(r"https?://\S+|www\.\S+"), "<url>"),
          (re.compile(r"\+?\d[\d\s().+/-]{2,}\d|\d{3,}"), "<number>"))


def redact(text: str, limit: int = 80) -> str:
  """`text` with e-mail addresses, URLs and numbers of 3+ digits masked, cut to `limit` characters."""
  for pattern, mask in _MASKS:
    text = pattern.sub(mask, text)
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


# -- metrics --------------------------------------------------------------------------------------------------------

class Metrics:
  """Prometheus metrics of one worker. With several workers ($PROMETHEUS_MULTIPROC_DIR set before the workers
  start) every worker writes its values to that folder and /metrics sums them."""

  def __init__(self):
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter("bertjax_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
    self.latency = Histogram("bertjax_request_seconds", "request latency (s) by route", ["route"], registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.batch = Histogram("bertjax_batch_texts", "texts per forward pass", registry=r,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.texts = Counter("bertjax_texts", "texts predicted", registry=r)
    self.queue = Gauge("bertjax_queue_depth", "requests waiting for the batcher", registry=r,
                       multiprocess_mode="livesum")
    self.load_seconds = Gauge("bertjax_model_load_seconds", "seconds to load and warm up the model", registry=r,
                              multiprocess_mode="max")
    self.ready = Gauge("bertjax_ready", "1 once the model is loaded and warmed up", registry=r,
                       multiprocess_mode="livesum")

  def on_batch(self, n: int) -> None:
    self.batch.observe(n)
    self.texts.inc(n)

  def render(self) -> bytes:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
      registry = CollectorRegistry()
      multiprocess.MultiProcessCollector(registry, path=folder)
      return prometheus_client.generate_latest(registry)
    return prometheus_client.generate_latest(self.registry)


# -- the app --------------------------------------------------------------------------------------------------------

class Service:
  """The model, its batcher and the service's state for one worker process."""

  def __init__(self, settings: Settings, predictor: Any = None):
    self.settings, self.predictor, self.batcher = settings, None, None
    self.keys, self.prom = KeyCheck(settings.api_keys), Metrics()
    self.failed: str | None = None
    # requests taken in and answered (any status) by route, for the drain report
    self.received, self.answered = dict.fromkeys(MODEL_ROUTES, 0), dict.fromkeys(MODEL_ROUTES, 0)
    if predictor is not None:
      self._start(predictor, 0.0)

  def _start(self, predictor: Any, seconds: float) -> None:
    s = self.settings
    self.batcher = Batcher(predictor, s.max_batch_size, s.max_wait_ms, self.prom.on_batch)
    self.predictor = predictor
    self.prom.load_seconds.set(seconds)
    self.prom.ready.set(1)

  def load(self) -> None:
    """Load and warm up `settings.model` (run on a thread: the process answers /health/live meanwhile)."""
    t0 = time.perf_counter()
    try:
      predictor = load(self.settings.model, batch_size=self.settings.max_batch_size)
      shapes = predictor.warmup() if self.settings.warmup else 0
    except Exception as e:  # noqa: BLE001 - reported by /health/ready and the log; the process stays up
      self.failed = " ".join(f"{type(e).__name__}: {e}".split())
      log.error("model %s failed to load: %s", self.settings.model, self.failed)
      return
    self._start(predictor, time.perf_counter() - t0)
    log.info("ready: %s from %s (%d batch shapes compiled, %.1f s)", predictor.head, predictor.source, shapes,
             time.perf_counter() - t0)

  def close(self) -> None:
    """After the server stopped accepting and the requests in flight finished (or `--drain_seconds` passed)."""
    if self.batcher is not None:
      self.batcher.close()
    self.prom.ready.set(0)
    log.info("stopped: %s", "; ".join(f"{self.received[r]} {r} requests received, {self.answered[r]} answered"
                                      for r in MODEL_ROUTES))

  # -- routes ------------------------------------------------------------------------------------------------------
  async def live(self, request: Request) -> Response:
    return self._json(200, {"status": "live"})

  async def ready(self, request: Request) -> Response:
    if self.predictor is None:
      status = "failed: " + self.failed if self.failed else "loading"
      return self._json(503, {"status": status})
    return self._json(200, {"status": "ready", "head": self.predictor.head, "model": str(self.predictor.source)})

  async def health(self, request: Request) -> Response:
    """The first version's route: /health/ready's answer with status "ok"."""
    if self.predictor is None:
      return await self.ready(request)
    return self._json(200, {"status": "ok", "head": self.predictor.head, "model": str(self.predictor.source)})

  async def metrics(self, request: Request) -> Response:
    if not self.keys.allows(request.headers.get("authorization")):
      return self._unauthorized()
    return Response(self.prom.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

  async def predict(self, request: Request) -> Response:
    return await self._model_route("/predict", request)

  async def embed(self, request: Request) -> Response:
    return await self._model_route("/embed", request)

  async def _model_route(self, route: str, request: Request) -> Response:
    self.received[route] += 1
    try:
      return await self._run_model(route, request)
    finally:
      self.answered[route] += 1

  async def _run_model(self, route: str, request: Request) -> Response:
    if not self.keys.allows(request.headers.get("authorization")):
      return self._unauthorized()
    if self.predictor is None:
      return self._error(503, "the model is still loading; retry when GET /health/ready answers 200")
    s = self.settings
    head = self.predictor.head
    if (head == EMBEDDING_HEAD) != (route == "/embed"):
      right = "/embed" if head == EMBEDDING_HEAD else "/predict"
      return self._error(400, f"POST {route} does not serve this model (head {head}); use POST {right}")
    try:
      try:
        size = int(request.headers.get("content-length", ""))
      except ValueError:
        raise BadRequest(411, "a Content-Length header is required") from None
      if size > s.max_request_bytes:
        raise BadRequest(413, f"request body of {size} bytes; the limit is {s.max_request_bytes}")
      texts, pairs = parse_request(await request.body(), head, s.max_texts, s.max_chars)
      self.prom.queue.inc()
      try:
        preds = await self.batcher.submit_async(texts, pairs)
      finally:
        self.prom.queue.dec()
    except BadRequest as e:
      return self._error(e.status, str(e))
    except Exception as e:  # noqa: BLE001 - a failure inside the model: 500, keep serving
      log.exception("prediction failed")
      return self._error(500, f"prediction failed: {type(e).__name__}: {e}")
    if s.log_requests == "redacted":
      log.info("POST %s 200: %d texts: %s", route, len(texts), " | ".join(redact(t) for t in texts[:3]))
    if route == "/embed":
      vectors = [p["embedding"] for p in preds]
      payload: dict[str, Any] = {"embeddings": vectors, "dim": len(vectors[0])}
    else:
      payload = {"predictions": preds}
    return Response(json.dumps(payload, ensure_ascii=False).encode(), media_type="application/json")

  async def not_found(self, request: Request, exc: Any) -> Response:
    return self._error(getattr(exc, "status_code", 404), f"no route {request.method} {request.url.path}; use POST "
                       "/predict (or /embed), GET /health/ready, /health/live or /metrics")

  # -- helpers -----------------------------------------------------------------------------------------------------
  @staticmethod
  def _json(status: int, payload: dict) -> Response:
    return JSONResponse(payload, status_code=status)

  def _error(self, status: int, message: str) -> Response:
    return self._json(status, {"error": " ".join(message.split())})

  def _unauthorized(self) -> Response:
    r = self._error(401, "missing or invalid API key; send 'Authorization: Bearer <key>'")
    r.headers["WWW-Authenticate"] = 'Bearer realm="bertjax"'
    return r

  def app(self, load: str = "no") -> Starlette:
    """`load`: "no" (the predictor was given), "background" (serve at once: /health/live answers, /predict 503s
    until the model is ready) or "first" (load, then start taking connections: a worker of several, so that one
    still loading, or restarted after a crash, leaves the shared socket's connections to the ready workers
    instead of answering them 503)."""
    routes = ["/health/live", "/health/ready", "/health", "/metrics", "/predict", "/embed"]
    handlers = [self.live, self.ready, self.health, self.metrics, self.predict, self.embed]
    methods = [["GET"], ["GET"], ["GET"], ["GET"], ["POST"], ["POST"]]

    @contextlib.asynccontextmanager
    async def lifespan(app):
      if load == "background":
        threading.Thread(target=self.load, name="bertjax-load", daemon=True).start()
      elif load == "first":
        await asyncio.to_thread(self.load)
      yield
      self.close()

    app = Starlette(routes=[Route(p, self._measured(p, h), methods=m) for p, h, m in zip(routes, handlers, methods)],
                    lifespan=lifespan, exception_handlers={404: self.not_found, 405: self.not_found})
    app.state.service = self
    return app

  def _measured(self, route: str, handler):
    async def run(request: Request) -> Response:
      t0 = time.perf_counter()
      response = await handler(request)
      self.prom.latency.labels(route).observe(time.perf_counter() - t0)
      self.prom.requests.labels(route, str(response.status_code)).inc()
      return response
    return run


def app_from_env() -> Starlette:
  """The app of one worker process of `python -m bertjax.serve --workers=N` (settings from $BERTJAX_SERVE_SETTINGS;
  uvicorn imports this by name in each worker)."""
  # logging as in the parent (run_cli): each worker logs its readiness, a load failure and its drain report
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # (an import configured it already)
  logs.quiet_libraries()
  log.setLevel(logging.INFO)
  _forget_dead_workers(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
  raw = json.loads(os.environ[SETTINGS_ENV])
  settings = Settings(**{**raw, "api_keys": tuple(raw.get("api_keys", ()))})
  return Service(settings).app(load="first")


def _forget_dead_workers(folder: str) -> None:
  """Drop the live gauges (ready, queue depth) of worker processes that died (uvicorn replaces a crashed worker; its
  files would keep counting it as ready)."""
  pids = {int(m.group(1)) for f in (os.listdir(folder) if folder else ())
          if (m := re.fullmatch(r"gauge_live\w+_(\d+)\.db", f))}
  for pid in pids:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      multiprocess.mark_process_dead(pid, folder)
    except PermissionError:
      pass


# -- in-process server (tests, benchmarks, notebooks) ---------------------------------------------------------------

class BackgroundServer:
  """uvicorn serving an app on an already listening socket: `serve_forever()` (blocks), `shutdown()` (graceful),
  `server_close()`, `server_address`, `batcher` — the shape of `socketserver` servers."""

  def __init__(self, app: Starlette, host: str, port: int, drain_seconds: float = 30.0):
    self.app = app
    self.socket = socket.create_server((host, port), backlog=2048, reuse_port=False)
    self.server_address = self.socket.getsockname()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(drain_seconds) or None, timeout_keep_alive=30)
    self.server = uvicorn.Server(config)
    self._done = threading.Event()

  @property
  def batcher(self) -> Batcher:
    return self.app.state.service.batcher

  def serve_forever(self) -> None:
    """Serve until `shutdown()`, or, on the main thread, SIGTERM / SIGINT: then stop accepting, let the requests in
    flight finish and return (uvicorn's own handlers would re-raise the signal afterwards: exit 143, not 0)."""
    self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
      self.server.run(sockets=[self.socket])
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      self._done.set()

  def _on_signal(self, signum, frame) -> None:
    if self.server.should_exit and signum == signal.SIGINT:
      self.server.force_exit = True  # a second Ctrl-C: do not wait for the requests in flight
    self.server.should_exit = True

  def shutdown(self) -> None:
    self.server.should_exit = True
    self._done.wait(60)

  def server_close(self) -> None:
    self.socket.close()


def make_server(predictor: Any, host: str = "127.0.0.1", port: int = 8080, max_batch_size: int = 64,
                max_wait_ms: float = 5.0, max_request_bytes: int = 1 << 20, max_texts: int = 256,
                max_chars: int = 20_000, api_keys: Sequence[str] = (), log_requests: str = "off") -> BackgroundServer:
  """A ready server for a loaded `predictor` (call `serve_forever()`; `shutdown()` + `server_close()` stop it;
  `port=0` picks a free one)."""
  settings = Settings(str(predictor.source), max_batch_size, max_wait_ms, max_request_bytes, max_texts, max_chars,
                      False, tuple(api_keys), log_requests)
  return BackgroundServer(Service(settings, predictor).app(load="no"), host, port)


# -- the command ----------------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
  p = Parser(prog=prog("bertjax.serve"), description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="an export folder (python -m bertjax.export), a quantized model or "
                 "a checkpoint")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed; one worker only)")
  p.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model (for the cores "
                 "of one machine; one accelerator chip serves one worker)")
  p.add_argument("--max_batch_size", type=int, default=64, help="texts per forward pass")
  p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for more requests")
  p.add_argument("--max_request_bytes", type=int, default=1 << 20)
  p.add_argument("--max_texts", type=int, default=256, help="texts per request")
  p.add_argument("--max_chars", type=int, default=20_000, help="characters per text")
  p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="compile every batch shape before /health/ready answers 200")
  p.add_argument("--api_keys_file", default=None, help=f"one API key a line (default: ${API_KEYS_ENV}, "
                 "comma-separated; none: no authentication)")
  p.add_argument("--log_requests", default="off", choices=("off", "redacted"),
                 help="one log line per request with its texts redacted (default off: texts are never logged)")
  p.add_argument("--drain_seconds", type=float, default=30.0,
                 help="on SIGTERM, how long requests in flight may take to finish")
  return p


def _announce(a: argparse.Namespace, port: int) -> None:
  print(f"serving {a.model} on http://{a.host}:{port} with {a.workers} worker(s); GET /health/ready answers 200 "
        "once the model is loaded", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:

  def run():
    a = parser().parse_args(argv)
    log.setLevel(logging.INFO)  # readiness, failures, the drain report (and redacted requests when asked)
    if a.workers < 1:
      raise UserError(f"--workers={a.workers} must be >= 1")
    if a.workers > 1 and a.port == 0:
      raise UserError("--port=0 takes one worker; give a port for --workers > 1")
    if not os.path.exists(a.model):
      raise UserError(f"--model={a.model} does not exist; pass an export folder, a quantized model or a checkpoint")
    settings = Settings(a.model, a.max_batch_size, a.max_wait_ms, a.max_request_bytes, a.max_texts, a.max_chars,
                        a.warmup, read_api_keys(a.api_keys_file), a.log_requests)
    if not settings.api_keys:
      log.warning("no API keys (--api_keys_file, $%s): /predict, /embed and /metrics are open to every client",
                  API_KEYS_ENV)
    if a.workers == 1:
      try:
        server = BackgroundServer(Service(settings).app(load="background"), a.host, a.port, a.drain_seconds)
      except OSError as e:
        raise UserError(f"cannot listen on {a.host}:{a.port} ({e.strerror}); pick another --port") from None
      _announce(a, server.server_address[1])
      server.serve_forever()  # SIGTERM / Ctrl-C: stop accepting, drain, return
      server.server_close()
      return
    try:
      socket.create_server((a.host, a.port)).close()
    except OSError as e:
      raise UserError(f"cannot listen on {a.host}:{a.port} ({e.strerror}); pick another --port") from None
    _announce(a, a.port)
    with tempfile.TemporaryDirectory(prefix="bertjax-metrics-") as folder:
      os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # read by prometheus_client in each (spawned) worker
      os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(settings))
      uvicorn.run("bertjax.deploy.serve:app_from_env", factory=True, workers=a.workers, host=a.host, port=a.port,
                  log_level="warning", access_log=False, lifespan="on",
                  timeout_graceful_shutdown=int(a.drain_seconds) or None, timeout_keep_alive=30,
                  timeout_worker_healthcheck=120)  # a worker busy importing JAX answers pings late: not hung

  return run_cli("bertjax.serve", run)
