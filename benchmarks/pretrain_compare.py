"""Same pretraining recipe, same batches: bertjax vs transformers' PyTorch `BertForPreTraining`.

  python benchmarks/pretrain_compare.py --config=configs/mlm.py --workdir=workdirs/compare [--config.x=...]

bertjax trains `--config` in `--workdir` (or, if that workdir already holds a finished run's
`eval_metrics.json`, e.g. the default run's `workdirs/mlm`, its result and `config.json` are reused). Then
transformers trains a freshly initialised `BertForPreTraining` of the same shape on exactly the batches the
bertjax trainer saw (the task's `train_source().batch(step)`: same pairs, same dynamic masking, same sequence
length phases), with the same optimizer (AdamW, same learning-rate schedule taken from bertjax's optax
schedule, no decay on biases / LayerNorm, global-norm clipping), and is scored on the same masked eval batches.
The two runs do not share their initialisation, so expect differences of a point or so: the question is
whether both learn to use context ([MASK] accuracy well above the most-frequent-token baseline) or neither does.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bertjax.convert.commands import hf_config  # noqa: E402
from bertjax.data import pretraining as pt  # noqa: E402
from bertjax.train import optim  # noqa: E402
from bertjax.train.trainer import Trainer, train_and_evaluate  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/mlm.py", "Pretraining config (configs/mlm.py).")
flags.DEFINE_string("workdir", "workdirs/compare", "bertjax run folder (reused if it holds eval_metrics.json).")
flags.DEFINE_integer("threads", 0, "torch CPU threads (0 = all cores).")


def kind_metrics(logits: np.ndarray, batches: list[dict]) -> dict[str, float]:
  """MLM accuracy at all chosen positions and per kind, NSP accuracy; logits are per batch [B, P, V] + NSP."""
  correct, weights, kinds, nsp_ok, nsp_w = [], [], [], [], []
  for (mlm, nsp), b in zip(logits, batches):
    correct.append((mlm.argmax(-1) == b["masked_labels"]).ravel())
    weights.append(b["masked_weights"].ravel())
    kinds.append(b["masked_kinds"].ravel())
    nsp_ok.append(nsp.argmax(-1) == b["nsp_labels"])
    nsp_w.append(b["nsp_weights"])
  c, w, k = np.concatenate(correct), np.concatenate(weights), np.concatenate(kinds)
  out = {"mlm_accuracy": float((c * w).sum() / w.sum())}
  for name, kind in pt.KINDS.items():
    wk = w * (k == kind)
    out[f"mlm_accuracy_{name}"] = float((c * wk).sum() / max(wk.sum(), 1))
  nw = np.concatenate(nsp_w)
  out["nsp_accuracy"] = float((np.concatenate(nsp_ok) * nw).sum() / nw.sum())
  return out


def torch_run(trainer: Trainer, threads: int, log_every: int = 100) -> tuple[dict[str, float], float]:
  """Train transformers' BertForPreTraining on the trainer's batches; -> (eval metrics, seconds)."""
  import torch
  import transformers
  torch.manual_seed(trainer.config.seed)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  task, cfg = trainer.task, trainer.config
  model = transformers.BertForPreTraining(transformers.BertConfig(**hf_config(task.model_config, "pretraining",
                                                                              None, None)))
  model.train()
  o = cfg.optimizer
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay,
                                                                                "weight_decay": 0.0}],
                          lr=1.0, betas=(o.b1, o.b2), eps=o.eps)
  n = trainer.num_train_steps
  sched = optim.schedule(o, n)
  lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(sched(s)))

  def inputs(b):
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    return dict(input_ids=ids, token_type_ids=torch.tensor(b["token_type_ids"], dtype=torch.long),
                attention_mask=torch.tensor(b["attention_mask"], dtype=torch.long))

  t0 = time.time()
  for step in range(n):
    b = trainer.source.batch(step)
    x = inputs(b)
    labels = torch.full_like(x["input_ids"], -100)
    w = b["masked_weights"] > 0
    rows = np.arange(len(w))[:, None].repeat(w.shape[1], 1)
    labels[rows[w], b["masked_positions"][w]] = torch.tensor(b["masked_labels"][w], dtype=torch.long)
    out = model(**x, labels=labels, next_sentence_label=torch.tensor(b["nsp_labels"], dtype=torch.long))
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if o.max_grad_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
    opt.step()
    lr_at.step()
    if (step + 1) % log_every == 0 or step + 1 == n:
      print(f"transformers step {step + 1}/{n} | loss {out.loss.item():.4f} | "
            f"{(step + 1) / (time.time() - t0):.2f} steps/s", flush=True)
  seconds = time.time() - t0
  model.eval()
  logits = []
  with torch.no_grad():
    for b in task.eval_batches():
      o_ = model(**inputs(b))
      pos = torch.tensor(b["masked_positions"], dtype=torch.long)
      mlm = torch.gather(o_.prediction_logits, 1, pos[..., None].expand(-1, -1, o_.prediction_logits.shape[-1]))
      logits.append((mlm.numpy(), o_.seq_relationship_logits.numpy()))
  return kind_metrics(logits, task.eval_batches()), seconds


def main(argv):
  del argv
  workdir = os.path.abspath(FLAGS.workdir)
  done = os.path.join(workdir, "eval_metrics.json")
  if os.path.exists(done):
    with open(os.path.join(workdir, "config.json")) as f:
      config = ConfigDict(json.load(f))
    print(f"reusing the finished bertjax run in {workdir} (its config.json)")
    jax_seconds = None
  else:
    config = FLAGS.config
    t0 = time.time()
    train_and_evaluate(config, workdir)
    jax_seconds = time.time() - t0
  with open(done) as f:
    ours = json.load(f)
  trainer = Trainer(config, workdir)  # for its data only (same tokenizer, batches, eval pairs); writes nothing
  trainer.setup()
  theirs, torch_seconds = torch_run(trainer, FLAGS.threads)
  base = {k: ours[k] for k in ("mlm_baseline_frequent_mask", "mlm_baseline_frequent", "mlm_baseline_copy_kept",
                               "nsp_majority_baseline") if k in ours}
  print(f"\n{trainer.num_train_steps} steps, batch {config.training.global_batch_size}, same batches and eval "
        f"pairs; baselines {json.dumps({k: round(v, 4) for k, v in base.items()})}")
  print(f"{'held-out metric':24s} {'bertjax':>9s} {'transformers':>13s}")
  for k in ("mlm_accuracy_mask", "mlm_accuracy_random", "mlm_accuracy_kept", "mlm_accuracy", "nsp_accuracy"):
    print(f"{k:24s} {ours[k]:9.4f} {theirs[k]:13.4f}")
  jax_time = f"{jax_seconds:.0f} s" if jax_seconds else "reused"
  print(f"{'seconds':24s} {jax_time:>9s} {torch_seconds:11.0f} s  (bertjax: the whole run; transformers: its loop)")
  with open(os.path.join(workdir, "compare_transformers.json"), "w") as f:
    json.dump({"bertjax": ours, "transformers": theirs, "transformers_train_seconds": torch_seconds}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
