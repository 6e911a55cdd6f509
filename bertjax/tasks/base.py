"""What the trainer needs from a task (pretraining, GLUE, SQuAD, NER, classification): the `Task` base class.

The trainer (bertjax/train/trainer.py) calls exactly the members listed here, directly: a task subclasses `Task`,
implements the five abstract methods and sets `name` / `head`; every other member has a documented default.
A task that evaluates through predictions (GLUE, NER, SQuAD, classification) sets `predicts = True` and
implements `predict_step` and `compute_metrics` (checked when the class is defined). See docs/adding_a_task.md.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from bertjax.data.loader import Batch, BatchSource
from bertjax.models.bert import BertConfig

LossOutput = tuple[jax.Array, Mapping[str, tuple]]
# the two members a task with `predicts = True` must implement
PREDICT_MEMBERS = ("predict_step", "compute_metrics")


class Task(abc.ABC):
  """A task owns its data, model head, loss/metrics and outputs; the trainer owns everything else.

  Constructed as `cls(config, workdir)` by `bertjax.tasks.get(config.task)`; the constructor only reads the
  config (no data loading, nothing written: that is `prepare`'s job).
  """

  name: ClassVar[str]  # the registry key in bertjax.tasks.TASKS (`config.task`), recorded in checkpoints
  head: ClassVar[str]  # key of bertjax.models.heads.HEADS, recorded in checkpoints
  # Eval metric for the best checkpoint / early stopping, higher is better ("" = none: no best checkpoint).
  main_metric: str = ""
  # True: eval metrics come from `compute_metrics` over `predict_step` outputs, and `finalize` may call
  # `predict`. False: the eval metrics are `loss_fn`'s metrics averaged over `eval_batches()`.
  predicts: ClassVar[bool] = False
  model_config: BertConfig  # set by prepare(): the architecture (written to checkpoints)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    missing = [m for m in PREDICT_MEMBERS if cls.predicts and getattr(cls, m) is getattr(Task, m)]
    unused = [m for m in PREDICT_MEMBERS if not cls.predicts and getattr(cls, m) is not getattr(Task, m)]
    if missing or unused:
      raise TypeError(f"task {cls.__name__}: predicts={cls.predicts} but "
                      + (f"{missing} not implemented" if missing else f"{unused} implemented (set predicts = True)"))

  def __init__(self, config: ConfigDict, workdir: str):
    self.config, self.workdir = config, workdir

  # -- required --------------------------------------------------------------------------------------------
  @abc.abstractmethod
  def prepare(self) -> None:
    """Load and validate data, set `model_config`; raise UserError on bad input. Must not write into the workdir."""

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """A fresh model with this task's head (`bertjax.models.heads.HEADS[self.head]`)."""

  @abc.abstractmethod
  def train_source(self) -> BatchSource:
    """A BatchSource over ALL training rows, given jax.process_index()/process_count(): it picks this process's
    slice of each global batch, so the data order does not depend on the process count."""

  @abc.abstractmethod
  def eval_batches(self) -> list[Batch]:
    """This process's slices of the global eval batches (loader.eval_batches)."""

  @abc.abstractmethod
  def loss_fn(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None, deterministic: bool) -> LossOutput:
    """Scalar loss and metrics as {name: (total, count)}; traced inside the jitted train and eval steps."""

  # -- optional (defaults) ---------------------------------------------------------------------------------
  def predict_step(self, model: nnx.Module, batch: Batch) -> Mapping[str, jax.Array]:
    """(`predicts` tasks) Per-example outputs of one eval batch; traced inside a jitted step."""
    raise NotImplementedError(f"task {self.name} does not predict (predicts=False)")

  def compute_metrics(self, outputs: list[Mapping[str, np.ndarray]]) -> Mapping[str, float]:
    """(`predicts` tasks) Eval metrics from the host outputs of `predict_step` over all of `eval_batches()`."""
    raise NotImplementedError(f"task {self.name} does not predict (predicts=False)")

  def loss_weights(self, batch: Batch) -> Mapping[str, jax.Array] | None:
    """The weight of each term of `loss_fn`'s loss in `batch`, from the batch alone (traced; no model): for a loss
    `sum over names of metrics[name].total / weight` (e.g. pretraining: masked tokens for "mlm_loss", pairs for
    "nsp_loss"), {name: weight}. Gradient accumulation divides each micro-batch's totals by the weights of the
    whole step, so that accumulating gives the big-batch gradient. Default None: the loss is
    `metrics["loss"].total / metrics["loss"].count` (examples, tokens, ...), and the trainer uses that count."""
    return None

  def eval_summary(self, metrics: Mapping[str, float]) -> Mapping[str, float]:
    """Extra eval numbers (e.g. baselines) to log next to the metrics. Default: none."""
    return {}

  def save_assets(self, workdir: str) -> None:
    """Write what a checkpoint needs beside it (tokenizer files) into the workdir. Default: nothing."""

  def checkpoint_meta(self) -> dict[str, Any]:
    """Extra JSON for the checkpoint `meta` (label names, ...). Default: none."""
    return {}

  def finalize(self, predict: Callable, workdir: str) -> Mapping[str, Any]:
    """After training (or in eval_only), with the best params: prediction files etc. in `workdir`; returns extra
    numbers for eval_metrics.json. `predict(host_batches)` -> host outputs (`predicts` tasks only). Default: none."""
    return {}
