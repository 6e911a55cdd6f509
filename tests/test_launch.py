"""launch/ scripts under DRY_RUN=1: the exact commands they would run (every host, a gs:// workdir kept as is)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["python", "-m", "bertjax.main"]


def dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  full = {k: v for k, v in os.environ.items() if k not in ("TPU", "ZONE", "BUCKET", "WORKDIR", "SHARED_FS", "CONFIG", "REPO", "REF")}
  full.update(env, DRY_RUN="1", PATH="/usr/bin:/bin")  # no gcloud / srun needed: nothing is run
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], env=full, capture_output=True, text=True,
                        timeout=30)


def test_tpu_vm_runs_the_same_command_on_every_worker_with_the_bucket_workdir():
  r = dry_run("tpu_vm.sh", "--config.model.preset=base", "--config.data.corpus=gs://b/corpus/*.txt",
              "--config.x=it's", TPU="my-tpu", ZONE="us-central2-b", BUCKET="my-bucket",
              REPO="https://example.com/me/bertjax.git")
  assert r.returncode == 0, r.stderr
  (line,) = r.stdout.splitlines()
  argv = shlex.split(line)
  assert argv[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                       "--worker=all", "--command"]
  remote = shlex.split(argv[10])
  train = remote[remote.index("python"):]
  assert train == [*TRAIN, "--config=configs/mlm.py", "--workdir=gs://my-bucket/bertjax/mlm",
                   "--config.model.preset=base", "--config.data.corpus=gs://b/corpus/*.txt", "--config.x=it's"]
  assert "[ -d bertjax ] || git clone https://example.com/me/bertjax.git bertjax;" in argv[10]
  assert "pip install -q -e '.[tpu]'" in argv[10]  # the [tpu] extra includes [gcs] (gcsfs) for the gs:// workdir
  pinned = dry_run("tpu_vm.sh", TPU="t", ZONE="z", BUCKET="b", REPO="git@example.com:me/bertjax.git", REF="v1")
  assert "git clone --branch v1 git@example.com:me/bertjax.git bertjax;" in pinned.stdout


def test_tpu_vm_needs_the_repository_to_clone():
  r = dry_run("tpu_vm.sh", TPU="t", ZONE="z", BUCKET="b")
  assert r.returncode != 0 and r.stdout == "" and len(r.stderr.splitlines()) == 1
  assert "set REPO to the git URL of the bertjax repository the TPU hosts clone" in r.stderr


def test_accelerator_extras_bring_the_gcs_backend():
  import tomllib
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  assert any(d.startswith("gcsfs") for d in extras["gcs"])
  assert "bertjax[gcs]" in extras["tpu"] and "bertjax[gcs]" in extras["gpu"]


def test_slurm_starts_one_process_per_node_with_srun():
  r = dry_run("gpu_slurm.sh", "--config.model.preset=base", WORKDIR="gs://my-bucket/run1")
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout) == ["srun", "--ntasks-per-node=1", *TRAIN, "--config=configs/mlm.py",
                                   "--workdir=gs://my-bucket/run1", "--distributed", "--config.mesh.shape.data=-1",
                                   "--config.model.dtype=bfloat16", "--config.model.preset=base"]
  shared = dry_run("gpu_slurm.sh", WORKDIR="/nfs/runs/1", SHARED_FS="1")
  assert shared.returncode == 0 and "--workdir=/nfs/runs/1" in shared.stdout


def test_local_multiprocess_starts_every_process_on_one_coordinator():
  r = dry_run("local_multiprocess.sh", "--config.training.num_train_steps=3", N="3", D="2", PORT="23456",
              WORKDIR="/tmp/w")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 3 and all(l.endswith(" &") for l in lines)
  for i, line in enumerate(lines):
    argv = shlex.split(line[:-2])
    assert argv[:7] == ["env", "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456", "JAX_NUM_PROCESSES=3", f"JAX_PROCESS_ID={i}",
                        "XLA_FLAGS=--xla_force_host_platform_device_count=2", "JAX_PLATFORMS=cpu", "python"]
    assert argv[9:11] == ["--config=configs/mlm.py", "--workdir=/tmp/w"]
    assert argv[-1] == "--config.training.num_train_steps=3"


@pytest.mark.parametrize("script,env", [("tpu_vm.sh", dict(TPU="t", ZONE="z", WORKDIR="workdirs/mlm")),
                                        ("gpu_slurm.sh", dict(WORKDIR="workdirs/mlm"))])
def test_multi_host_scripts_refuse_a_local_workdir(script, env):
  r = dry_run(script, **env)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.startswith("launch: error: WORKDIR=workdirs/mlm is not a bucket URL")


def test_missing_settings_are_named():
  r = dry_run("tpu_vm.sh", ZONE="z", BUCKET="b")
  assert r.returncode != 0 and "set TPU to the TPU VM name" in r.stderr and r.stdout == ""


def test_local_multiprocess_stops_every_process_when_one_fails(tmp_path):
  """Not a dry run: a stand-in `python` where process 1 fails at once and process 0 would wait for it forever."""
  fake = tmp_path / "python"
  fake.write_text('#!/bin/bash\nif [[ "$JAX_PROCESS_ID" == 1 ]]; then exit 7; fi\nexec sleep 120\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin", DRY_RUN="0")
  r = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh")], env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 7, r.stderr
