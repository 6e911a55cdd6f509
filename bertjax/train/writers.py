"""Metric writers without TensorFlow: TensorBoard event files (tensorboardX), the log, optional Weights & Biases.

`create(workdir, config)` gives process 0 the log, TensorBoard events in `workdir` and (with
`config.wandb.enabled`) a W&B run; other processes only log. Every writer has `write_scalars(step, {tag: value})`,
`write_hparams({name: value})`, `flush()` and `close()`. `read_scalars(logdir)` reads the scalars back (plots in
notebooks) without TensorFlow or TensorBoard.

Scalars are written as TensorFlow 2 writes them (a float32 scalar tensor under the `scalars` plugin), so
TensorBoard and its `EventFileLoader` read them exactly as they read the files clu's TensorFlow writer made.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from typing import Any, Mapping, Protocol

from tensorboardX import record_writer
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboardX.summary import hparams as hparams_summaries

from bertjax import paths
from bertjax.errors import UserError


class Writer(Protocol):
  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
  def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def close(self) -> None: ...


class LoggingWriter:
  """One DEBUG line per call: `[step] tag=value, ...` (clu's format; `--v=1` shows them). The trainer's own
  `train step N/M | ...` and `eval step` lines carry the same numbers at INFO, and config.json the hyperparameters."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
    logging.debug("[%d] %s", step, ", ".join(values))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.debug("[Hyperparameters] %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _UrlFile:
  """A tensorboardX record file on an object store: buffered, the whole object rewritten on flush."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    with paths.open(self.path, "wb") as f:
      f.write(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _UrlFactory:
  def directory_check(self, path: str) -> None:
    paths.makedirs(path)

  def open(self, path: str) -> _UrlFile:
    return _UrlFile(path)


class TensorBoardWriter:
  """Event files in `logdir` (local or any URL `bertjax.paths` handles). Records are written synchronously (a few
  bytes per call, at logging intervals) and flushed every `flush_secs` and on `flush()`, which is a real barrier:
  tensorboardX's queued FileWriter does not wait for its queue on flush."""

  def __init__(self, logdir: str, flush_secs: float = 30.0):
    logdir = paths.resolve(logdir)
    if paths.is_url(logdir):  # tensorboardX's own gs:// / s3:// writers need extra packages; use etils.epath
      record_writer.register_writer_factory(logdir.split(":", 1)[0], _UrlFactory())
    record_writer.directory_check(logdir)
    self.logdir, self.flush_secs = logdir, flush_secs
    self._events = EventsWriter(paths.join(logdir, "events"))
    self._flushed = time.monotonic()

  def _add(self, summary, step: int = 0) -> None:
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    if time.monotonic() - self._flushed > self.flush_secs:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    values = [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(), float_val=[float(v)]))
              for tag, v in scalars.items()]
    self._add(summary_pb2.Summary(value=values), step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for summary in hparams_summaries(dict(hparams), {}):
      self._add(summary)

  def flush(self) -> None:
    self._events.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    self._events.close()


def _import_wandb():
  try:
    import wandb  # optional: only with config.wandb.enabled
  except ImportError:
    raise UserError("config.wandb.enabled=True needs the wandb package: pip install wandb "
                    "(or drop --config.wandb.enabled)") from None
  return wandb


class WandbWriter:
  """A Weights & Biases run (wandb is imported only when enabled; it is not a bertjax dependency)."""

  def __init__(self, workdir: str, wandb_config: Mapping[str, Any]):
    wandb = _import_wandb()
    self._run = wandb.init(project=wandb_config.get("project") or "bertjax", entity=wandb_config.get("entity") or None,
                           name=wandb_config.get("name") or None, mode=wandb_config.get("mode") or None,
                           dir=workdir if paths.is_local(workdir) else None, resume="allow")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=int(step))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self._run.finish()


class MultiWriter:
  def __init__(self, writers: list):
    self.writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self) -> None:
    for w in self.writers:
      w.flush()

  def close(self) -> None:
    for w in self.writers:
      w.close()


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the event files directly in `logdir` (records are parsed with
  tensorboardX's protobufs; CRCs are not checked; a record still being written at the end is skipped)."""
  out: dict[str, dict[int, float]] = {}
  for name in sorted(paths.listdir(logdir)):
    if ".tfevents." not in name:
      continue
    with paths.open(paths.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):  # record: uint64 length, uint32 crc, data, uint32 crc
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + n + 4 > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
        elif v.metadata.plugin_data.plugin_name == "scalars" and v.tensor.float_val:
          out.setdefault(v.tag, {})[event.step] = v.tensor.float_val[0]
  return out


def check(config) -> None:
  """Raise the one-line UserError of a missing optional writer package before anything is written."""
  if config.get("wandb", {}).get("enabled"):
    _import_wandb()


def create(workdir: str, config=None, *, just_logging: bool = False) -> MultiWriter:
  """The run's writer: the log everywhere; TensorBoard (+ W&B if enabled) unless `just_logging` (process > 0)."""
  writers: list = [LoggingWriter()]
  if not just_logging:
    writers.append(TensorBoardWriter(workdir))
    wb = (config or {}).get("wandb", {})
    if wb.get("enabled"):
      writers.append(WandbWriter(workdir, wb))
  return MultiWriter(writers)
