"""One generic trainer for every task: sharded state, one jitted train step, eval, checkpoints, metrics.

`train_and_evaluate(config, workdir)` validates everything it can before it writes a byte to the workdir,
then resumes from the latest checkpoint there (or starts fresh / from `init_checkpoint` / `init_from_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from clu import parameter_overview
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from bertjax import paths, tasks
from bertjax.artifacts import checkpoint, factory, place
from bertjax.data.loader import prefetch
from bertjax.errors import UserError
from bertjax.peft import core as peft
from bertjax.tasks import common
from bertjax.tasks.base import Task
from bertjax.train import metrics as mlib, optim, progress, resilience, sharding, step as step_lib, writers


@dataclasses.dataclass
class TrainState:
  """Everything a resumed run needs; `params`/`opt_state` are sharded pytrees."""
  step: int
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; dropout uses fold_in(rng, step)


class Trainer:
  """Builds the mesh, model, optimizer and jitted steps for a task."""

  def __init__(self, config: ConfigDict, workdir: str, task: Task | None = None, devices: list | None = None):
    self.config, self.workdir = config, workdir
    t = config.training
    common.check_config(config)
    self.task = task if task is not None else tasks.get(config.task)(config, workdir)
    self.mesh = sharding.make_mesh(dict(config.mesh.shape), devices, dict(config.mesh.get("dcn_shape", {})))
    self.rules = [tuple(r) for r in config.mesh.logical_axis_rules]
    dp = sharding.data_parallel_size(self.mesh)
    accum = int(t.get("grad_accum_steps", 1))
    if accum < 1 or t.global_batch_size % accum:
      raise UserError(f"training.global_batch_size={t.global_batch_size} is not divisible by "
                      f"training.grad_accum_steps={accum}")
    self.accum = accum
    self.best: dict = {}  # main-metric tracking for the best checkpoint / early stopping (saved in meta)
    self.best_mngr: Any = None
    self.frozen: Any = {}  # PEFT: the frozen base params (sharded), passed to every step but never saved
    self.base_ref: dict = {}
    micro = t.global_batch_size // accum
    if micro % dp:
      raise UserError(f"training.global_batch_size={t.global_batch_size} (micro-batch {micro}) is not divisible "
                      f"by the data-parallel device count {dp} (mesh data x fsdp); use a multiple of {dp}")
    if t.eval_batch_size % dp:
      raise UserError(f"training.eval_batch_size={t.eval_batch_size} is not divisible by the data-parallel "
                      f"device count {dp}; use a multiple of {dp}")
    if int(t.num_train_steps) <= 0 and not t.get("num_epochs"):
      raise UserError(f"training.num_train_steps={t.num_train_steps}: give a positive step count "
                      "or training.num_epochs")

  # -- setup ----------------------------------------------------------------------------------------------
  def setup(self) -> None:
    """Load data and build abstract model + shardings. Raises UserError before anything is written."""
    self.task.prepare()
    cfg, t = self.config, self.config.training
    self.source = self.task.train_source()
    if int(t.num_train_steps) > 0:
      self.num_train_steps = int(t.num_train_steps)
    else:  # fine-tuning recipes count epochs
      self.num_train_steps = max(1, int(np.ceil(t.num_epochs * self.source.steps_per_epoch)))
    self.eval_every = int(t.eval_every_steps) if t.eval_every_steps > 0 else self.source.steps_per_epoch
    self.setup_steps()

  def setup_steps(self) -> None:
    """Abstract model and optimizer state, their shardings and the jitted steps: from `task.model_config` and
    `num_train_steps` alone, no data (`bertjax.compile` calls it to compile this step for a target)."""
    cfg, t = self.config, self.config.training
    abstract = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(cfg.seed)))
    self.graphdef = nnx.graphdef(abstract)
    self.full_sh = sharding.param_shardings(abstract, self.mesh, self.rules)
    full = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    self.peft = peft.Split(cfg.get("peft"), full, self.task.head)
    self.param_sh, self.frozen_sh = self.peft.shardings(self.full_sh, self.mesh)
    shaped = lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)
    trainable, frozen = jax.eval_shape(self.peft.split, full)
    self.abstract_params = jax.tree_util.tree_map(shaped, trainable, self.param_sh)
    self.abstract_frozen = jax.tree_util.tree_map(shaped, frozen, self.frozen_sh)
    if self.peft.active:
      (n_t, _), (n_f, _) = peft.count(trainable), peft.count(frozen)
      logging.info("peft.method=%s: trainable parameters %d of %d in all (%.2f%%; as peft counts: LoRA pairs and "
                   "adapters included); the frozen base (%d) is not checkpointed", self.peft.method, n_t, n_t + n_f,
                   100.0 * n_t / (n_t + n_f), n_f)
    self.schedule_spec = resilience.schedule_spec(cfg.optimizer, self.num_train_steps)
    self.tx, self.schedule = optim.make(cfg.optimizer, self.abstract_params, self.num_train_steps,
                                        freeze_patterns(cfg.training))
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    self.opt_sh = sharding.opt_state_shardings(self.tx, abstract_opt, self.param_sh, self.mesh)
    self.abstract_opt = jax.tree_util.tree_map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract_opt, self.opt_sh)
    self.repl = sharding.replicated(self.mesh)
    self.batch_sh = sharding.batch_sharding(self.mesh, leading_dims=1 if self.accum > 1 else 0)
    self.eval_batch_sh = sharding.batch_sharding(self.mesh)
    self.one_in_flight = serial_collectives(self.mesh)
    self._compile_steps()

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The task's model, with bottleneck adapters attached when peft.method=adapter."""
    return factory.attach_adapters(self.task.build_model(rngs), self.task.model_config, self.config.get("peft"), rngs)

  def init_state(self) -> TrainState:
    """Fresh parameters (or those of init_checkpoint / init_from_hf) and optimizer state, sharded at creation."""
    cfg = self.config
    params = self.init_params()
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)
    rng = jax.random.key_data(jax.random.key(cfg.seed + 1))
    return TrainState(0, params, opt_state, rng)

  def init_params(self):
    """The trainable parameters (all of them without PEFT), sharded at creation; PEFT also sets the frozen base."""
    cfg = self.config
    params = self._base_params()
    if self.peft.active:  # the fresh LoRA pairs use their own key
      lora_key = jax.random.key(cfg.seed + 2)
      params, self.frozen = jax.jit(self.peft.split, out_shardings=(self.param_sh, self.frozen_sh))(params, lora_key)
      self.base_ref = self._base_ref()
    leaves = jax.tree_util.tree_leaves(params)  # where the parameters live (multi-host: each process its part)
    held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.replica_id == 0)
    logging.info("parameters: %d bytes; process %d holds %d of them on its %d devices (each copy counted once)",
                 sum(x.nbytes for x in leaves), jax.process_index(), held, jax.local_device_count())
    return params

  def _base_params(self):
    """The full model params (base + fresh head / adapters), sharded at creation."""
    def init():
      model = self.build_model(nnx.Rngs(self.config.seed))
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return self._load_pretrained(jax.jit(init, out_shardings=self.full_sh)())

  def _base_ref(self) -> dict:
    """Where the frozen base comes from and its fingerprint (stored in PEFT checkpoints)."""
    cfg = self.config
    src = {k: paths.resolve(cfg[k]) if paths.exists(cfg[k]) else cfg[k]
           for k in ("init_from_hf", "init_checkpoint") if cfg.get(k)}
    return {**src, "seed": cfg.seed, "fingerprint": peft.fingerprint(self.frozen)}

  def check_base(self, meta: Mapping[str, Any]) -> None:
    """A PEFT checkpoint resumes only onto the base it was trained on (one line otherwise)."""
    saved = meta.get("peft") or {}
    settings = {k: v for k, v in saved.items() if k != "base"}
    if saved.get("method", "none") != self.peft.method or (self.peft.active and settings != self.peft.meta()):
      raise UserError(f"workdir {self.workdir} holds a checkpoint with peft {settings or 'none'} but the config asks "
                      f"for {self.peft.meta() or 'none'}; use a new --workdir or the same peft settings")
    if not self.peft.active:
      return
    if not self.base_ref:
      _, self.frozen = jax.jit(self.peft.split, out_shardings=(self.param_sh, self.frozen_sh))(
          self._base_params(), jax.random.key(0))
      self.base_ref = self._base_ref()
    old = saved.get("base", {})
    if old.get("fingerprint") != self.base_ref["fingerprint"]:
      where = old.get("init_from_hf") or old.get("init_checkpoint") or "a fresh init"
      raise UserError(f"the base model differs from the one this PEFT checkpoint was trained on ({where}, "
                      f"fingerprint {old.get('fingerprint')} vs {self.base_ref['fingerprint']} now); pass the "
                      "original base with --config.init_from_hf / --config.init_checkpoint")

  def _load_pretrained(self, params):
    """Fill the fresh sharded params from init_checkpoint / init_from_hf, straight onto their shardings (each
    process reads only the slices its devices hold; nothing is gathered to one host)."""
    cfg = self.config
    if not (cfg.get("init_checkpoint") or cfg.get("init_from_hf")):
      return params
    if cfg.get("init_checkpoint"):
      params, report = place.from_checkpoint(params, cfg.init_checkpoint)
      source = cfg.init_checkpoint
    else:
      params, report = place.from_hf(params, cfg.init_from_hf)
      source = cfg.init_from_hf
    logging.info("initialised from %s:\n  %s", source, "\n  ".join(report.lines()))
    return params

  # -- steps ----------------------------------------------------------------------------------------------
  def _compile_steps(self) -> None:
    graphdef, task, tx, accum, split = self.graphdef, self.task, self.tx, self.accum, self.peft

    raw_step = step_lib.make_train_step(graphdef, split.combine, task.loss_fn, task.loss_weights, tx, self.schedule,
                                        accum)

    def train_step(*args):
      params, opt_state, m = raw_step(*args)
      return params, opt_state, mlib.from_outputs(m)

    step_fn = jax.jit(
        sharding.under_rules(train_step, self.mesh, self.rules), donate_argnums=(0, 2),
        in_shardings=(self.param_sh, self.frozen_sh, self.opt_sh, self.batch_sh, self.repl, self.repl),
        out_shardings=(self.param_sh, self.opt_sh, self.repl))
    # The frozen base rides along as a non-donated argument; callers keep the (params, opt_state, ...) signature.
    self.train_step = self._with_frozen(step_fn, 1)

    def eval_step(params, frozen, batch):
      model = nnx.merge(graphdef, split.combine(params, frozen))
      _, m = task.loss_fn(model, batch, None, True)
      return mlib.from_outputs(m)

    eval_fn = jax.jit(sharding.under_rules(eval_step, self.mesh, self.rules),
                      in_shardings=(self.param_sh, self.frozen_sh, self.eval_batch_sh), out_shardings=self.repl)
    self.eval_step = self._with_frozen(eval_fn, 1)
    if task.predicts:
      predict_fn = jax.jit(sharding.under_rules(lambda params, frozen, batch: task.predict_step(
          nnx.merge(graphdef, split.combine(params, frozen)), batch), self.mesh, self.rules),
                           in_shardings=(self.param_sh, self.frozen_sh, self.eval_batch_sh))
      self.predict_step = self._with_frozen(predict_fn, 1)

  def _with_frozen(self, jitted, at: int):
    """`jitted` with the frozen base inserted as argument `at`; `.lower(...)` too (the warm-up compiles with it).
    On a CPU mesh of several devices each call waits for its result (`serial_collectives`)."""
    def insert(args):
      return (*args[:at], self.frozen, *args[at:])

    def call(*args):
      out = jitted(*insert(args))
      return jax.block_until_ready(out) if self.one_in_flight else out
    call.lower = lambda *args: jitted.lower(*insert(args))
    return call

  def put_batch(self, batch: Mapping[str, np.ndarray], train: bool = True) -> dict:
    """Host-local numpy batch -> global device arrays sharded over data x fsdp."""
    if train and self.accum > 1:
      batch = {k: v.reshape(self.accum, v.shape[0] // self.accum, *v.shape[1:]) for k, v in batch.items()}
      sh = self.batch_sh
    else:
      sh = self.batch_sh if train else self.eval_batch_sh
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}

  def predict(self, params, batches) -> list[dict[str, np.ndarray]]:
    """Run the task's predict_step over host batches; outputs come back as host numpy (all processes)."""
    out = []
    for b in batches:
      o = self.predict_step(params, self.put_batch(b, train=False))
      o = multihost_utils.process_allgather(o, tiled=True) if jax.process_count() > 1 else jax.device_get(o)
      out.append(o)
    return out

  def evaluate(self, params) -> dict[str, float]:
    """Task metrics from predictions when the task predicts (GLUE, NER, SQuAD), else averaged eval losses."""
    if self.task.predicts:
      batches = self.task.eval_batches()
      return {k: float(v) for k, v in self.task.compute_metrics(self.predict(params, batches)).items()}
    acc = None
    for b in self.task.eval_batches():
      m = self.eval_step(params, self.put_batch(b, train=False))
      acc = m if acc is None else acc.merge(m)
    if acc is None:
      return {}
    return {k: float(v) for k, v in acc.compute().items()}

  def run_eval(self, params, step: int, writer) -> dict[str, float]:
    m = self.evaluate(params)
    m.update(self.task.eval_summary(m))
    writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
    logging.info(mlib.progress_line(step, self.num_train_steps, m, None, prefix="eval"))
    return m

  # -- best checkpoint and early stopping -----------------------------------------------------------------
  def _best_manager(self):
    if self.best_mngr is None:
      self.best_mngr = checkpoint.manager(paths.join(self.workdir, "best"), max_to_keep=1, async_save=False)
    return self.best_mngr

  def track_best(self, params, step: int, metrics: Mapping[str, float]) -> bool:
    """Keep the best params by the task's main metric in `<workdir>/best`; True when training should stop."""
    name, t = self.task.main_metric, self.config.training
    if not name or name not in metrics or not t.get("keep_best", True):
      return False
    value, best = float(metrics[name]), dict(self.best)
    improved = best.get("value") is None or value > best["value"]
    if improved:
      best.update(value=value, step=step, bad_evals=0)
      mngr = self._best_manager()
      for s in mngr.all_steps():  # replay after a preemption: later best steps are recomputed, this one is equal
        if s > step:
          mngr.delete(s)
      if step not in mngr.all_steps():
        checkpoint.save(mngr, step, params, {}, {**self.meta(TrainState(step, None, None, jnp.zeros(2))),
                                                 "best": best}, force=True)
        mngr.wait_until_finished()
    else:
      best["bad_evals"] = best.get("bad_evals", 0) + 1
    patience = int(t.get("early_stopping_patience", 0) or 0)
    best["stopped"] = bool(patience and best["bad_evals"] >= patience)
    self.best = best
    return best["stopped"]

  def restore_best(self):
    """The best params (sharded like the live ones) for predictions after training."""
    mngr = self._best_manager()
    step = mngr.latest_step()
    r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(self.abstract_params)))
    logging.info("using the best checkpoint (step %d, %s %.4f) for predictions", step, self.task.main_metric,
                 self.best["value"])
    return r["params"]

  # -- checkpoints and resuming ---------------------------------------------------------------------------
  def meta(self, state: TrainState, **extra: Any) -> dict:
    return checkpoint.model_meta(self.task.model_config, self.task.head, step=state.step, task=self.task.name,
                                 rng=[int(x) for x in np.asarray(state.rng).ravel()],
                                 data={"next_step": state.step, "seed": self.config.seed,
                                       "global_batch_size": self.config.training.global_batch_size},
                                 schedule=self.schedule_spec, mesh=dict(self.mesh.shape),
                                 best=self.best, **extra,
                                 **({"peft": {**self.peft.meta(), "base": self.base_ref}} if self.peft.active else {}),
                                 **self.task.checkpoint_meta())

  def check_resume(self, meta: Mapping[str, Any]) -> None:
    """Refuse (one line, before writing anything) a checkpoint of another model or batch size, or a silent LR
    jump; adopt the checkpoint's schedule (or the chosen continuation) for the rest of the run."""
    old, new = meta.get("model_config", {}), dataclasses.asdict(self.task.model_config)
    diff = {k: (old.get(k), new[k]) for k in new if k not in common.RUNTIME_FIELDS and old.get(k) != new[k]}
    if diff:
      raise UserError(f"workdir {self.workdir} holds a checkpoint of a different model ({diff}, "
                      "checkpoint vs config); use a new --workdir or the same model settings")
    self.check_base(meta)
    t = self.config.training
    resilience.check_batch_size(meta, t.global_batch_size, bool(t.get("allow_batch_size_change", False)))
    step = int(meta.get("step", 0))
    spec = resilience.resume_schedule(meta.get("schedule"), self.schedule_spec, step,
                                      str(t.get("continue_schedule", "") or ""))
    if spec != self.schedule_spec:
      self.schedule_spec = spec
      self.tx, self.schedule = optim.make(self.config.optimizer, self.abstract_params, self.num_train_steps,
                                          freeze_patterns(t), sched=resilience.build_schedule(spec))
      self._compile_steps()
    old_mesh = meta.get("mesh")
    if old_mesh and old_mesh != dict(self.mesh.shape):
      logging.info("resuming a checkpoint written on mesh %s on mesh %s (parameters are resharded)", old_mesh,
                   dict(self.mesh.shape))

def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, float]:
  """Train `config.task` in `workdir`, resuming from its latest checkpoint. Returns the final eval metrics.

  Raises `resilience.Preempted` after saving on SIGTERM / SIGINT and `resilience.Diverged` after too many
  non-finite steps (bertjax.main turns both into documented exit codes)."""
  workdir = paths.resolve(workdir)
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file; pass a folder")
  writers.check(config)
  progress.check(config)
  trainer = Trainer(config, workdir)
  trainer.setup()  # all validation and data loading; nothing written to workdir yet
  if config.training.get("eval_only"):
    return evaluate_only(trainer, config, workdir)
  paths.makedirs(workdir)
  with resilience.WorkdirLock(workdir), resilience.PreemptionWatcher() as watcher:
    return _train(trainer, config, workdir, watcher)


def _restore(trainer: Trainer, mngr) -> tuple[TrainState | None, dict]:
  """The newest readable checkpoint (unreadable ones are set aside, never deleted), checked against the config."""
  def check(step_dir: str) -> None:
    trainer.check_resume(checkpoint.read_meta(step_dir))
  found = checkpoint.restore_latest(mngr, trainer.abstract_params, trainer.abstract_opt, check)
  if found is None:
    return None, {}
  params, opt_state, meta = found
  trainer.best = meta.get("best", trainer.best)
  return TrainState(int(meta["step"]), params, opt_state, jnp.asarray(meta["rng"], jnp.uint32)), meta


def _train(trainer: Trainer, config: ConfigDict, workdir: str, watcher: resilience.PreemptionWatcher) -> dict:
  t, task, run_start = config.training, trainer.task, time.time()
  ckpt_dir = paths.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
  mngr = checkpoint.manager(workdir, t.keep_checkpoints, async_save=t.async_checkpointing)
  state, meta = _restore(trainer, mngr)
  if state is not None:
    logging.info("Resuming from checkpoint at step %d (%s)", state.step, paths.join(ckpt_dir, str(state.step)))
  else:
    state = trainer.init_state()
    logging.info("Starting fresh at step 0 (no checkpoint in %s)", ckpt_dir)
  if jax.process_index() == 0:  # only after a successful restore
    task.save_assets(workdir)
    resilience.write_config(workdir, config.to_json_best_effort(indent=2, sort_keys=True))

  writer = writers.create(workdir, config, just_logging=jax.process_index() > 0)
  if state.step == 0 and jax.process_index() == 0 and logging.getLogger().isEnabledFor(logging.DEBUG):  # --v=1
    # shapes, sizes and shardings from array metadata: nothing leaves the devices
    logging.debug("model parameters:\n%s", parameter_overview.get_parameter_overview(state.params,
                                                                                     include_stats="sharding"))
  if state.step == 0 and jax.process_index() == 0:
    writer.write_hparams(_flat(config.to_dict()))
  n_steps = trainer.num_train_steps
  with_bar = progress.want_bar(t.get("progress_bar", "auto"))
  # with a bar, the periodic train numbers go to TensorBoard / W&B only (the bar shows them), not to the log
  interval_writer = writers.MultiWriter([w for w in writer.writers if not isinstance(w, writers.LoggingWriter)]
                                        ) if with_bar else writer
  report = progress.ReportProgress(n_steps, interval_writer, every_steps=t.log_every_steps, log=not with_bar)
  batches = prefetch((trainer.source.batch(s) for s in range(state.step, n_steps)),
                     lambda b: (trainer.put_batch(b), real_tokens(b)), size=int(config.data.get("prefetch", 2)))
  logging.info("training steps %d -> %d (%d steps per epoch, global batch %d, mesh %s)", state.step, n_steps,
               trainer.source.steps_per_epoch, t.global_batch_size, dict(trainer.mesh.shape))
  eval_metrics: dict[str, float] = {}
  acc, t0, tokens = None, time.time(), 0
  params, opt_state = state.params, state.opt_state
  stop = trainer.best.get("stopped", False)
  if meta.get("eval_pending") and not stop:  # preempted at an evaluation step before evaluating
    eval_metrics = trainer.run_eval(params, state.step, writer)
    stop = trainer.track_best(params, state.step, eval_metrics)
  skips = resilience.SkipMonitor(int(t.get("max_consecutive_skips", 10)))
  if not stop:
    warm_up(trainer, params, opt_state, state.rng, state.step, n_steps)
  first_step, loop_start, train_loss = state.step, time.time(), None
  bar = progress.ProgressBar(n_steps, state.step) if with_bar else None
  try:
    for step in range(state.step, n_steps if not stop else state.step):
      batch, n_tokens = next(batches)
      tokens += n_tokens
      params, opt_state, m = trainer.train_step(params, opt_state, batch, np.int32(step), state.rng)
      skips.push(step + 1, m.skipped.total)  # reads the previous step's flag: no wait on this one
      acc = m if acc is None else acc.merge(m)
      done = step + 1
      report(done)
      if bar:
        bar.update(done)
      if done % t.log_every_steps == 0 or done == n_steps:
        skips.flush()
        scalars = mlib.scalars(acc)  # host sync only at logging intervals
        scalars.pop("skipped", None)
        scalars["skipped_steps"] = skips.take_interval()
        tps = tokens / max(time.time() - t0, 1e-9)
        interval_writer.write_scalars(done, {**{f"train/{k}": v for k, v in scalars.items()},
                                             "train/tokens_per_s": tps})
        train_loss = scalars.get("loss", train_loss)
        if bar:
          bar.show(scalars, tps)
        else:
          logging.info(mlib.progress_line(done, n_steps, scalars, tps))
        acc, t0, tokens = None, time.time(), 0
      is_eval = done % trainer.eval_every == 0 or done == n_steps
      state = TrainState(done, params, opt_state, state.rng)
      if watcher.should_stop(done):
        skips.flush()
        checkpoint.save(mngr, done, params, opt_state, trainer.meta(state, eval_pending=is_eval), force=True)
        mngr.wait_until_finished()
        code = watcher.exit_code()
        logging.warning("preempted (signal %d): saved a checkpoint at step %d in %s; exiting with code %d",
                        code - 128, done, ckpt_dir, code)
        raise resilience.Preempted(f"preempted at step {done}; the same command resumes it", code)
      if is_eval:
        skips.flush()
        eval_metrics = trainer.run_eval(params, done, writer)
        stop = trainer.track_best(params, done, eval_metrics)
      if done % t.checkpoint_every_steps == 0 or done == n_steps or stop:
        skips.flush()
        checkpoint.save(mngr, done, params, opt_state, trainer.meta(state), force=True)
      if stop:
        logging.info("early stopping at step %d: no %s improvement in %d evaluations (best %.4f at step %d)",
                     done, task.main_metric, t.early_stopping_patience, trainer.best["value"], trainer.best["step"])
        break
    skips.flush()
  finally:
    loop_secs = time.time() - loop_start
    if bar:
      bar.close()
    batches.close()
    writer.flush()
    mngr.wait_until_finished()  # never leave an async save behind, whatever stopped the loop
  if not eval_metrics:
    logging.info("checkpoint step %d already reaches the end of training (%d steps); evaluating only",
                 state.step, n_steps)
    eval_metrics = trainer.run_eval(params, state.step, writer)
  kept = sorted(mngr.all_steps())
  mngr.close()
  final = dict(eval_metrics)
  if trainer.best.get("step") is not None and task.main_metric:
    final.update({f"best_{task.main_metric}": trainer.best["value"], "best_step": trainer.best["step"]})
    if trainer.best["step"] != state.step:
      params = trainer.restore_best()
  final.update(task.finalize(lambda batches: trainer.predict(params, batches), workdir))
  writer.flush()
  writer.close()
  metrics_file = paths.join(workdir, "eval_metrics.json")
  if jax.process_index() == 0:
    paths.write_text(metrics_file, json.dumps({"step": state.step, **final}, indent=2))
  has_best = bool(task.main_metric) and trainer.best.get("step") is not None
  logging.info("%s", progress.summary(
      step=state.step, total=n_steps, first_step=first_step, wall_secs=time.time() - run_start, loop_secs=loop_secs,
      train_loss=train_loss, eval_metrics=eval_metrics, main_metric=task.main_metric, best=trainer.best,
      checkpoint_dir=ckpt_dir, checkpoint_steps=kept, best_dir=paths.join(workdir, "best") if has_best else None,
      metrics_file=metrics_file))
  return final


def serial_collectives(mesh) -> bool:
  """True where a program with collectives must finish before the next is dispatched: XLA:CPU with several
  (simulated) devices. XLA:CPU runs every device of the mesh on one shared thread pool and a collective holds a
  pool thread until all participants arrive; with several such programs in flight (async dispatch), threads
  taken by a later program's participants starve an earlier one, and after 40 s XLA aborts the process
  (`Termination timeout for all reduce ...`, SIGABRT). It happened under load on 2 cores with 8 simulated
  devices (benchmarks/cpu_collectives_abort.py reproduces it); accelerators and one CPU device are unaffected."""
  devices = mesh.devices.flat
  return mesh.devices.size > 1 and all(d.platform == "cpu" for d in devices)


def evaluate_only(trainer: Trainer, config: ConfigDict, workdir: str) -> dict[str, float]:
  """`training.eval_only`: metrics and predictions of the workdir's latest checkpoint (else of init_checkpoint /
  init_from_hf) in `<workdir>/eval_only_<step>/`. Nothing is trained; no checkpoint is written, moved or cleaned
  (the checkpoint is read like an init_checkpoint, without an orbax manager)."""
  ckpts = paths.join(workdir, checkpoint.CHECKPOINT_SUBDIR)
  step = 0
  if paths.isdir(ckpts) and any(d.isdigit() for d in paths.listdir(ckpts)):
    step_dir = checkpoint.resolve_step_dir(workdir)
    step = int(checkpoint.read_meta(step_dir).get("step", 0))
    trainer.config = config = config.copy_and_resolve_references()
    config.init_checkpoint, config.init_from_hf = step_dir, ""
  elif not (config.get("init_checkpoint") or config.get("init_from_hf")):
    raise UserError(f"training.eval_only=True needs a checkpoint: {ckpts} has none; pass the trained workdir as "
                    "--workdir, or --config.init_checkpoint / --config.init_from_hf")
  params = trainer.init_params()  # no optimizer state: nothing is trained
  out = paths.join(workdir, f"eval_only_{step}")
  paths.makedirs(out)
  writer = writers.create(out, config, just_logging=jax.process_index() > 0)
  try:
    final = trainer.run_eval(params, step, writer)
    final.update(trainer.task.finalize(lambda batches: trainer.predict(params, batches), out))
  finally:
    writer.close()
  if jax.process_index() == 0:
    paths.write_text(paths.join(out, "eval_metrics.json"), json.dumps({"step": step, **final}, indent=2))
  logging.info("eval only: metrics and predictions of step %d in %s", step, out)
  return final


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Non-pad tokens of a host batch (this process's rows) times the process count: what `train/tokens_per_s`
  and the log line's tokens/s count, so padding, bucketing and packing do not inflate it."""
  mask = batch.get("attention_mask")
  n = int(np.count_nonzero(mask)) if mask is not None else int(np.prod(np.shape(batch["input_ids"])))
  return n * jax.process_count()


def warm_up(trainer: Trainer, params, opt_state, rng, start: int, stop: int) -> None:
  """Length-bucketed runs: compile the train step for every bucket width steps [start, stop) will use, and the
  eval (predict) step for every eval batch shape, before the loop rather than when a width first shows up
  mid-run. Compiling ahead of time fills the same cache the jitted calls use; nothing runs."""
  plan = getattr(trainer.source, "bucket_plan", None)
  widths = plan(start, stop) if plan is not None else []
  if not widths:
    return
  t0 = time.time()
  for w in widths:
    batch = trainer.put_batch(trainer.source.warmup_batch(w))
    trainer.train_step.lower(params, opt_state, batch, np.int32(start), rng).compile()
  shapes = {}
  for b in trainer.task.eval_batches():
    shapes.setdefault(tuple(sorted((k, v.shape) for k, v in b.items())), b)
  step = trainer.predict_step if trainer.task.predicts else trainer.eval_step
  for b in shapes.values():
    step.lower(params, trainer.put_batch(b, train=False)).compile()
  logging.info("compiled the train step for %s %s and the eval step for %d batch shapes in %.1f s",
               "packed row counts" if getattr(trainer.source, "packer", None) else "bucket widths", widths,
               len(shapes), time.time() - t0)


def freeze_patterns(t: ConfigDict) -> list[str]:
  """Regexes over '/'-joined parameter paths that receive no updates."""
  patterns = list(t.get("freeze", []) or [])
  if t.get("freeze_embeddings"):
    patterns.append(r"^bert/embeddings/")
  k = int(t.get("freeze_layers", 0) or 0)
  if k > 0:
    patterns.append(r"^bert/encoder/layer/(%s)/" % "|".join(str(i) for i in range(k)))
  return patterns


def _flat(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float, str, bool)):
      out[f"{prefix}{k}"] = v
  return out
