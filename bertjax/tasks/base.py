"""What the trainer needs from a task (pretraining, GLUE, SQuAD, NER): a small protocol."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax
from flax import nnx

from bertjax.data.loader import Batch, BatchSource
from bertjax.models.bert import BertConfig

LossOutput = tuple[jax.Array, Mapping[str, tuple]]


class Task(Protocol):
  """A task owns its data, model head, loss/metrics and outputs; the trainer owns everything else."""

  name: str
  head: str  # key of bertjax.models.heads.HEADS, recorded in checkpoints
  model_config: BertConfig  # available after prepare()
  main_metric: str  # eval metric used for early stopping / best checkpoint ("" for none)

  def prepare(self) -> None:
    """Load and validate data; raise UserError on bad input. Must not write into the workdir."""

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

  def train_source(self) -> BatchSource:
    """A BatchSource over ALL training rows, given jax.process_index()/process_count(): it picks this process's
    slice of each global batch, so the data order does not depend on the process count."""

  def eval_batches(self) -> list[Batch]:
    """This process's slices of the global eval batches (loader.eval_batches)."""

  def loss_fn(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None, deterministic: bool) -> LossOutput:
    """Scalar loss and metrics as {name: (total, count)}."""

  def save_assets(self, workdir: str) -> None:
    """Write what a checkpoint needs beside it (tokenizer files) into the workdir."""

  def checkpoint_meta(self) -> dict[str, Any]:
    """Extra JSON for the checkpoint `meta` (label names, ...)."""

  def eval_summary(self, metrics: Mapping[str, float]) -> Mapping[str, float]:
    """Extra eval numbers (e.g. baselines) to log next to the metrics."""

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, float]:
    """After training, with the best params: prediction files etc. `predict(host_batches)` -> host outputs."""
