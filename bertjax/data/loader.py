"""Deterministic, resumable batches from example arrays, the same global batches for any process count.

The global batch at step `s` is a pure function of (seed, s): epoch `e` visits the examples in permutation `e`
(seeded by the seed and epoch only), and a per-batch transform (e.g. dynamic masking) gets a generator seeded
by (seed, step). Each of `process_count` processes takes its contiguous slice of the global batch (rows
`[i * B / P, (i + 1) * B / P)`), reads only those rows of `examples` (which may be lazily read arrays such as
`np.memmap`) and transforms only them. The transform's per-row random numbers come from a counter-based stream
addressed by global row (`RowRandom`): a process computes only its rows' numbers, and 2 processes see exactly
the rows and the masking that 1 process sees.
Resuming at step `s` reproduces the batches an uninterrupted run would have seen; the checkpoint only needs the
step.

Length bucketing (`buckets`, fine-tuning and prediction): a batch keeps only the first `bucket` columns of every
[B, L] array, the smallest bucket that holds the longest example of the GLOBAL batch (so every process cuts the
same width), i.e. only padding columns are dropped; the examples and their order are unchanged. The jitted steps
see at most `len(buckets)` shapes, which `bucket_plan` lists in advance for a warm-up compile.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from bertjax.errors import UserError

Batch = dict[str, np.ndarray]
Transform = Callable[[Batch, "RowRandom"], Batch]  # or a np.random.Generator (warm-up batches)
# The 0 in the seeds below stood for the process index when every process drew its own stream; it stays so that
# the data order (the epoch permutations) is that of earlier versions.
_LEGACY_PROCESS = 0


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x):
  """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


class RowRandom:
  """A numpy Generator stand-in whose numbers are addressed by global row, so each process draws only its own.

  A transform sees the local rows `[lo, hi)` of a global batch of `global_rows`. Its k-th draw is a counter-based
  stream (SplitMix64 at position `flat index of the element in the global [global_rows, ...] draw`, keyed by the
  seed words and k): a draw whose leading dimension is the local row count computes only the local rows'
  numbers, so every row's numbers are the same whichever process transforms it, and a process's work is its
  share of the batch. Other draws (scalars, other shapes) are computed whole: identical on every process.
  `drawn` counts the numbers computed.
  """

  def __init__(self, seed_words, global_rows: int, lo: int, hi: int):
    key = np.uint64(0)
    with np.errstate(over="ignore"):
      for w in seed_words:
        key = _mix64(key ^ (np.uint64(int(w) % 2**64) + _GOLDEN))
    self._key, self._global, self._lo, self._hi = key, global_rows, lo, hi
    self._draws, self.drawn = 0, 0

  def _uniform(self, size) -> np.ndarray:
    """float64 in [0, 1) of `size`, 53 random bits each."""
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size) if size is not None else ()
    rest = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
    first = self._lo if shape and shape[0] == self._hi - self._lo else 0
    n = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):
      key = _mix64(self._key + np.uint64(self._draws + 1) * _GOLDEN)
      counter = np.arange(first * rest, first * rest + n, dtype=np.uint64)
      bits = _mix64(key + (counter + np.uint64(1)) * _GOLDEN)
    self._draws += 1
    self.drawn += n
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)

  def random(self, size=None, dtype=np.float64):
    return self._uniform(size).astype(dtype)

  def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
    low, high = (0, low) if high is None else (low, high)
    span = high - low + (1 if endpoint else 0)
    return (low + np.floor(self._uniform(size) * span)).astype(dtype)

  def uniform(self, low=0.0, high=1.0, size=None):
    return low + (high - low) * self._uniform(size)

  def __getattr__(self, name):
    raise AttributeError(f"RowRandom has no {name!r}: a batch transform may draw only random / integers / "
                         "uniform, so that its numbers do not depend on the process count")


def bucket_lengths(spec: str | Sequence[int] | None, max_len: int) -> tuple[int, ...]:
  """Bucket widths from `data.bucket_lengths`: "auto" (multiples of 16 up to 64, then powers of two, then
  `max_len`), "" / "off" / "none" (no bucketing: ()), or explicit widths ("16,32,48" or a list); `max_len` is
  always the last bucket and widths above it are dropped."""
  if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "off", "none", "false")):
    return ()
  if isinstance(spec, str) and spec.strip().lower() == "auto":
    widths = [16, 32, 48, 64] + [2 ** k for k in range(7, 12)]
  else:
    try:
      widths = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
      raise UserError(f"data.bucket_lengths={spec!r}: use 'auto', '' (off) or comma-separated lengths like "
                      "'16,32,64'") from None
    if any(w < 1 for w in widths):
      raise UserError(f"data.bucket_lengths={spec!r}: lengths must be positive")
  return tuple(sorted({w for w in widths if w < max_len} | {max_len}))


def data_buckets(data) -> tuple[int, ...]:
  """The bucket widths a fine-tuning task's `config.data` asks for (`bucket_lengths`, default "auto")."""
  return bucket_lengths(data.get("bucket_lengths", "auto"), data.max_seq_length)


def row_lengths(mask) -> np.ndarray:
  """Per row, 1 + the index of its last non-zero entry (0 for an all-zero row): the columns it needs."""
  nz = np.asarray(mask) != 0
  return np.where(nz.any(1), nz.shape[1] - np.argmax(nz[:, ::-1], axis=1), 0)


def crop(batch: Batch, width: int, full: int) -> Batch:
  """Every array whose second axis is the padded length `full` cut to its first `width` columns."""
  if width == full:
    return batch
  return {k: v[:, :width] if getattr(v, "ndim", 0) >= 2 and v.shape[1] == full else v for k, v in batch.items()}


class Buckets:
  """Which bucket width a set of rows needs; `length_key` (e.g. the attention mask) marks the real tokens."""

  def __init__(self, examples: Batch, widths: Sequence[int], length_key: str = "attention_mask"):
    self.full = examples[length_key].shape[1]
    self.widths = np.asarray(sorted(widths or [self.full]))
    if self.widths[-1] != self.full:
      raise ValueError(f"the largest bucket {self.widths[-1]} is not the padded length {self.full}")
    self.lengths = row_lengths(examples[length_key])

  def width(self, rows: np.ndarray) -> int:
    """The smallest bucket holding every row of `rows` (indices into the examples)."""
    longest = int(self.lengths[rows].max()) if len(rows) else 0
    return int(self.widths[np.searchsorted(self.widths, longest)])


def first_fit(lengths: np.ndarray, capacity: int, max_segments: int) -> list[list[int]]:
  """First-fit packing: each item (in order) goes into the earliest row with room for it and fewer than
  `max_segments` items, else into a new row. -> rows of item indices, in row-creation order."""
  rows: list[list[int]] = []
  open_rows = np.zeros(0, np.int64)  # rows that may still take an item, in creation order
  room = np.zeros(0, np.int64)
  lengths = np.asarray(lengths, np.int64)
  shortest = int(lengths.min()) if len(lengths) else 1  # a row with less room than this is full for good
  for i, n in enumerate(lengths):
    fits = np.flatnonzero(room >= n)
    if len(fits):
      j = fits[0]
      r = int(open_rows[j])
      rows[r].append(i)
      room[j] -= n
      if len(rows[r]) >= max_segments or room[j] < shortest:
        open_rows, room = np.delete(open_rows, j), np.delete(room, j)
    else:
      rows.append([i])
      if max_segments > 1 and capacity - n >= shortest:
        open_rows, room = np.append(open_rows, len(rows) - 1), np.append(room, capacity - n)
  return rows


def packed_inputs(batch: Batch) -> dict:
  """The packing arrays of a packed batch (`Packer`, `pretraining.pack_pairs`) to pass to the model; {} else."""
  return {k: batch[k] for k in ("position_ids", "segment_ids", "cls_positions") if k in batch}


class Packer:
  """Fine-tuning packing: the examples of a batch (same examples, same order) first-fit into rows of the padded
  length, several per row, each keeping its own [CLS] (`cls_positions` [B]: flat index row * L + column into
  the GLOBAL batch's rows), `segment_ids` (attention stays within an example) and `position_ids` restarting per
  example. Per-example arrays (labels, weights) keep their [B] rows. The row count is rounded up to a multiple
  of `row_multiple` and decided from the global batch (the most any process needs), so every process agrees.
  `token_keys` name the [N, L] arrays to pack (default: every array L wide); `fill` gives their value where no
  example sits (default 0; e.g. the ignored label for per-token labels)."""

  def __init__(self, examples: Mapping[str, np.ndarray], row_multiple: int, length_key: str = "attention_mask",
               token_keys: Sequence[str] | None = None, fill: Mapping[str, int] | None = None):
    self.full = examples[length_key].shape[1]
    self.lengths = row_lengths(examples[length_key])
    self.row_multiple = max(1, int(row_multiple))
    self.token_keys = None if token_keys is None else set(token_keys)
    self.fill = dict(fill or {})

  def rows_needed(self, global_rows: np.ndarray, processes: int) -> int:
    """Rows per process for a global batch (its example indices), rounded up to `row_multiple`."""
    most = max(len(first_fit(self.lengths[part], self.full, self.full))
               for part in np.split(global_rows, processes))
    return -(-most // self.row_multiple) * self.row_multiple

  def pack(self, batch: Batch, rows: np.ndarray, n_rows: int, process_index: int) -> Batch:
    """This process's `batch` (examples `rows`) packed into `n_rows` rows."""
    L, lengths = self.full, self.lengths[rows]
    token = {k: v for k, v in batch.items() if (k in self.token_keys if self.token_keys is not None else
                                                 getattr(v, "ndim", 0) >= 2 and v.shape[1] == L)}
    out = {k: v for k, v in batch.items() if k not in token}
    packed = {k: np.full((n_rows, L), self.fill.get(k, 0), v.dtype) for k, v in token.items()}
    seg, pos = np.zeros((n_rows, L), np.int32), np.zeros((n_rows, L), np.int32)
    cls = np.zeros(len(rows), np.int32)
    for r, members in enumerate(first_fit(lengths, L, L)):
      col = 0
      for s, i in enumerate(members):
        n = int(lengths[i])
        for k, v in token.items():
          packed[k][r, col:col + n] = v[i, :n]
        seg[r, col:col + n], pos[r, col:col + n] = s + 1, np.arange(n)
        cls[i] = (process_index * n_rows + r) * L + col
        col += n
    return {**out, **packed, "segment_ids": seg, "position_ids": pos, "cls_positions": cls}

  def warmup_batch(self, batch: Batch, n_rows: int) -> Batch:
    """A zero batch shaped like `pack`'s output for `batch` in `n_rows` rows (for compiling ahead)."""
    out = self.pack(batch, np.zeros(0, np.int64), n_rows, 0)
    out["cls_positions"] = np.zeros(len(next(iter(batch.values()))), np.int32)
    return out


def process_slice(global_batch: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous rows `[lo, hi)` of a global batch that one process reads."""
  if global_batch % process_count:
    raise UserError(f"global batch {global_batch} is not divisible by the {process_count} processes")
  local = global_batch // process_count
  return process_index * local, (process_index + 1) * local


class BatchSource:
  """Shuffled, epoch-based global batches of the rows of `examples` (dict of equal-length arrays, all rows)."""

  def __init__(self, examples: Batch, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, transform: Transform | None = None, name: str = "train",
               buckets: Sequence[int] = (), packer: Packer | None = None):
    self.examples = examples
    self.packer = packer  # several examples per row (then `buckets` is not used)
    self.buckets = Buckets(examples, buckets) if buckets and self.packer is None else None
    self.process_index, self.process_count = process_index, process_count
    self.n = len(next(iter(examples.values())))
    self.lo, self.hi = process_slice(global_batch, process_index, process_count)
    self.global_batch, self.local_batch = global_batch, self.hi - self.lo
    if self.n < global_batch:
      raise UserError(f"the {name} split has {self.n} examples, fewer than one global batch of {global_batch}; "
                      "lower the batch size or use a larger corpus")
    self.steps_per_epoch = self.n // global_batch
    self.seed, self.transform = seed, transform
    self._perm_epoch, self._perm = -1, None

  def global_indices(self, step: int) -> np.ndarray:
    """The example indices of the whole global batch at `step` (the same for every process count)."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch, _LEGACY_PROCESS]).permutation(self.n)
      self._perm_epoch = epoch
    return self._perm[i * self.global_batch:(i + 1) * self.global_batch]

  def indices(self, step: int) -> np.ndarray:
    """This process's rows of the global batch at `step`."""
    return self.global_indices(step)[self.lo:self.hi]

  def batch(self, step: int) -> Batch:
    idx = self.indices(step)
    order = np.argsort(idx, kind="stable")  # read rows in file order (cheap on memmaps), then restore the order
    b = {k: _take(v, idx, order) for k, v in self.examples.items()}
    if self.buckets is not None:  # decided on the global batch: every process cuts the same width
      b = crop(b, self.buckets.width(self.global_indices(step)), self.buckets.full)
    if self.packer is not None:
      n_rows = self.packer.rows_needed(self.global_indices(step), self.process_count)
      b = self.packer.pack(b, idx, n_rows, self.process_index)
    if self.transform is not None:
      b = self.transform(b, RowRandom([self.seed, step, _LEGACY_PROCESS, 1], self.global_batch, self.lo, self.hi))
    return b

  def bucket_plan(self, start: int, stop: int) -> list[int]:
    """The bucket widths (packed: row counts) the batches of steps [start, stop) use, for a warm-up compile;
    [] without buckets or packing."""
    if self.packer is not None:
      return sorted({self.packer.rows_needed(self.global_indices(s), self.process_count) for s in range(start, stop)})
    if self.buckets is None or stop <= start:
      return []
    widths, epoch = set(), start // self.steps_per_epoch
    while epoch * self.steps_per_epoch < stop:
      lo = max(start - epoch * self.steps_per_epoch, 0)
      hi = min(stop - epoch * self.steps_per_epoch, self.steps_per_epoch)
      perm = np.random.default_rng([self.seed, epoch, _LEGACY_PROCESS]).permutation(self.n)
      rows = perm[:self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, -1)[lo:hi]
      longest = self.buckets.lengths[rows].max(1)
      widths.update(int(w) for w in self.buckets.widths[np.searchsorted(self.buckets.widths, longest)])
      epoch += 1
    return sorted(widths)

  def warmup_batch(self, width: int) -> Batch:
    """A zero batch shaped like this process's batches of bucket `width` (for compiling ahead of the loop)."""
    b = {k: np.zeros((self.local_batch, *v.shape[1:]), v.dtype) for k, v in self.examples.items()}
    b = crop(b, width, self.buckets.full) if self.buckets is not None else b
    if self.packer is not None:  # `width` is the row count
      b = self.packer.warmup_batch(b, width)
    return b if self.transform is None else self.transform(b, np.random.default_rng(0))

  def __call__(self, start_step: int) -> Iterator[Batch]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def _take(array, idx: np.ndarray, order: np.ndarray) -> np.ndarray:
  """`array[idx]` reading the rows in ascending order (lazy arrays read each row once, front to back)."""
  if isinstance(array, np.ndarray) and not isinstance(array, np.memmap):
    return array[idx]
  out = np.asarray(array[idx[order]])
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return out[inverse]


def eval_batches(examples: Batch, global_batch: int, transform: Transform | None, seed: int,
                 process_index: int = 0, process_count: int = 1, buckets: Sequence[int] = (),
                 packer: Packer | None = None) -> list[Batch]:
  """The whole eval split in order, the last batch padded with weight-0 rows; fixed masking per seed.

  Every process gets the same number of batches and takes its own contiguous slice of each global batch; the
  masking of a row does not depend on the process count. With `buckets`, each batch is cut to the bucket of its
  global batch's longest row (see the module doc).
  """
  n = len(next(iter(examples.values())))
  lo, hi = process_slice(global_batch, process_index, process_count)
  cut = Buckets(examples, buckets) if buckets and packer is None else None
  out = []
  for i, start in enumerate(range(0, n, global_batch)):
    idx = np.arange(start, start + global_batch)[lo:hi]
    valid = idx < n
    idx = np.where(valid, idx, 0)
    b = {k: v[idx] for k, v in examples.items()}
    if cut is not None:
      b = crop(b, cut.width(np.arange(start, min(start + global_batch, n))), cut.full)
    b["example_weights"] = valid.astype(np.float32)
    if packer is not None:
      every = np.where(np.arange(start, start + global_batch) < n, np.arange(start, start + global_batch), 0)
      b = packer.pack(b, idx, packer.rows_needed(every, process_count), process_index)
    if transform is not None:
      b = transform(b, RowRandom([seed, i, _LEGACY_PROCESS, 2], global_batch, lo, hi))
    out.append(b)
  return out


def prefetch(batches: Iterator[Batch], put: Callable[[Batch], object], size: int = 2) -> Iterator[object]:
  """Run `put` (host -> device) on a background thread, keeping `size` batches ready.

  Closing the iterator (end of training, early stopping, preemption) stops the thread and joins it: a daemon
  thread still inside XLA's C++ when the interpreter exits is torn down by a forced unwind that C++ `catch (...)`
  blocks swallow ("terminate called after throwing an instance of ... FATAL: exception not rethrown"), and the
  process dies with SIGABRT instead of its exit code.
  """
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  _END = object()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def producer():
    try:
      for b in batches:
        if stop.is_set() or not offer(put(b)):
          return
    except BaseException as e:  # surface errors in the consumer
      offer(e)
      return
    offer(_END)

  t = threading.Thread(target=producer, daemon=True, name="bertjax-prefetch")
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
    t.join(timeout=120)  # at most one batch being built / transferred
    if t.is_alive():
      logging.warning("the prefetch thread did not stop within 120 s")
