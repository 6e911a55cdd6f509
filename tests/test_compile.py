"""`bertjax.compile`: the Trainer's step compiled for a TPU / GPU that is not here, and the activation layouts.

The TPU checks need libtpu (the `[tpu]` extra, in `[test]`); the GPU check needs the CUDA plugin and ptxas.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from bertjax import compile as bc
from bertjax.errors import UserError
from bertjax.train import sharding
from configs import mlm

from conftest import REPO

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install .[tpu])")


def _tiny(batch: int, seq: int, mesh: dict, **model) -> "object":
  c = mlm.get_config()
  c.model.preset = "tiny"  # 2 layers, hidden 128, 2 heads: one head per tensor shard
  c.model.update(model)
  c.data.max_seq_length, c.data.short_seq_length, c.data.vocab_size = seq, 0, 512
  c.training.global_batch_size = batch
  c.mesh.shape = mesh
  return c


def test_activations_follow_the_logical_axis_rules():
  """data 2 x fsdp 2 x tensor 2 (CPU): each layer's activations are pinned by the rules (batch over data x fsdp,
  heads and mlp over tensor), and no collective gathers a whole global batch of activations. Before the
  constraints, the embedding lookup all-gathered f32[16,32,128] (the whole batch's embeddings) on every device."""
  target = bc.Target("cpu-8", "cpu", bc.Chip(1 << 30, 1e12, 1e11), jax.devices())
  comp = bc.Compiler(_tiny(16, 32, {"data": 2, "fsdp": 2, "tensor": 2}), target)
  _, lowered, _ = comp.lower(16)
  text = lowered.as_text()
  pinned = lambda spec, shape: len(re.findall(rf"sharding_constraint %\w+ <@mesh, \[{re.escape(spec)}\]> : "
                                              rf"tensor<{shape}xf32>", text))
  # per layer and direction (forward, and the backward's constraint on the cotangent) of the 2 layers:
  assert pinned('{"data", "fsdp"}, {}, {"tensor"}', "16x32x512") == 2 * 2  # the MLP's inner activation
  assert pinned('{"data", "fsdp"}, {}, {"tensor"}, {}', "16x32x2x64") == 2 * 2 * 3  # q, k, v
  assert pinned('{"data", "fsdp"}, {}, {}', "16x32x128") == 2 * (1 + 2 * 2)  # embeddings; each layer's 2 outputs
  r = comp.compile(16)
  gathered = re.findall(r"= (\w+)\[16,32,\d+\]\S* all-gather", comp.last_hlo)
  assert gathered == [], f"whole-batch activations all-gathered: {gathered}"
  assert {"all-gather", "all-reduce"} <= set(r["collectives"])  # fsdp weight gathers, tensor / gradient sums


@needs_libtpu
def test_tpu_compile_has_splash_and_the_mesh_collectives():
  """v5e-8 as data 2 x fsdp 2 x tensor 2: `auto` picks splash on the multi-chip mesh (shard_map over batch and
  heads) and it is in the compiled program as a Mosaic custom call; fsdp gathers weights, tensor sums."""
  c = _tiny(16, 128, {"data": 2, "fsdp": 2, "tensor": 2}, dtype="bfloat16")
  r = bc.Compiler(c, bc.resolve_target("v5e-8")).compile(16)
  assert r["attention_kernel"] == "splash"
  assert r["chips"] == 8 and r["fits"] and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert {"all-gather", "all-reduce"} <= set(r["collectives"]), r["collectives"]
  assert r["flops_per_step"] > 0 and 0 < r["est_step_s"] < 1


@needs_libtpu
def test_oversized_batch_is_one_line_and_exit_2():
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  p = subprocess.run([sys.executable, "-m", "bertjax.compile", "--config=configs/mlm.py", "--target=v5e-8",
                      "--config.training.global_batch_size=1048576", "--config.model.dtype=bfloat16"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  last = json.loads(p.stdout.strip().splitlines()[-1])
  assert last["fits"] is False and last["temp_bytes"] > last["chip_memory_bytes"]
  errors = [line for line in p.stderr.splitlines() if line.startswith("bertjax: error:")]
  assert len(errors) == 1 and "remat=full" in errors[0] and "fsdp" in errors[0], p.stderr[-2000:]


# The GPU compiler: JAX's CUDA plugin (matching jaxlib), ptxas and cuDNN, without the CUDA runtime. It stays out of the
# test environment (imported, the plugin prints a driver probe to stderr in every JAX process, which the one-line
# error tests would see), so the test installs it into a folder of its own, once, and compiles with it on PYTHONPATH.
CUDA_COMPILER = ["jax-cuda12-plugin=={v}", "jax-cuda12-pjrt=={v}", "nvidia-cuda-nvcc-cu12>=12.6",
                 "nvidia-cudnn-cu12>=9.8,<10"]


@pytest.fixture(scope="session")
def cuda_compiler() -> str:
  """$BERTJAX_CUDA_COMPILER, or a `pip install --target` folder under the bertjax cache (made on first use)."""
  path = os.environ.get("BERTJAX_CUDA_COMPILER") or os.path.join(
      os.environ.get("BERTJAX_CACHE") or os.path.expanduser("~/.cache/bertjax"), f"cuda-compiler-{jax.__version__}")
  if not os.path.isdir(os.path.join(path, "jax_plugins")):
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", path,
                        *(r.format(v=jax.__version__) for r in CUDA_COMPILER)], capture_output=True, text=True)
    if p.returncode:
      pytest.skip(f"could not install the CUDA compiler into {path}: {p.stderr.strip().splitlines()[-1:]}")
  return path


def test_gpu_compile_has_cudnn_attention_and_fsdp_collectives(cuda_compiler):
  """h100x2 as fsdp 2: `auto` picks cuDNN flash attention per device (shard_map) and it is in the compiled
  program as a cuDNN custom call; fsdp gathers weights and reduce-scatters gradients."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join((cuda_compiler, str(REPO)))}
  p = subprocess.run([sys.executable, "-m", "bertjax.compile", "--config=configs/mlm.py", "--target=h100x2",
                      "--config.training.global_batch_size=16", "--config.model.dtype=bfloat16",
                      "--config.data.short_seq_length=0", "--config.mesh.shape={'data': 1, 'fsdp': 2, 'tensor': 1}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  assert r["attention_kernel"] == "cudnn" and r["chips"] == 2 and r["fits"]
  assert {"all-gather", "reduce-scatter"} <= set(r["collectives"]), r["collectives"]


def test_target_names():
  assert [bc.tpu_shape(n, 2) for n in (1, 4, 8, 16, 256)] == ["1x1", "2x2", "2x4", "4x4", "16x16"]
  assert [bc.tpu_shape(n, 3) for n in (4, 8, 16, 32)] == ["2x2x1", "2x2x2", "2x2x4", "2x4x4"]
  with pytest.raises(UserError, match="is unknown"):
    bc.resolve_target("v9-8")
  with pytest.raises(UserError, match="1 to 8 GPUs"):
    bc.resolve_target("h100x9")


@needs_libtpu
@pytest.mark.parametrize("target,shape", [
    ("v5e-256", {"data": -1}),  # the default mesh: make_mesh walked the torus, interleaving the 64 hosts' chips
    ("v5e-256", {"data": -1, "fsdp": 4}),  # fsdp along a torus row spans two hosts
    ("v5e-256", {"data": -1, "fsdp": 16}),
    ("v4-32", {"data": -1, "fsdp": 2}),
    ("v6e-64", {"data": -1, "fsdp": 4}),  # make_mesh cannot lay this one out at all
])
def test_multi_host_slice_gives_each_process_its_block_of_rows(target, shape):
  """The loader gives process p rows [p B/P, (p+1) B/P) of every global batch: the mesh must place them there."""
  devices = bc.resolve_target(target).devices
  mesh = sharding.make_mesh(shape, devices)
  procs = sorted({d.process_index for d in devices})
  dp = sharding.data_parallel_size(mesh)
  assert [sharding.process_batch_rows(mesh, dp, p) for p in procs] == [
      (i * dp // len(procs), (i + 1) * dp // len(procs)) for i in range(len(procs))]
