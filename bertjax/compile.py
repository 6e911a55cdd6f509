"""Compile the Trainer's train step for a TPU or GPU that is not here: memory per chip, FLOPs, collectives.

  python -m bertjax.compile --config=configs/mlm.py --target=v5e-8 [--config.<field>=value ...]
                            [--num_slices=2] [--find_max_batch]

The step is the Trainer's own (`Trainer.setup_steps`: its mesh, shardings, remat, scan, attention choice, dtype,
packing, accumulation), lowered on compile-only devices of the target (`jax.experimental.topologies`) and
compiled by that target's compiler; nothing runs and no data is read (the batch shapes come from the config).
TPU targets need libtpu (`pip install -e ".[tpu]"`, which works on a CPU laptop); GPU targets need the CUDA
plugin, ptxas and cuDNN (`pip install -e ".[gpu]"`, also without a GPU).

Prints per chip parameter / optimizer-state / temporary / total bytes against the chip's memory, FLOPs per step
(the model's formula: `cost_analysis()` counts a scanned layer once), the collectives in the compiled program,
the attention kernel found in it, and a roofline step-time ESTIMATE; the last line is one JSON object. A config
that does not fit is one line naming the shortfall and the knobs, exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import topologies

from bertjax import main as entry
from bertjax.data import pretraining as pt
from bertjax.errors import UserError
from bertjax.models import partitioning
from bertjax.models.bert import train_flops_per_sequence
from bertjax.tasks import common
from bertjax.train.trainer import Trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("target", None, "Chip and slice: v4-8, v5e-8, v5p-8, v6e-8, v5e-256, v4-32, ...; a100-40, "
                    "a100-80, h100, h200 (one GPU; h100x8: eight)")
flags.DEFINE_integer("num_slices", 1, "TPU slices joined over the data-centre network (mesh.dcn_shape data=-1)")
flags.DEFINE_bool("find_max_batch", False, "Find the largest global batch that fits (several compiles)")

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  memory: int  # bytes of HBM per device (one TPU chip, megacore; one GPU)
  peak_flops: float  # dense bfloat16 FLOP/s per device (vendor data sheets)
  hbm_bw: float  # bytes/s


# TPU: per chip (v4 / v5p as megacore, one device per chip); TensorCores per chip counted in the slice name.
TPUS = {"v4": (Chip(32 * GiB, 275e12, 1.2e12), 2), "v5e": (Chip(16 * GiB, 197e12, 0.819e12), 1),
        "v5p": (Chip(95 * GiB, 459e12, 2.765e12), 2), "v6e": (Chip(32 * GiB, 918e12, 1.64e12), 1)}
GPUS = {"a100-40": Chip(40 * GiB, 312e12, 1.555e12), "a100-80": Chip(80 * GiB, 312e12, 2.039e12),
        "h100": Chip(80 * GiB, 989e12, 3.35e12), "h200": Chip(141 * 10**9, 989e12, 4.8e12)}
# GpuTargetConfigProto fields XLA needs to compile for a GPU it does not see (vendor data; H100 as XLA's tests).
_GPU_INFO = {
    "a100-40": dict(cc=(8, 0), sms=108, fpus=64, smem_core=167936, smem_optin=166912, l2=41943040, clock=1.41,
                    name="NVIDIA A100-SXM4-40GB"),
    "a100-80": dict(cc=(8, 0), sms=108, fpus=64, smem_core=167936, smem_optin=166912, l2=41943040, clock=1.41,
                    name="NVIDIA A100-SXM4-80GB"),
    "h100": dict(cc=(9, 0), sms=132, fpus=128, smem_core=233472, smem_optin=232448, l2=52428800, clock=1.98,
                 name="NVIDIA H100 80GB HBM3"),
    "h200": dict(cc=(9, 0), sms=132, fpus=128, smem_core=233472, smem_optin=232448, l2=52428800, clock=1.98,
                 name="NVIDIA H200"),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


@dataclasses.dataclass
class Target:
  name: str
  platform: str  # tpu | gpu
  chip: Chip
  devices: list


def tpu_shape(n: int, dims: int) -> str:
  """The usual slice shape of `n` chips: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 ... (v4 / v5p), 1x1 -> 1x2 -> 2x2 -> 2x4 ->
  4x4 ... (v5e / v6e): double the smallest dimension, the last of equals."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if dims == 3 and n < 4:
    raise UserError(f"a v4 / v5p slice has at least 4 chips (8 TensorCores), not {n}")
  while int(np.prod(shape)) < n:
    small = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == small)] *= 2
  if int(np.prod(shape)) != n:
    raise UserError(f"{n} chips is not a TPU slice size; use a power of two")
  return "x".join(map(str, shape))


def resolve_target(name: str, num_slices: int = 1) -> Target:
  """Compile-only devices of the named target (one line naming what to install when its compiler is missing)."""
  name = (name or "").lower().strip()
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  if m:
    chip, cores = TPUS[m.group(1)]
    n = int(m.group(2)) // cores
    kw: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if m.group(1) == "v4":
      kw["chip_config_name"] = "megacore"
    if m.group(1) in ("v5e", "v6e") and n <= 8:
      kw["chips_per_host_bounds"] = (2, 4, 1) if n == 8 else (*map(int, tpu_shape(n, 2).split("x")), 1)
    topo = f"{m.group(1)}:{tpu_shape(n, 3 if m.group(1) in ('v4', 'v5p') else 2)}"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU to guard
    try:
      devices = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw).devices
    except RuntimeError as e:
      raise UserError(f"--target={name} needs libtpu to compile for TPUs ({str(e).splitlines()[0]}); "
                      'pip install -e ".[tpu]"') from None
    return Target(name, "tpu", chip, list(devices))
  m = re.fullmatch(r"(a100-40|a100-80|h100|h200)(?:x(\d))?", name)
  if m:
    n = int(m.group(2) or 1)
    if not 1 <= n <= 8:
      raise UserError(f"--target={name}: one host holds 1 to 8 GPUs")
    return Target(name, "gpu", GPUS[m.group(1)], gpu_devices(m.group(1), n))
  raise UserError(f"--target={name!r} is unknown; use v4-8, v5e-8, v5p-8, v6e-8 (or a bigger slice such as "
                  "v5e-256, v4-32), a100-40, a100-80, h100 or h200 (h100x8: eight GPUs)")


def gpu_target_config(kind: str, memory: int) -> str:
  g = _GPU_INFO[kind]
  return (f"gpu_device_info {{ threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152 "
          f"shared_memory_per_core: {g['smem_core']} threads_per_core_limit: 2048 core_count: {g['sms']} "
          f"fpus_per_core: {g['fpus']} block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 "
          f"block_dim_limit_z: 65535 memory_bandwidth: {int(GPUS[kind].hbm_bw)} l2_cache_size: {g['l2']} "
          f"clock_rate_ghz: {g['clock']} device_memory_size: {memory} shared_memory_per_block_optin: "
          f"{g['smem_optin']} cuda_compute_capability {{ major: {g['cc'][0]} minor: {g['cc'][1]} }} "
          "registers_per_core_limit: 65536 registers_per_block_limit: 65536 } platform_name: \"CUDA\" "
          f"dnn_version_info {{ major: 9 minor: 8 }} device_description_str: \"{g['name']}\"")


def gpu_devices(kind: str, n: int) -> list:
  """Compile-only CUDA devices from a GPU target description (needs the CUDA PJRT plugin, not a GPU)."""
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(kind, GPUS[kind].memory),
                                        topology=f"1x1x{n}")
  except (RuntimeError, NotImplementedError, ValueError) as e:
    raise UserError(f"--target={kind} cannot be compiled here: this jaxlib has no CUDA compiler "
                    f"({' '.join(str(e).split())[:160]}); install the CUDA plugin, ptxas and cuDNN "
                    '(pip install -e ".[gpu]", no GPU needed) or use a TPU target') from None
  return list(topo.devices)


# -- shapes -----------------------------------------------------------------------------------------------------
def model_config(config):
  """The architecture from the config alone (a pretraining run's vocabulary size: data.vocab_size)."""
  vocab = config.model.get("vocab_size") or config.data.get("vocab_size") or 30522
  return common.model_config(config, vocab_size=int(vocab))


def batch_shapes(config, cfg, global_batch: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of one global pretraining batch, made by the loader's own masker (and packer) from two
  synthetic pairs: the same keys, dtypes and trailing shapes as a real batch."""
  if config.task != "pretraining":
    raise UserError(f"bertjax.compile compiles pretraining steps; task={config.task!r} is not supported yet")
  d, L = config.data, int(config.data.max_seq_length)
  ids = np.zeros((2, L), np.int32)
  ids[:, :4] = [[2, 5, 3, 3]]
  pairs = {"input_ids": ids, "token_type_ids": np.zeros((2, L), np.int32), "word_starts": np.ones((2, L), bool),
           "nsp_labels": np.zeros(2, np.int32), "lengths": np.full(2, 4, np.int32), "provenance": np.zeros((2, 7))}
  if d.get("packing", False):
    pairs = pt.pack_pairs(pairs, int(d.get("max_segments_per_row", 4)))
  masker = pt.Masker(pt.MaskConfig(d.mask_prob, d.max_predictions_per_seq, d.mask_token_frac, d.random_token_frac,
                                   False), cfg.vocab_size, [0, 1, 2, 3], 4, 0)
  one = masker({k: v[:1] for k, v in pairs.items()}, np.random.default_rng(0))
  return {k: ((global_batch, *v.shape[1:]), v.dtype) for k, v in one.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a sharded abstract tree (the largest device, each shard counted)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total


# -- the compiled program ---------------------------------------------------------------------------------------
def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{kind: {count, bytes}} of the collectives in the compiled HLO text (result bytes per device; a loop body's
  collectives counted once, as the text has them)."""
  out: dict[str, dict[str, int]] = {}
  for m in _COLLECTIVE_RE.finditer(hlo):
    arrays = [(t, [int(s) for s in dims.split(",") if s]) for t, dims in _ARRAY_RE.findall(m.group(1))]
    if m.group(3) and len(arrays) > 1:  # an async start returns (operands, results): count the results
      arrays = arrays[len(arrays) // 2:]
    size = sum(int(np.prod(dims)) * (_BITS.get(t) or int(re.sub(r"\D", "", t.split("e")[0]) or 8)) // 8
               for t, dims in arrays)
    c = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
    c["count"] += 1
    c["bytes"] += size
  return out


def attention_kernel(hlo: str) -> str:
  if "tpu_custom_call" in hlo and "splash" in hlo.lower():
    return "splash"
  if "__cudnn$fmha" in hlo:
    return "cudnn"
  if "tpu_custom_call" in hlo:
    return "tpu_custom_call"
  return "none"


class Compiler:
  """The Trainer's step for one target, compiled at any global batch."""

  def __init__(self, config, target: Target):
    self.config, self.target = config, target
    self.rules = [tuple(r) for r in config.mesh.logical_axis_rules]

  def lower(self, global_batch: int):
    """(trainer, lowered train step, batch shapes) at `global_batch`."""
    config = self.config.copy_and_resolve_references()
    with config.unlocked():
      config.training.global_batch_size = global_batch
      config.training.eval_batch_size = global_batch
    one = jax.sharding.Mesh(np.array(self.target.devices[:1]), ("data",))
    with partitioning.use(one, self.rules):  # the config checks see the target's platform too
      trainer = Trainer(config, "/nonexistent-compile-only", devices=self.target.devices)
    with partitioning.use(trainer.mesh, self.rules):  # attention.choose sees the target's platform
      trainer.task.model_config = model_config(config)
      trainer.num_train_steps = max(1, int(config.training.num_train_steps))
      trainer.setup_steps()
      shapes = batch_shapes(config, trainer.task.model_config, global_batch)
      if trainer.accum > 1:
        shapes = {k: ((trainer.accum, s[0] // trainer.accum, *s[1:]), dt) for k, (s, dt) in shapes.items()}
      batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=trainer.batch_sh) for k, (s, dt) in shapes.items()}
      step = jax.ShapeDtypeStruct((), jnp.int32, sharding=trainer.repl)
      rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=trainer.repl)
      try:
        lowered = trainer.train_step.lower(trainer.abstract_params, trainer.abstract_opt, batch, step, rng)
      except RuntimeError as e:
        if "cuDNN not found" not in str(e):
          raise
        raise UserError(f"--target={self.target.name}: cuDNN attention needs the cuDNN library to compile (pip "
                        "install nvidia-cudnn-cu12), or set model.attention=xla") from None
    return trainer, lowered, shapes

  def compile(self, global_batch: int) -> dict:
    t0 = time.time()
    trainer, lowered, shapes = self.lower(global_batch)
    config = trainer.config
    result = {"target": self.target.name, "chips": len(self.target.devices), "global_batch": global_batch,
              "slices": len({getattr(d, "slice_index", 0) for d in self.target.devices}),
              "hosts": len({(getattr(d, "slice_index", 0), d.process_index) for d in self.target.devices}),
              "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
              "param_bytes": per_device_bytes(trainer.abstract_params),
              "opt_bytes": per_device_bytes(trainer.abstract_opt), "chip_memory_bytes": self.target.chip.memory}
    try:
      compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that does not fit its HBM
      text = " ".join(str(e).split())
      if "RESOURCE_EXHAUSTED" not in text and "ran out of memory" not in text.lower():
        raise
      temp = re.search(r"temporaries \(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)", text)
      used = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", text)
      temp_b = _bytes(temp.group(1), temp.group(2)) if temp else None
      total = (_bytes(used.group(1), used.group(2)) if used else
               temp_b + result["param_bytes"] + result["opt_bytes"] if temp_b else None)
      return {**result, "fits": False, "compile_s": round(time.time() - t0, 1), "total_bytes": total,
              "temp_bytes": temp_b, "compiler_message": text[:300]}
    mem = compiled.memory_analysis()
    hlo = self.last_hlo = compiled.as_text() or ""
    temp = int(mem.temp_size_in_bytes)
    total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp
                + mem.generated_code_size_in_bytes)
    n_enc = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(trainer.abstract_params)
                if "'bert'" in jax.tree_util.keystr(p) and "embeddings" not in jax.tree_util.keystr(p))
    seq = int(config.data.max_seq_length)
    rows_flops = train_flops_per_sequence(trainer.task.model_config, n_enc, seq, shapes["masked_positions"][0][-1])
    flops = rows_flops * global_batch
    chip, n = self.target.chip, len(self.target.devices)
    # HBM traffic per device and step, roughly: parameters read twice and written, optimizer state read and
    # written, every temporary written and read once.
    traffic = 3 * result["param_bytes"] + 2 * result["opt_bytes"] + 2 * temp
    est = max(flops / n / chip.peak_flops, traffic / chip.hbm_bw)
    return {**result, "fits": total <= chip.memory, "compile_s": round(time.time() - t0, 1), "temp_bytes": temp,
            "total_bytes": total, "flops_per_step": flops, "attention_kernel": attention_kernel(hlo),
            "collectives": collectives(hlo), "est_step_s": est, "est_sequences_per_s": global_batch / est,
            "est_bound": "compute" if flops / n / chip.peak_flops >= traffic / chip.hbm_bw else "memory"}


def _bytes(num: str, unit: str | None) -> int:
  return int(float(num) * {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def find_max_batch(comp: Compiler, dp: int, first: dict, resolution: int = 16) -> tuple[dict, dict | None]:
  """(largest fitting result, smallest refused result): a linear extrapolation of memory in the batch from the
  first compile, then bisection in multiples of the data-parallel size until within 1/resolution of each other."""
  def at(b):
    r = comp.compile(b)
    logging.info("global batch %d: %s (%.1f s)", b, "fits" if r["fits"] else "does not fit", r["compile_s"])
    return r

  lo = first if first["fits"] else None
  hi = None if first["fits"] else first
  if lo is not None and lo["temp_bytes"]:
    fixed = lo["total_bytes"] - lo["temp_bytes"]
    guess = int((comp.target.chip.memory - fixed) / (lo["temp_bytes"] / lo["global_batch"]) * 0.95)
  else:
    guess = first["global_batch"] // 2
  guess = max(dp, guess // dp * dp)
  while True:
    r = at(guess)
    if r["fits"]:
      lo = r if lo is None or r["global_batch"] > lo["global_batch"] else lo
      if hi is not None:
        break
      guess = max(guess + dp, int(guess * 1.25) // dp * dp)  # the extrapolation is close: step up a little
    else:
      hi = r if hi is None or r["global_batch"] < hi["global_batch"] else hi
      if lo is not None or guess <= dp:
        break
      guess = max(dp, int(guess * 0.8) // dp * dp)
  while lo is not None and hi is not None and hi["global_batch"] - lo["global_batch"] > max(
      dp, lo["global_batch"] // resolution):
    mid = (lo["global_batch"] + hi["global_batch"]) // 2 // dp * dp
    if mid in (lo["global_batch"], hi["global_batch"]):
      break
    r = at(mid)
    lo, hi = (r, hi) if r["fits"] else (lo, r)
  return lo, hi


def _gib(b) -> str:
  return "?" if b is None else f"{b / GiB:.2f} GiB"


def report(r: dict) -> None:
  print(f"target {r['target']}: {r['chips']} chips ({r['slices']} slice(s), {r['hosts']} host(s)), mesh {r['mesh']}, global batch {r['global_batch']} "
        f"(compiled in {r['compile_s']} s)")
  print(f"  per chip: parameters {_gib(r['param_bytes'])}, optimizer state {_gib(r['opt_bytes'])}, temporaries "
        f"{_gib(r['temp_bytes'])}, total {_gib(r['total_bytes'])} of {_gib(r['chip_memory_bytes'])}")
  if "flops_per_step" in r:
    print(f"  FLOPs per step {r['flops_per_step']:.4g} (model formula); attention kernel: {r['attention_kernel']}")
    for kind, c in sorted(r["collectives"].items()):
      print(f"  collective {kind}: {c['count']} in the program, {c['bytes'] / 2**20:.1f} MiB per device")
    print(f"  ESTIMATE (roofline, {r['est_bound']}-bound at the data-sheet peak): {r['est_step_s'] * 1e3:.1f} ms per "
          f"step, {r['est_sequences_per_s']:.0f} sequences/s")


def main(argv):
  del argv
  config = entry._load_config()
  if not FLAGS.target:
    raise UserError("--target is required, e.g. --target=v5e-8")
  if FLAGS.num_slices < 1:
    raise UserError(f"--num_slices={FLAGS.num_slices}: use 1 or more")
  target = resolve_target(FLAGS.target, FLAGS.num_slices)
  if FLAGS.num_slices > 1 and all(int(v) == 1 for v in dict(config.mesh.get("dcn_shape", {}) or {}).values()):
    with config.unlocked():
      config.mesh.dcn_shape = {"data": -1, "fsdp": 1, "tensor": 1}
  comp = Compiler(config, target)
  result = comp.compile(int(config.training.global_batch_size))
  if FLAGS.find_max_batch:
    mesh = result["mesh"]
    lo, hi = find_max_batch(comp, mesh["data"] * mesh["fsdp"], result)
    result["max_global_batch"] = lo["global_batch"] if lo else None
    result["refused_global_batch"] = hi["global_batch"] if hi else None
    if lo is not None and not result["fits"]:
      result = {**lo, "max_global_batch": lo["global_batch"], "refused_global_batch": result["refused_global_batch"]}
  report(result)
  if FLAGS.find_max_batch:
    print(f"  largest global batch that fits: {result['max_global_batch']} (refused: {result['refused_global_batch']})")
  print(json.dumps(result, sort_keys=True))
  sys.stdout.flush()
  if not result["fits"]:
    total, mem = result["total_bytes"], result["chip_memory_bytes"]
    need = (f"needs {_gib(total)} per chip ({_gib(result['temp_bytes'])} of temporaries), {_gib(total - mem)} more "
            f"than the chip's {_gib(mem)}" if total else f"does not fit the chip's {_gib(mem)}")
    raise UserError(f"global batch {result['global_batch']} on {target.name} {need} (compile {result['compile_s']} s);"
                    " lower training.global_batch_size, set model.remat=full, raise mesh fsdp (mesh.shape) or use "
                    "training.grad_accum_steps")


def run():
  # Compile-only: the local CPU runs nothing, and a CUDA plugin must not look for a driver (it skips its version
  # check when CUDA is not among the platforms to use).
  jax.config.update("jax_platforms", "cpu")
  try:
    app.run(main, flags_parser=entry._parse_flags)
  except UserError as e:
    entry._fail(str(e))


if __name__ == "__main__":
  run()
