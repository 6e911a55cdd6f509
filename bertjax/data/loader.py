"""Deterministic, resumable, per-process batches from in-memory example arrays, prefetched onto devices.

A batch is a pure function of (seed, step, process): epoch `e` visits the examples in permutation `e`, and a
per-batch transform (e.g. dynamic masking) gets a generator seeded by (seed, step, process). Resuming at
step `s` therefore reproduces exactly the batches an uninterrupted run would have seen; the checkpoint only
needs the step. Each process draws only its `global_batch / process_count` rows.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

from bertjax.errors import UserError

Batch = dict[str, np.ndarray]
Transform = Callable[[Batch, np.random.Generator], Batch]


class BatchSource:
  """Shuffled, epoch-based batches of the rows of `examples` (dict of equal-length arrays)."""

  def __init__(self, examples: Batch, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, transform: Transform | None = None, name: str = "train"):
    self.examples = examples
    self.n = len(next(iter(examples.values())))
    if global_batch % process_count:
      raise UserError(f"global batch {global_batch} is not divisible by the {process_count} processes")
    self.local_batch = global_batch // process_count
    if self.n < self.local_batch:
      raise UserError(f"the {name} split has {self.n} examples, fewer than one batch of {self.local_batch}; "
                      "lower the batch size or use a larger corpus")
    self.steps_per_epoch = self.n // self.local_batch
    self.seed, self.process_index, self.transform = seed, process_index, transform
    self._perm_epoch, self._perm = -1, None

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch, self.process_index]).permutation(self.n)
      self._perm_epoch = epoch
    return self._perm[i * self.local_batch:(i + 1) * self.local_batch]

  def batch(self, step: int) -> Batch:
    idx = self.indices(step)
    b = {k: v[idx] for k, v in self.examples.items()}
    if self.transform is not None:
      b = self.transform(b, np.random.default_rng([self.seed, step, self.process_index, 1]))
    return b

  def __call__(self, start_step: int) -> Iterator[Batch]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def eval_batches(examples: Batch, global_batch: int, transform: Transform | None, seed: int,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """The whole eval split in order, the last batch padded with weight-0 rows; fixed masking per seed.

  Every process gets the same number of batches and takes its own slice of each global batch.
  """
  n = len(next(iter(examples.values())))
  out = []
  for i, start in enumerate(range(0, n, global_batch)):
    idx = np.arange(start, start + global_batch)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    local = slice(process_index * global_batch // process_count, (process_index + 1) * global_batch // process_count)
    b = {k: v[idx[local]] for k, v in examples.items()}
    b["example_weights"] = valid[local].astype(np.float32)
    if transform is not None:
      b = transform(b, np.random.default_rng([seed, i, process_index, 2]))
    out.append(b)
  return out


def prefetch(batches: Iterator[Batch], put: Callable[[Batch], object], size: int = 2) -> Iterator[object]:
  """Run `put` (host -> device) on a background thread, keeping `size` batches ready."""
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  _END = object()

  def producer():
    try:
      for b in batches:
        item = put(b)
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
    except BaseException as e:  # surface errors in the consumer
      q.put(e)
    q.put(_END)

  t = threading.Thread(target=producer, daemon=True)
  t.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
