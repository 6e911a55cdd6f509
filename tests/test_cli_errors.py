"""User mistakes: one clear `bertjax: error:` line, a non-zero exit, and the workdir left untouched."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(folder.rglob("*"))}


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds a run: its files must survive every failed invocation byte for byte."""
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "7" / "params").mkdir(parents=True)
  (wd / "checkpoints" / "7" / "params" / "blob").write_bytes(b"weights")
  (wd / "config.json").write_text('{"old": true}')
  (wd / "tokenizer").mkdir()
  (wd / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
  return wd


def run_main(workdir: Path, *overrides: str, devices: int = 1, cache: Path | None = None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", TF_CPP_MIN_LOG_LEVEL="3")
  if cache is not None:
    env["BERTJAX_CACHE"] = str(cache)
  cmd = [sys.executable, "-m", "bertjax.main", "--config=configs/mlm.py", f"--workdir={workdir}",
         "--config.model.preset=tiny", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


CASES = {
    "missing corpus": (["--config.data.corpus=/no/such/corpus.txt"], "/no/such/corpus.txt does not exist"),
    "unknown field": (["--config.training.num_train_stepz=3"], "unknown config field 'training.num_train_stepz'"),
    "heads": (["--config.model.hidden_size=100", "--config.model.num_attention_heads=3"],
              "hidden_size=100 is not divisible by model.num_attention_heads=3"),
    "positions": (["--config.data.max_seq_length=1024"], "max_seq_length=1024 exceeds the model's position table"),
    "zero batch": (["--config.training.global_batch_size=0"], "training.global_batch_size=0 must be a positive"),
    "negative learning rate": (["--config.optimizer.learning_rate=-0.001"],
                               "optimizer.learning_rate=-0.001 must be positive"),
    "short sequences": (["--config.data.max_seq_length=8"],
                        "data.max_seq_length=8 is too short for pretraining task; use at least 16"),
    "float16 training": (["--config.model.dtype=float16"],
                         "model.dtype=float16 is not supported for training (there is no loss scaling, so small "
                         "gradients underflow to 0); use model.dtype=bfloat16"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_mistakes_fail_with_one_line(case, workdir):
  before = snapshot(workdir)
  overrides, expected = CASES[case]
  r = run_main(workdir, *overrides)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert len(errors) == 1 and expected in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert snapshot(workdir) == before


def test_empty_corpus(workdir, tmp_path):
  corpus = tmp_path / "empty"
  corpus.mkdir()
  (corpus / "a.txt").write_text("\n   \n")
  before = snapshot(workdir)
  r = run_main(workdir, f"--config.data.corpus={corpus}", cache=tmp_path / "cache")
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1 and "is empty" in errors[0], r.stderr[-2000:]
  assert snapshot(workdir) == before


def test_batch_not_divisible_by_data_parallel_devices(workdir):
  before = snapshot(workdir)
  r = run_main(workdir, "--config.training.global_batch_size=12", devices=8)
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert "global_batch_size=12" in errors[0] and "data-parallel device count 8" in errors[0]
  assert snapshot(workdir) == before


def test_missing_config_file(workdir):
  before = snapshot(workdir)
  r = subprocess.run([sys.executable, "-m", "bertjax.main", "--config=configs/missing.py", f"--workdir={workdir}"],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert "--config=configs/missing.py: no such file" in errors[0] and "Traceback" not in r.stderr
  assert snapshot(workdir) == before


@pytest.mark.parametrize("field,value,expected", [
    ("optimizer.learning_rate", 0.0, "learning_rate=0.0 must be positive"),
    ("optimizer.learning_rate", float("nan"), "must be positive"),
    ("training.eval_batch_size", 0, "eval_batch_size=0 must be"),
    ("data.max_seq_length", 15, "use at least 16"),
    ("model.dtype", "float16", "use model.dtype=bfloat16")])
def test_check_config_rejects(field, value, expected):
  """The same checks in process (cheap): zero / NaN learning rate, empty eval batch, too-short pretraining pairs."""
  import sys
  sys.path.insert(0, str(REPO))
  from configs import mlm

  from bertjax.errors import UserError
  from bertjax.tasks import common
  c = mlm.get_config()
  common.check_config(c)  # the defaults pass
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(UserError, match=expected):
    common.check_config(c)


def test_float16_only_for_inference():
  """float16 trains without loss scaling, so training refuses it; evaluating (eval_only) in float16 is allowed."""
  sys.path.insert(0, str(REPO))
  from configs import mlm

  from bertjax.tasks import common
  c = mlm.get_config()
  c.model.dtype, c.training.eval_only = "float16", True
  common.check_config(c)
  c.model.dtype, c.training.eval_only = "bfloat16", False
  common.check_config(c)
