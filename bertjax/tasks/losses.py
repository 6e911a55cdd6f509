"""The pretraining loss (MLM + NSP) as a function of jax / optax and numpy-only bertjax modules.

`tasks.pretraining.PretrainingTask.loss_fn` is this function; `benchmarks/accelerator.py` imports it (with the
Trainer's step, `train/step.py`) on a machine that may have only jax, flax, optax and numpy.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import optax

from bertjax.data.loader import packed_inputs


def pretraining(model, batch, rngs, deterministic: bool, kinds: Mapping[str, int], nsp_weight: float = 1.0):
  """MLM over the chosen positions and NSP per pair: [B] labels, or [B, k] for packed rows (one per slot).
  `kinds`: {name: `masked_kinds` value} for the per-kind MLM metrics ([MASK] / random / kept positions).
  `nsp_weight` scales NSP in the loss (0: MLM only; NSP is still measured)."""
  mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                 batch["masked_positions"], deterministic=deterministic, rngs=rngs,
                                 **packed_inputs(batch))
  w = batch["masked_weights"]
  xent = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, batch["masked_labels"])
  correct = jnp.argmax(mlm_logits, -1) == batch["masked_labels"]
  nw = batch["nsp_weights"]
  nsp_xent = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, batch["nsp_labels"])
  nsp_correct = (jnp.argmax(nsp_logits, -1) == batch["nsp_labels"]) * nw
  n_mlm, n_nsp = jnp.sum(w), jnp.sum(nw)
  mlm_loss = jnp.sum(xent * w) / jnp.maximum(n_mlm, 1.0)
  nsp_loss = jnp.sum(nsp_xent * nw) / jnp.maximum(n_nsp, 1.0)
  loss = mlm_loss + nsp_weight * nsp_loss if nsp_weight else mlm_loss
  out = {"loss": (loss, 1.0), "mlm_loss": (jnp.sum(xent * w), n_mlm),
         "mlm_accuracy": (jnp.sum(correct * w), n_mlm), "nsp_loss": (jnp.sum(nsp_xent * nw), n_nsp),
         "nsp_accuracy": (jnp.sum(nsp_correct), n_nsp)}
  for name, kind in kinds.items():  # only [MASK] positions show that the context is used
    wk = w * (batch["masked_kinds"] == kind)
    out[f"mlm_accuracy_{name}"] = (jnp.sum(correct * wk), jnp.sum(wk))
    out[f"mlm_loss_{name}"] = (jnp.sum(xent * wk), jnp.sum(wk))
  return loss, out


def pretraining_weights(batch) -> dict:
  """`Task.loss_weights` of `pretraining`: masked tokens weigh the MLM loss and pairs the NSP loss."""
  return {"mlm_loss": jnp.sum(batch["masked_weights"]), "nsp_loss": jnp.sum(batch["nsp_weights"])}
