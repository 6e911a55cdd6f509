"""Reproduce the SIGABRT that XLA:CPU raises when many programs with collectives are in flight (issue #7).

  python benchmarks/cpu_collectives_abort.py async 3000    # aborts on a busy 2-core machine
  python benchmarks/cpu_collectives_abort.py serial 3000   # each program waited for: never aborts
  TIMEOUT=5 python benchmarks/cpu_collectives_abort.py async 3000   # a shorter XLA timeout: fails sooner

8 simulated CPU devices, a jitted step whose replicated scalar output needs an all-reduce, dispatched N times
without waiting (as a training or eval loop with async dispatch does) or waiting for each (what the trainer does
on a CPU mesh: `trainer.serial_collectives`). XLA:CPU runs all simulated devices on one thread pool and a
collective holds a pool thread until every participant has arrived; participants of later programs can hold
the threads an earlier one needs, and after `--xla_cpu_collective_call_terminate_timeout_seconds` (40 s by
default) XLA logs `Termination timeout for all reduce ... Expected 8 threads to join the rendezvous, but only 5
of them arrived on time` and aborts the process. It needs a loaded machine: with nothing else running the async
mode usually finishes.
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=" + os.environ.get("TIMEOUT", "40"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


def main(mode: str, n: int) -> None:
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.device_put(np.ones((64, 256), np.float32), NamedSharding(mesh, P("data")))
  w = jax.device_put(np.full((256, 256), 0.001, np.float32), NamedSharding(mesh, P()))

  @jax.jit
  def step(x, w):
    return jnp.mean(jnp.tanh(x @ w) @ w)  # a replicated scalar of row-sharded data: an all-reduce

  acc, t0 = None, time.time()
  for _ in range(n):
    m = step(x, w)
    acc = m if acc is None else acc + m
    if mode == "serial":
      m.block_until_ready()
  print(f"{mode}: {n} programs finished in {time.time() - t0:.1f}s (sum {float(acc):.3f})", flush=True)


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in ("async", "serial"):
    sys.exit("usage: python benchmarks/cpu_collectives_abort.py async|serial N")
  main(sys.argv[1], int(sys.argv[2]))
