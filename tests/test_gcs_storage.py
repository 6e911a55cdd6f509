"""gs:// end to end against a local GCS emulator: a corpus in the bucket, pretraining with a gs:// workdir killed
with `kill -9` and resumed bit-exactly by the same command, `convert to_hf` from the bucket, a fine-tune initialised
from it (`init_checkpoint=gs://...`) into a gs:// workdir, and `predict` from that checkpoint; plus the one-line
message when the gs:// backend (gcsfs) is not installed.

The emulator is `gcp-storage-emulator` (PyPI), started by the fixture on a free localhost port through
tests/gcs_emulator.py, which adds the `x-goog-generation` headers and generation preconditions that tensorstore's
gs:// driver needs: without them orbax's OCDBT checkpoint writes fail with `Malformed StorageGeneration` (why: see
that file). orbax is not faked: tensorstore's real gs:// driver writes and reads every checkpoint array over HTTP,
and gcsfs (through etils.epath, datasets and fsspec) every other file.
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

from bertjax import paths
from bertjax.errors import UserError

if importlib.util.find_spec("gcsfs") is None or importlib.util.find_spec("gcp_storage_emulator") is None:
  pytest.skip("needs gcsfs and gcp-storage-emulator (pip install -e '.[test]')", allow_module_level=True)

from bertjax.train import checkpoint  # noqa: E402  (load_params: the stable public surface)
from bertjax.train.trainer import train_and_evaluate  # noqa: E402
from test_classify_data import ROWS, write  # noqa: E402
from test_resilience_preemption import STEPS, _overrides, _Run  # noqa: E402
from test_trainer import tiny_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "bertjax-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator on a free port, and every client in this process and its subprocesses pointed at it."""
  import fsspec
  import gcsfs  # the optional backend under test (imported here, after the skip check)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), f"--port={port}",
                           f"--bucket={BUCKET}"], stdout=log, stderr=subprocess.STDOUT)
  env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath, datasets, fsspec)
         "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gs:// driver (orbax arrays)
         "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket-layout lookup (60 s of retries each)
         # Credential probes stay on this machine: tensorstore and google-auth would ask the GCE metadata server.
         "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
         "NO_GCE_CHECK": "True"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported; if it already was, register its plain file system.
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  old_conf = fsspec.config.conf.get("gcs")
  fsspec.config.conf["gcs"] = {**(old_conf or {}), "token": "anon"}  # FSSPEC_GCS_TOKEN is read at fsspec's import
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  try:
    end = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(url + "/", timeout=2).read()
        break
      except OSError:
        if proc.poll() is not None or time.time() > end:
          raise RuntimeError(f"the GCS emulator did not start (rc {proc.poll()}); see {log.name}") from None
        time.sleep(0.2)
    yield f"gs://{BUCKET}"
  finally:
    proc.kill()
    proc.wait(timeout=30)
    log.close()
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if old_conf is None:
      fsspec.config.conf.pop("gcs", None)
    else:
      fsspec.config.conf["gcs"] = old_conf
    gcsfs.core.GCSFileSystem.clear_instance_cache()


def _leaves_equal(a, b) -> None:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_gs_pretrain_kill9_resume_to_hf_finetune_predict(gcs, small_corpus, cache_dir, tmp_path):
  t0, phases = time.time(), {}

  def phase(name):
    phases[name] = round(time.time() - t0 - sum(phases.values()), 1)
  corpus = f"{gcs}/corpus"
  names = sorted(os.listdir(small_corpus))
  for name in names:
    paths.copy(os.path.join(small_corpus, name), f"{corpus}/{name}")
  assert paths.listdir(corpus) == names

  # An uninterrupted run (local workdir, the same gs:// corpus) to compare with; it fills the data cache too.
  over = {**_overrides(f"{corpus}/*.txt", cache_dir), "training.eval_every_steps": 1000}
  c = tiny_config(over["data.corpus"], cache_dir)
  for k, v in over.items():
    section, name = k.split(".")
    c[section][name] = v
  train_and_evaluate(c, str(tmp_path / "straight"))
  phase("corpus upload + uninterrupted run")

  wd = f"{gcs}/pretrain"
  run = _Run(wd, over)  # python -m bertjax.main ... --workdir=gs://...
  run.wait_for("train step 7/")  # step 4's checkpoint is on its way (async) or written
  run.proc.kill()
  assert run.finish(timeout=60) == -signal.SIGKILL
  killed = "".join(run.lines)
  assert f"train step {STEPS}/" not in killed
  phase("gs:// run to kill -9")
  run = _Run(wd, over)  # the same command again: resumes from the bucket and runs to the end
  assert run.finish(timeout=300) == 0, "".join(run.lines[-30:])
  resumed = "".join(run.lines)
  assert f"Resuming from checkpoint at step 4 ({wd}/checkpoints/4)" in resumed, resumed[-3000:]
  assert "train step 5/" in resumed and f"train step {STEPS}/" in resumed and "train step 4/" not in resumed
  assert sorted(int(s) for s in paths.listdir(f"{wd}/checkpoints") if s.isdigit())[-1] == STEPS
  straight, meta_a = checkpoint.load_params(str(tmp_path / "straight"))
  params, meta_b = checkpoint.load_params(wd)  # read back through tensorstore's gs:// driver
  assert meta_a["step"] == meta_b["step"] == STEPS
  _leaves_equal(straight, params)  # bit-exact: kill -9 on gs:// lost nothing the rerun did not redo identically
  assert paths.exists(f"{wd}/tokenizer/tokenizer.json") and paths.exists(f"{wd}/config.json")
  phase("resume + bit-exact check")

  # convert to_hf straight from the bucket (parity vs transformers is test_convert's job; the weights are checked
  # against the checkpoint here, and the tokenizer came along from gs://).
  from bertjax.convert.__main__ import main as convert_main
  from safetensors.numpy import load_file
  hf_dir = tmp_path / "hf"
  assert convert_main(["to_hf", f"--checkpoint={wd}", f"--out={hf_dir}", "--no-verify"]) == 0
  assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= set(os.listdir(hf_dir))
  hf = load_file(str(hf_dir / "model.safetensors"))
  word = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(hf["bert.embeddings.word_embeddings.weight"], word)
  phase("to_hf")

  # A fine-tune initialised from the gs:// checkpoint (its tokenizer found beside it), into a gs:// workdir.
  sys.path.insert(0, os.path.dirname(HERE))
  from configs import classify
  f = classify.get_config()
  f.init_checkpoint, f.init_from_hf, f.model.preset, f.seed = wd, "", "", 0
  train = write(tmp_path / "train.jsonl", ROWS * 4)
  f.data.update(train_file=train, validation_file=train, cache_dir=cache_dir, max_seq_length=16, tokenizer="")
  f.training.update(global_batch_size=8, eval_batch_size=8, num_epochs=1.0, async_checkpointing=False)
  ft = f"{gcs}/finetune"
  train_and_evaluate(f, ft)
  tuned, meta = checkpoint.load_params(ft)
  assert meta["head"] == "sequence_classification" and meta["step"] == 3
  diff = np.abs(tuned["bert"]["embeddings"]["word_embeddings"]["embedding"] - word).max()
  assert 0 < diff < 1e-3, diff  # moved from the pretrained table by 3 small steps (a fresh init is ~0.02 away)
  assert paths.exists(f"{ft}/predictions/dev.jsonl") and paths.exists(f"{ft}/confusion_matrix_dev.png")
  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.path.dirname(HERE), "gs:"))  # no local
  phase("fine-tune")

  # predict from the gs:// fine-tune: the same predictions as from a local copy of that workdir.
  from bertjax import predict
  texts = tmp_path / "in.txt"
  texts.write_text("a fine film\npoor plot\nit was ok\n")
  out = tmp_path / "out.jsonl"
  assert predict.main([f"--checkpoint={ft}", f"--input={texts}", f"--output={out}"]) == 0
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(got) == 3 and all(g["label"] in ("neg", "neu", "pos") for g in got)
  with paths.staged_read(ft) as local:
    want = predict.Predictor.from_checkpoint(local)(["a fine film", "poor plot", "it was ok"])
  assert [g["label"] for g in got] == [w["label"] for w in want]
  np.testing.assert_allclose([list(g["probabilities"].values()) for g in got],
                             [list(w["probabilities"].values()) for w in want], atol=1e-6)
  phase("predict")
  print(f"gs:// end to end: {time.time() - t0:.1f} s {phases}")


def test_gs_path_without_gcsfs_is_one_line(monkeypatch, tmp_path):
  """No gcsfs installed: every path operation on gs:// says what to install in one line (no ImportError trace)."""
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
  want = 'gs://b/run: gs:// paths need the gcsfs package, which is not installed; pip install "bertjax[gcs]"'
  for op in (paths.exists, paths.isdir, paths.makedirs, paths.listdir, paths.read_text):
    with pytest.raises(UserError) as e:
      op("gs://b/run")
    assert str(e.value) == want
  assert paths.resolve("gs://b/run/") == "gs://b/run" and paths.join("gs://b", "run") == "gs://b/run"  # strings
  from bertjax.data import corpus
  with pytest.raises(UserError, match=r'^gs://b/c/\*\.txt: gs:// paths need the gcsfs package.*bertjax\[gcs\]"$'):
    corpus.load_documents("gs://b/c/*.txt", str(tmp_path))


def test_gs_workdir_without_gcsfs_exits_with_one_line(tmp_path):
  """`python -m bertjax.main --workdir=gs://...` with gcsfs hidden: exit 2 and one stderr line."""
  code = ("import importlib.util, runpy, sys; real = importlib.util.find_spec; "
          "importlib.util.find_spec = lambda n, *a: None if n == 'gcsfs' else real(n, *a); "
          "sys.argv = ['bertjax', '--config=" + os.path.join(os.path.dirname(HERE), "configs", "mlm.py") + "', "
          "'--workdir=gs://my-bucket/run', '--config.training.num_train_steps=1']; "
          "runpy.run_module('bertjax.main', run_name='__main__')")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                     env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and errors == [
      'bertjax: error: gs://my-bucket/run: gs:// paths need the gcsfs package, which is not installed; '
      'pip install "bertjax[gcs]"'], r.stderr[-3000:]
  assert "Traceback" not in r.stderr
