"""Classification end to end: BBC News topics with MiniLM (train, evaluate, predict, export, transformers'
pipeline), the outputs of every problem type, and the CLI's one-line error with the workdir untouched.

The BBC slice is the first 30 articles of each of the 5 topics (24 train, 6 test each, by file order); 12 of the
120 training rows are carved off as dev. 3 epochs of 6 steps (batch 16, 64 tokens, lr 2e-4) from MiniLM on
conftest's 8 simulated devices reach 29 of 30 test articles here (chance: 6).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_classify_data import ROWS, config, minilm_dir, prepared, write
from test_cli_errors import snapshot

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.mark.slow
def test_bbc_news_end_to_end(tmp_path, cache_dir):
  from bertjax.convert import commands
  from bertjax.data import classify as data
  from bertjax.train.trainer import train_and_evaluate
  assert data.bbc_news(str(tmp_path / "bbc"), per_topic=30) == {"train": 120, "test": 30}
  test_rows = [json.loads(l) for l in (tmp_path / "bbc" / "test.jsonl").read_text().splitlines()]
  assert [r["label"] for r in test_rows] == [t for t in TOPICS for _ in range(6)]
  c = config(tmp_path, cache_dir, train_file=str(tmp_path / "bbc" / "train.jsonl"),
             test_file=str(tmp_path / "bbc" / "test.jsonl"), max_seq_length=64, tokenizer="")
  c.init_from_hf, c.model.preset = minilm_dir(), ""
  c.training.update(global_batch_size=16, eval_batch_size=16, num_epochs=3.0, log_every_steps=4,
                    async_checkpointing=False)
  c.optimizer.learning_rate = 2e-4
  wd = tmp_path / "wd"
  result = train_and_evaluate(c, str(wd))
  assert result["best_step"] in (6, 12, 18) and result["best_macro_f1"] >= result["macro_f1"]
  saved = json.loads((wd / "eval_metrics.json").read_text())
  assert saved["test_predictions"] == 30 and saved["test_accuracy"] >= 0.8, saved  # 5 balanced topics: 0.2 by chance
  report = saved["test_report"]
  assert report["labels"] == TOPICS and sum(map(sum, report["confusion_matrix"])) == 30
  assert [report["per_class"][t]["support"] for t in TOPICS] == [6] * 5
  assert report["accuracy"] == saved["test_accuracy"] and report["macro_f1"] == saved["test_macro_f1"]
  assert sum(np.diag(report["confusion_matrix"])) == round(30 * saved["test_accuracy"])
  assert saved["dev_report"]["macro_f1"] == pytest.approx(result["best_macro_f1"])  # the best checkpoint's dev
  for split in ("dev", "test"):
    assert (wd / f"confusion_matrix_{split}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  preds = [json.loads(l) for l in (wd / "predictions" / "test.jsonl").read_text().splitlines()]
  assert [p["row"] for p in preds] == list(range(1, 31)) and [p["gold"] for p in preds] == [r["label"] for r in
                                                                                           test_rows]
  assert all(p["label"] == max(p["probabilities"], key=p["probabilities"].get) for p in preds)
  assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
  assert sum(p["label"] == p["gold"] for p in preds) == round(30 * saved["test_accuracy"])
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  tags = {v.tag for f in wd.glob("events.out.tfevents*") for e in EventFileLoader(str(f)).Load()
          for v in e.summary.value}
  assert {"eval/accuracy", "eval/macro_f1", "eval/micro_f1", "eval/macro_precision"} <= tags
  # The export carries the label names; transformers' pipeline predicts the same labels and probabilities.
  out = tmp_path / "hf"
  diffs = commands.to_hf(str(wd / "best"), str(out), verify=True, log=lambda _: None)
  assert diffs["logits"] < 1e-4, diffs
  hf_cfg = json.loads((out / "config.json").read_text())
  assert hf_cfg["id2label"] == {str(i): t for i, t in enumerate(TOPICS)}
  assert hf_cfg["problem_type"] == "single_label_classification"
  from transformers import pipeline
  clf = pipeline("text-classification", model=str(out), device=-1, top_k=None)
  hf = clf([r["text"] for r in test_rows], truncation=True, max_length=64)
  assert [max(h, key=lambda d: d["score"])["label"] for h in hf] == [p["label"] for p in preds]
  assert max(abs(d["score"] - p["probabilities"][d["label"]]) for h, p in zip(hf, preds) for d in h) < 1e-4


def _finalize(task, logits_by_split, workdir):
  """Run the task's finalize on given logits (a stand-in for the trained model's predictions)."""
  def predict(batches):
    logits = logits_by_split["dev" if batches is task.eval_batches() else "test"]
    out, start = [], 0
    for b in batches:
      n = len(b["example_weights"])
      chunk = np.zeros((n, logits.shape[1]), np.float32)
      real = int(b["example_weights"].sum())
      chunk[:real] = logits[start:start + real]
      start += real
      out.append({"logits": chunk, "example_weights": b["example_weights"]})
    return out
  return task.finalize(predict, str(workdir))


def test_outputs_of_each_problem_type(tmp_path, cache_dir):
  """Single-label with an unlabelled test file, multi-label, regression: files, reports and HF problem types."""
  from bertjax.convert.commands import hf_config
  train = write(tmp_path / "t.jsonl", ROWS)
  test = write(tmp_path / "test.csv", [("new film",), ("old film",), ("NA",)], fields=("text",))
  t = prepared(tmp_path, cache_dir, train_file=train, validation_file=train, test_file=test)
  assert "test" not in t.targets and t.checkpoint_meta()["problem_type"] == "single_label_classification"
  dev_logits = np.eye(3, dtype=np.float32)[[2, 0, 1, 2, 0, 0]] * 5  # gold pos neg neu pos neg neu: 5 of 6 right
  out = _finalize(t, {"dev": dev_logits, "test": np.eye(3, dtype=np.float32)[[0, 1, 2]]}, tmp_path / "s")
  assert out["test_predictions"] == 3 and "test_accuracy" not in out and out["dev_report"]["accuracy"] == 5 / 6
  assert out["dev_report"]["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]  # neg, neu, pos
  preds = [json.loads(l) for l in (tmp_path / "s" / "predictions" / "test.jsonl").read_text().splitlines()]
  assert [p["label"] for p in preds] == ["neg", "neu", "pos"] and "gold" not in preds[0]
  assert preds[0]["probabilities"]["neg"] == pytest.approx(np.e / (np.e + 2), abs=1e-6)
  assert (tmp_path / "s" / "confusion_matrix_dev.png").exists()
  assert not (tmp_path / "s" / "confusion_matrix_test.png").exists()

  rows = [("goal", ["sport"]), ("tax", ["politics"]), ("match vote", ["sport", "politics"]), ("rain", [])]
  m = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "m.jsonl", rows), multi_label=True,
               validation_file=str(tmp_path / "m.jsonl"), threshold=0.4)
  logits = np.array([[-1, 2], [1, -1], [2, -0.3], [-2, 0.5]], np.float32)  # politics, sport; p(-0.3) = 0.43
  out = _finalize(m, {"dev": logits}, tmp_path / "m")
  rep = out["dev_report"]
  assert rep["accuracy"] == 0.75 and rep["confusion_matrix"] == [[[2, 0], [0, 2]], [[1, 1], [0, 2]]]
  preds = [json.loads(l) for l in (tmp_path / "m" / "predictions" / "dev.jsonl").read_text().splitlines()]
  assert [p["label"] for p in preds] == [["sport"], ["politics"], ["politics", "sport"], ["sport"]]
  assert hf_config(m.model_config, "sequence_classification", 2, m.label_names,
                   m.checkpoint_meta()["problem_type"])["problem_type"] == "multi_label_classification"
  assert (tmp_path / "m" / "confusion_matrix_dev.png").exists()

  r = prepared(tmp_path, cache_dir, train_file=write(tmp_path / "r.jsonl", [(x, i / 2) for i, (x, _) in
                                                                          enumerate(ROWS)]),
               problem_type="regression", validation_file=str(tmp_path / "r.jsonl"))
  out = _finalize(r, {"dev": np.arange(6, dtype=np.float32)[:, None] ** 2}, tmp_path / "r")
  assert out["dev_report"]["spearman"] == pytest.approx(1.0) and 0.9 < out["dev_report"]["pearson"] < 1.0
  preds = [json.loads(l) for l in (tmp_path / "r" / "predictions" / "dev.jsonl").read_text().splitlines()]
  assert [p["label"] for p in preds] == [0.0, 1.0, 4.0, 9.0, 16.0, 25.0] and "probabilities" not in preds[0]


def test_cli_unseen_label_one_line_and_workdir_untouched(tmp_path):
  """One subprocess (~10 s of imports); the other mistakes raise the same UserError in-process."""
  train = write(tmp_path / "train.jsonl", ROWS)
  dev = write(tmp_path / "dev.csv", [("fine", "pos"), ("odd", "mixed")])
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "3").mkdir(parents=True)
  (wd / "config.json").write_text('{"old": true}')
  before = snapshot(wd)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3",
             BERTJAX_CACHE=str(tmp_path / "cache"))
  cmd = [sys.executable, "-m", "bertjax.main", "--config=configs/classify.py", f"--workdir={wd}",
         "--config.init_from_hf=", "--config.model.preset=tiny", f"--config.data.tokenizer={minilm_dir()}",
         f"--config.data.train_file={train}", f"--config.data.validation_file={dev}"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
  assert f"{dev}: row 2: label 'mixed' does not occur in the training data ({train})" in errors[0]
  assert "Traceback" not in r.stderr and snapshot(wd) == before
