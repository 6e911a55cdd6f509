"""`bertjax.serve` as a service team runs it: API keys, Prometheus metrics, liveness vs readiness, redacted logs,
a graceful drain on SIGTERM under load, and several worker processes."""

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import REPO
from test_predict import TEXTS, make_checkpoint


def _request(port, path="/predict", body=None, key=None, method=None, timeout=120):
  c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  headers = {"Content-Type": "application/json", "Connection": "close"}
  if key is not None:
    headers["Authorization"] = key if " " in key else f"Bearer {key}"
  c.request(method or ("POST" if body is not None else "GET"), path, body=body, headers=headers)
  r = c.getresponse()
  status, data = r.status, r.read()
  c.close()
  return status, data


def _metric(text: str, name: str, **labels) -> float:
  """The value of one sample of Prometheus text (0 when absent)."""
  want = ",".join(f'{k}="{v}"' for k, v in labels.items())
  for line in text.splitlines():
    m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
    if m and (m.group(1) or "") == want:
      return float(m.group(2))
  return 0.0


def test_keys_metrics_health_and_redacted_logs(tmp_path, caplog):
  from bertjax import predict, serve
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  p = predict.Predictor.from_checkpoint(wd, batch_size=8)
  server = serve.make_server(p, port=0, max_batch_size=8, max_wait_ms=20, api_keys=["k-one", "k-two"],
                             log_requests="redacted")
  port = server.server_address[1]
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  body = json.dumps({"texts": ["write to ann.lee@example.com or call 555 123 4567", "fine"]}).encode()
  try:
    with caplog.at_level(logging.INFO, logger="bertjax.serve"):
      assert _request(port, "/health/live")[0] == 200 and _request(port, "/health/ready")[0] == 200  # open
      assert _request(port, body=body)[0] == 401  # no key
      assert _request(port, body=body, key="k-three")[0] == 401  # a wrong key
      assert _request(port, body=body, key="Basic k-one")[0] == 401  # the right key, the wrong scheme
      assert _request(port, "/metrics")[0] == 401
      status, data = _request(port, body=body, key="k-two")
      assert status == 200 and len(json.loads(data)["predictions"]) == 2
      with ThreadPoolExecutor(8) as pool:  # 40 more, concurrent
        got = list(pool.map(lambda i: _request(port, body=json.dumps({"text": TEXTS[i % 6]}).encode(), key="k-one"),
                            range(40)))
      assert [s for s, _ in got] == [200] * 40
      status, data = _request(port, "/metrics", key="k-one")
    text = data.decode()
    assert status == 200
    assert _metric(text, "bertjax_requests_total", route="/predict", status="200") == 41
    assert _metric(text, "bertjax_requests_total", route="/predict", status="401") == 3
    assert _metric(text, "bertjax_requests_total", route="/metrics", status="401") == 1
    assert _metric(text, "bertjax_texts_total") == 42
    assert _metric(text, "bertjax_batch_texts_count") == server.batcher.batches < 41  # requests shared batches
    assert _metric(text, "bertjax_request_seconds_count", route="/predict") == 44
    assert _metric(text, "bertjax_queue_depth") == 0 and _metric(text, "bertjax_ready") == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "<email>" in logged and "<number>" in logged and "ann.lee" not in logged and "4567" not in logged
  finally:
    server.shutdown()
    server.server_close()
  thread.join(10)
  assert serve.redact("mail a.b@x.io, see https://x.y/z?q=1 or +1 (555) 123-4567 in 2026") == \
      "mail <email>, see <url> or <number> in <number>"


def test_texts_are_not_logged_by_default(tmp_path, caplog):
  from bertjax import predict, serve
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  server = serve.make_server(predict.Predictor.from_checkpoint(wd, batch_size=8), port=0)
  port = server.server_address[1]
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    with caplog.at_level(logging.DEBUG):
      assert _request(port, body=json.dumps({"text": "secret-word-xyz"}).encode())[0] == 200
    assert "secret-word-xyz" not in "\n".join(r.getMessage() for r in caplog.records)
  finally:
    server.shutdown()
    server.server_close()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(wd, *args, port):
  env = dict(os.environ, PYTHONPATH=str(REPO), BERTJAX_API_KEYS="secret-1")
  return subprocess.Popen([sys.executable, "-m", "bertjax.serve", f"--model={wd}", f"--port={port}", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc, port, timeout=240):
  seen_live_not_ready = False
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    try:
      live, ready = _request(port, "/health/live", timeout=5)[0], _request(port, "/health/ready", timeout=5)[0]
    except OSError:
      time.sleep(0.2)
      continue
    seen_live_not_ready |= live == 200 and ready == 503
    if ready == 200:
      return seen_live_not_ready
    time.sleep(0.05)
  raise AssertionError("server not ready in time")


def test_sigterm_drains_requests_in_flight_and_two_workers_share_metrics(tmp_path):
  """SIGTERM while 16 clients post requests that wait 300 ms in the batcher: every request the server accepted is
  answered 200, the others find the port closed, and the process exits 0. Then two workers: requests spread over
  both, and /metrics (either worker) counts all of them."""
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  port = _free_port()
  proc = _start(wd, "--max_wait_ms=300", "--max_batch_size=16", "--no-warmup", port=port)
  try:
    assert _wait_ready(proc, port), "/health/live should answer 200 while /health/ready still answers 503"
    outcomes, stop = [], threading.Event()

    def client(i):
      while not stop.is_set():
        try:
          status, _ = _request(port, body=json.dumps({"text": TEXTS[i % 6]}).encode(), key="secret-1", timeout=60)
          outcomes.append(status)
        except ConnectionRefusedError:
          return  # the listener is closed: not accepted, nothing in flight
        except OSError as e:
          outcomes.append(e)
          return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
      t.start()
    while len(outcomes) < 32:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    stop.set()
    for t in threads:
      t.join(60)
    log = proc.stdout.read()
    stopped = re.search(r"stopped: (\d+) /predict requests received, (\d+) answered", log)
    assert rc == 0 and stopped, log[-3000:]
    received, answered = int(stopped.group(1)), int(stopped.group(2))
    # Every request the server took in was answered, and every answer reached its client as a 200; the clients'
    # other requests found the listener closed: refused, or, while still in the kernel's accept queue, reset (the
    # client sees a reset, a broken pipe while sending, or http.client's RemoteDisconnected, a ConnectionResetError).
    assert received == answered == outcomes.count(200) >= 32, (received, answered, outcomes.count(200))
    others = [o for o in outcomes if o != 200]
    assert all(isinstance(o, (ConnectionResetError, BrokenPipeError)) for o in others), [repr(o) for o in others]
  finally:
    if proc.poll() is None:
      proc.kill()
  port = _free_port()
  proc = _start(wd, "--workers=2", "--max_batch_size=8", "--no-warmup", port=port)
  try:
    _wait_ready(proc, port)
    for _ in range(120):  # both workers load their own model; wait until both answer ready
      if _metric(_request(port, "/metrics", key="secret-1")[1].decode(), "bertjax_ready") == 2:
        break
      time.sleep(1)
    with ThreadPoolExecutor(8) as pool:
      got = list(pool.map(lambda i: _request(port, body=json.dumps({"text": TEXTS[i % 6]}).encode(),
                                             key="secret-1")[0], range(60)))
    assert got == [200] * 60
    text = _request(port, "/metrics", key="secret-1")[1].decode()
    assert _metric(text, "bertjax_ready") == 2
    assert _metric(text, "bertjax_requests_total", route="/predict", status="200") == 60
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
  finally:
    if proc.poll() is None:
      proc.kill()


def _workers(pid: int) -> list[int]:
  """The uvicorn worker processes (multiprocessing spawn children, not its resource tracker) of `pid`."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmd = f.read()
    except (OSError, ValueError):
      continue
    if ppid == pid and b"spawn_main" in cmd:
      found.append(int(entry))
  return found


def test_a_restarted_worker_takes_no_requests_until_its_model_is_ready(tmp_path):
  """Two workers; one dies (SIGKILL, as the kernel's OOM killer does) and uvicorn starts another, which loads its
  own model. Meanwhile every request goes to the ready worker and gets 200: the new worker accepts connections on
  the shared socket only once it is ready (it used to take them at once and answer 503 while loading, so most
  requests of a load test failed), and /metrics counts exactly the live workers as ready."""
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  port = _free_port()
  proc = _start(wd, "--workers=2", "--max_batch_size=8", "--no-warmup", port=port)
  lines: list[str] = []
  threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
  readied = lambda: sum(line.startswith("ready: ") for line in lines)  # each worker logs one once loaded
  try:
    t0 = time.time()
    while readied() < 2:
      assert proc.poll() is None and time.time() - t0 < 180, "".join(lines)[-3000:]
      time.sleep(0.2)
    first = _workers(proc.pid)
    assert len(first) == 2, first
    os.kill(first[0], signal.SIGKILL)
    statuses, stop = [], threading.Event()

    def client(i):
      while not stop.is_set():
        statuses.append(_request(port, body=json.dumps({"text": TEXTS[i % 6]}).encode(), key="secret-1",
                                 timeout=60)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    t0 = time.time()
    while readied() < 3 and time.time() - t0 < 180:  # until the replacement has loaded its model
      time.sleep(0.2)
    time.sleep(0.5)
    stop.set()
    for t in threads:
      t.join(60)
    assert readied() == 3 and len(_workers(proc.pid)) == 2, "".join(lines)[-3000:]
    assert len(statuses) > 10 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert _metric(_request(port, "/metrics", key="secret-1")[1].decode(), "bertjax_ready") == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
  finally:
    if proc.poll() is None:
      for pid in _workers(proc.pid):  # a killed parent would leave its workers running
        os.kill(pid, signal.SIGKILL)
      proc.kill()
