"""keras-hub on the JAX backend as a third side of the fine-tuning benchmarks, run in a separate Python env.

keras-hub pulls in TensorFlow (its tokenizers are tensorflow-text), so it lives in an env of its own:

  python -m venv ~/kerasenv && ~/kerasenv/bin/pip install keras-hub      # jax comes with it; add jax[cuda12] for GPUs
  python benchmarks/finetune_glue.py --keras_python=~/kerasenv/bin/python

The benchmark (bertjax env) calls `find_python` and `run`; `run` writes the request to a JSON file and starts
`<keras python> benchmarks/keras_side.py REQUEST.json RESULT_PREFIX` with KERAS_BACKEND=jax. The subprocess
imports only the standard library, numpy, keras and keras_hub (never bertjax), tokenizes up front with keras-hub's
own preprocessing (padded to `sequence_length`), trains on the batches in the given order with `model.fit`
(`jit_compile=True`), predicts the eval rows and writes RESULT_PREFIX.json (numbers, step times) and
RESULT_PREFIX.npz (arrays). Metrics are the caller's job: it gets predictions, so every side is scored by the same
code (`bertjax.tasks.metrics`).

Request (JSON object), shared by every kind:
  kind             "text_classifier" (GLUE: sentence or sentence pair), "token_classifier" (NER: words, each
                   labelled at its first piece), or a kind added to KINDS
  model            local HF BERT folder (config.json, model.safetensors, vocab.txt, tokenizer_config.json)
  num_classes      classes; 1 = regression (mean squared error, prediction = the single output)
  sequence_length  keras-hub preprocessor length (every row is padded to it)
  batch, eval_batch, seed, log_every
  order            [steps][batch] training row indices (into train), step by step: the other sides' batch order
  optimizer        {learning_rate, warmup_steps, total_steps, weight_decay, eps, clipnorm}: AdamW, linear warmup
                   + linear decay to 0, global-norm clipping, no decay on biases / LayerNorm
  train, eval      kind-specific inputs (text_classifier: {"text_a": [...], "text_b": [...] (pairs only),
                   "labels": [...]}; eval without labels)
Result: {"step_end_s": [time after step 1, 2, ...] (seconds, same clock as `time.time()`), "train_s", "compile_s",
"prepare_s", "predict_s", "device", "versions", "notes": [how this side differs], ...} + arrays "predictions" (class
ids; regression: scores) and "train_token_ids" (the training rows as keras-hub tokenized them, file order).

Adding a kind (e.g. a token classifier for NER): write `def my_kind(request, keras, keras_hub) -> Job` (a model
fed token arrays, e.g. BertBackbone's sequence_output -> Dense; the tokenized train / eval inputs of every row in
file order; labels, optional per-token sample weights, the loss and how to turn eval logits into predictions; notes
such as MODEL_NOTE / TOKENIZER_NOTE) and register it in KINDS; training, the optimizer, timing and prediction are
shared (`train_and_predict`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# How keras-hub's BERT differs from the HF / bertjax model on the same folder, whatever the head.
MODEL_NOTE = ("model: keras-hub BertBackbone uses tanh-approximate GELU (the HF config says exact 'gelu'); one dropout "
              "rate 0.1 for embeddings, attention probabilities and residuals")
TOKENIZER_NOTE = ("tokenizer: keras-hub BertTokenizer from vocab.txt (lowercase from tokenizer_config.json, accents "
                  "kept: accented words become [UNK] where the HF tokenizer strips the accents)")

# Variables AdamW does not decay: Dense / EinsumDense biases, LayerNormalization gamma and beta (the HF recipe's
# "bias" and "LayerNorm" parameters). Keras matches these against each variable's name.
NO_DECAY = ("bias", "gamma", "beta")


# ------------------------------------------------------------------------------- parent side (bertjax env)

def find_python(requested: str = "") -> tuple[str | None, str]:
  """The Python to run the keras-hub side with and a reason when there is none: `requested` if given (it must
  import keras_hub), else this interpreter if keras_hub imports here."""
  if not requested:
    if importlib.util.find_spec("keras_hub") is None:
      return None, (f"keras_hub is not importable in {sys.executable}; install keras-hub in a separate env and "
                    "pass --keras_python=<its python> (see benchmarks/keras_side.py)")
    return sys.executable, ""
  python = os.path.expanduser(requested)
  try:
    probe = subprocess.run([python, "-c", "import keras_hub"], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3"))
  except OSError as e:
    return None, f"cannot start {python}: {e}"
  if probe.returncode:
    last = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return None, f"{python} cannot import keras_hub ({last})"
  return python, ""


def run(python: str, request: dict, *, jax_platforms: str = "cpu", verbose: bool = False,
        timeout: float | None = None) -> dict:
  """Runs `request` (see the module docstring) in a `python` subprocess; its result with the arrays added.
  Raises RuntimeError when the subprocess fails (its output has gone to this process's stdout / stderr)."""
  with tempfile.TemporaryDirectory(prefix="keras_side_") as tmp:
    req, out = os.path.join(tmp, "request.json"), os.path.join(tmp, "result")
    with open(req, "w") as f:
      json.dump(request, f, default=_jsonable)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS=jax_platforms)
    if not verbose:
      env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stdout.flush()
    try:
      rc = subprocess.run([python, os.path.abspath(__file__), req, out], env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"the keras-hub subprocess ran past {timeout} s") from e
    if rc:
      raise RuntimeError(f"the keras-hub subprocess exited with status {rc}")
    with open(out + ".json") as f:
      result = json.load(f)
    with np.load(out + ".npz") as z:
      result.update({k: z[k] for k in z.files})
  return result


def _jsonable(x: Any) -> Any:
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


# --------------------------------------------------------------------------- subprocess side (keras-hub env)

@dataclasses.dataclass
class Job:
  """What a kind builds; every array is in file order (row i = example i)."""
  model: Any  # a keras.Model fed token arrays, e.g. a keras_hub Task with preprocessor=None
  train_x: dict[str, np.ndarray]
  train_y: np.ndarray
  eval_x: dict[str, np.ndarray]
  loss: Any
  predict: Callable[[np.ndarray], np.ndarray]  # logits of the eval rows -> predictions
  train_sample_weight: np.ndarray | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # returned as they are


def text_classifier(request: dict, keras, keras_hub) -> Job:
  """GLUE-style sequence (pair) classification / regression: keras_hub.models.BertTextClassifier on the HF folder,
  its own head (pooler -> dropout 0.1 -> Dense, truncated normal 0.02), rows tokenized by
  BertTextClassifierPreprocessor (keras-hub's BertTokenizer from vocab.txt, padded to `sequence_length`)."""
  folder, n_classes = request["model"], request["num_classes"]
  backbone = keras_hub.models.BertBackbone.from_preset(folder)
  preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
      folder, sequence_length=request["sequence_length"])

  def encode(split: dict) -> dict[str, np.ndarray]:
    texts = tuple(np.asarray(split[k], dtype=object).astype(str) for k in ("text_a", "text_b") if k in split)
    rows = []
    for s in range(0, len(texts[0]), 4096):  # the whole split in one call holds every ragged tensor at once
      out = preprocessor(x=tuple(t[s:s + 4096] for t in texts))
      rows.append({k: keras.ops.convert_to_numpy(v) for k, v in out.items()})
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

  train_x, eval_x = encode(request["train"]), encode(request["eval"])
  model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=n_classes, preprocessor=None)
  if n_classes == 1:
    loss, y = keras.losses.MeanSquaredError(), np.asarray(request["train"]["labels"], np.float32)
    predict = lambda logits: logits[:, 0]  # noqa: E731
  else:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    y, predict = np.asarray(request["train"]["labels"], np.int32), lambda logits: logits.argmax(-1)  # noqa: E731
  notes = [
      TOKENIZER_NOTE + "; pairs truncated round-robin (HF: longest first)",
      "head: BertTextClassifier's own, the pretrained pooler -> dropout 0.1 -> a new Dense (truncated normal 0.02, "
      "Keras's seed): the others' structure, a different draw",
      MODEL_NOTE,
  ]
  return Job(model=model, train_x=train_x, train_y=y, eval_x=eval_x, loss=loss, predict=predict, notes=notes,
             arrays={"train_token_ids": train_x["token_ids"]})


KINDS: dict[str, Callable[[dict, Any, Any], Job]] = {"text_classifier": text_classifier}


# ---------------------------------------------------------------------------- token classifier (NER)

IGNORE_INDEX = -100  # bertjax.data.ner.IGNORE_INDEX: pieces that are not scored (bertjax is not importable here)


def word_pieces(tokenizer, sentences: list[list[str]], length: int, tags: list[list[int]] | None = None) -> dict:
  """keras-hub's tokenizer on every word, [CLS] pieces [SEP] cut to `length` and padded to it (keras-hub's
  preprocessors pad every row). `labels` (the word's tag id) and `word_index` (its position in the sentence) sit
  at each word's first piece, -100 / -1 elsewhere; a word with no piece inside `length` gets none."""
  words = [w for s in sentences for w in s]
  pieces = [np.asarray(p).tolist() for p in tokenizer(words)] if words else []
  n = len(sentences)
  out = {"token_ids": np.full((n, length), tokenizer.pad_token_id, np.int32),
         "padding_mask": np.zeros((n, length), np.int32), "segment_ids": np.zeros((n, length), np.int32),
         "labels": np.full((n, length), IGNORE_INDEX, np.int32), "word_index": np.full((n, length), -1, np.int32)}
  at = 0
  for i, s in enumerate(sentences):
    ids = [tokenizer.cls_token_id]
    for w in range(len(s)):
      p = pieces[at + w][:length - 1 - len(ids)]  # room left before [SEP]
      if p:
        out["word_index"][i, len(ids)] = w
        if tags is not None:
          out["labels"][i, len(ids)] = tags[i][w]
      ids += p
    at += len(s)
    ids.append(tokenizer.sep_token_id)
    out["token_ids"][i, :len(ids)] = ids
    out["padding_mask"][i, :len(ids)] = 1
  return out


def token_classifier(request: dict, keras, keras_hub) -> Job:
  """NER-style token classification, each word labelled at its first piece. keras-hub has no BERT token
  classifier, so it is built as a keras-hub user would: BertBackbone.from_preset(<HF folder>) -> dropout ->
  Dense(num_classes) on `sequence_output`, initialised like keras-hub's own BERT heads (truncated normal 0.02).
  Request: train {"words": [[word, ...], ...], "tags": [[tag id, ...], ...]}, eval {"words": [...]}.
  Predictions: [N, sequence_length] class ids; arrays "eval_word_index" / "train_labels" say where each word's
  first piece is, for scoring with the caller's word alignment."""
  folder, length = request["model"], request["sequence_length"]
  backbone = keras_hub.models.BertBackbone.from_preset(folder)
  tokenizer = keras_hub.models.BertTokenizer.from_preset(folder)
  train = word_pieces(tokenizer, request["train"]["words"], length, request["train"]["tags"])
  dev = word_pieces(tokenizer, request["eval"]["words"], length)
  x = keras.layers.Dropout(backbone.dropout)(backbone.output["sequence_output"])
  logits = keras.layers.Dense(request["num_classes"], name="classifier",
                              kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02))(x)
  model = keras.Model(backbone.input, logits)
  inputs = lambda f: {k: f[k] for k in backbone.input}  # noqa: E731
  notes = [
      TOKENIZER_NOTE + "; applied to each word, every row padded to sequence_length",
      "head: keras-hub has no BERT token classifier; BertBackbone sequence_output -> dropout -> a new Dense "
      "(truncated normal 0.02, Keras's seed): the others' structure, a different draw; loss: sparse cross-entropy "
      "with ignore_class=-100 (the mean over each batch's first pieces, as the others)",
      MODEL_NOTE,
  ]
  return Job(model=model, train_x=inputs(train), train_y=train["labels"], eval_x=inputs(dev),
             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE_INDEX),
             predict=lambda logits: logits.argmax(-1).astype(np.int32), notes=notes,
             arrays={"train_token_ids": train["token_ids"], "train_labels": train["labels"],
                     "eval_word_index": dev["word_index"]})


KINDS["token_classifier"] = token_classifier


def optimizer(o: dict, keras):
  """AdamW with linear warmup from 0 then linear decay to 0 at total_steps (the value at optimizer step k is
  transformers' get_linear_schedule_with_warmup at k), global-norm clipping, no decay on NO_DECAY names."""

  class WarmupLinear(keras.optimizers.schedules.LearningRateSchedule):
    def __call__(self, step):
      step = keras.ops.cast(step, "float32")
      warm = step / max(1, o["warmup_steps"])
      decay = (o["total_steps"] - step) / max(1, o["total_steps"] - o["warmup_steps"])
      return o["learning_rate"] * keras.ops.where(step < o["warmup_steps"], warm, keras.ops.maximum(decay, 0.0))

  opt = keras.optimizers.AdamW(learning_rate=WarmupLinear(), weight_decay=o["weight_decay"], beta_1=0.9,
                               beta_2=0.999, epsilon=o["eps"], global_clipnorm=o["clipnorm"])
  opt.exclude_from_weight_decay(var_names=list(NO_DECAY))
  return opt


def train_and_predict(request: dict, job: Job, keras) -> dict:
  """Compiles (jit_compile=True), fits one pass over the rows of `request["order"]` in that order, predicts."""
  order = np.asarray(request["order"], np.int64)
  steps, batch = order.shape
  rows = order.reshape(-1)
  x = {k: v[rows] for k, v in job.train_x.items()}
  sw = None if job.train_sample_weight is None else job.train_sample_weight[rows]
  job.model.compile(optimizer=optimizer(request["optimizer"], keras), loss=job.loss, jit_compile=True)
  log_every = max(1, int(request.get("log_every", 50)))
  ends: list[float] = []

  class StepTimes(keras.callbacks.Callback):
    """Wall time after each step: Keras hands a synchronous callback its logs as Python floats, so the step has
    finished when on_train_batch_end runs."""

    def on_train_batch_end(self, batch, logs=None):
      ends.append(time.time())
      k = len(ends)
      if k % log_every == 0 or k == steps:
        print(f"keras-hub train step {k}/{steps} | mean loss so far {logs.get('loss', float('nan')):.4f}",
              flush=True)

  t0 = time.time()
  job.model.fit(x=x, y=job.train_y[rows], sample_weight=sw, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                callbacks=[StepTimes()])
  train_s = time.time() - t0
  if len(ends) != steps:
    raise RuntimeError(f"keras ran {len(ends)} steps, expected {steps}")
  t1 = time.time()
  logits = job.model.predict(job.eval_x, batch_size=request["eval_batch"], verbose=0)
  predict_s = time.time() - t1
  variables = job.model.trainable_variables
  decayed = sum(re.search("|".join(NO_DECAY), v.name) is None for v in variables)
  note = (f"optimizer: Keras AdamW (eps added to sqrt(v) before bias correction; torch / optax add it after), "
          f"weight decay on {decayed} of {len(variables)} variables (not {' / '.join(NO_DECAY)}), linear warmup + "
          "decay as a LearningRateSchedule, global_clipnorm; batches through keras-hub's fit pipeline")
  return {"step_end_s": ends, "train_s": train_s, "compile_s": ends[0] - t0, "predict_s": predict_s,
          "decayed_variables": int(decayed), "trainable_variables": len(variables), "notes": job.notes + [note],
          "predictions": np.asarray(job.predict(np.asarray(logits)))}


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit("usage: keras_side.py REQUEST.json RESULT_PREFIX (normally started by benchmarks/finetune_*.py)")
  with open(argv[0]) as f:
    request = json.load(f)
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import jax  # why: the keras-hub env's own dependencies, not installed in bertjax's env
  import keras
  import keras_hub

  if keras.backend.backend() != "jax":
    sys.exit(f"keras runs on the {keras.backend.backend()} backend; set KERAS_BACKEND=jax")
  if request["kind"] not in KINDS:
    sys.exit(f"unknown kind {request['kind']!r}; known: {', '.join(KINDS)}")
  keras.utils.set_random_seed(request["seed"])
  t0 = time.time()
  job = KINDS[request["kind"]](request, keras, keras_hub)
  prepare_s = time.time() - t0
  result = train_and_predict(request, job, keras)
  arrays = {"predictions": result.pop("predictions"), **job.arrays}
  tf = sys.modules.get("tensorflow")
  result.update(prepare_s=prepare_s, device=f"{jax.devices()[0].platform} x{jax.device_count()}",
                versions={"keras": keras.__version__, "keras_hub": keras_hub.__version__, "jax": jax.__version__,
                          "tensorflow": getattr(tf, "__version__", None)})
  with open(argv[1] + ".json", "w") as f:
    json.dump(result, f)
  np.savez(argv[1] + ".npz", **arrays)


if __name__ == "__main__":
  main(sys.argv[1:])
