"""docs/adding_a_task.md is checked against the code: every name it mentions exists, every protocol member it
tabulates is one of `Task`'s, and its two code blocks (a task module and its config) register, train and evaluate."""

import importlib
import json
import logging
import re

import pytest

from bertjax import tasks
from bertjax.errors import UserError
from bertjax.tasks.base import Task
from bertjax.train import writers
from conftest import REPO
from test_classify_data import minilm_dir
from test_progress import FakeTty, summary_rows

DOC = (REPO / "docs" / "adding_a_task.md").read_text()
NEW_FILES = {"bertjax/tasks/tsv.py", "configs/tsv.py", "tests/test_tsv.py"}  # the files the page tells you to add


def _resolve(dotted: str):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(dotted)


def test_every_name_and_file_the_page_mentions_exists():
  quoted = set(re.findall(r"`([^`\n]+)`", DOC))
  dotted = {q for q in quoted if re.fullmatch(r"bertjax(\.\w+)+", q)}
  assert len(dotted) >= 10 and "bertjax.tasks.common.cached_arrays" in dotted
  for name in dotted:
    assert _resolve(name) is not None, name
  files = {q for q in quoted if re.fullmatch(r"[\w/]+\.(py|md)", q)}
  assert len(files) >= 8
  assert sorted(f for f in files - NEW_FILES if not (REPO / f).exists()) == []
  members = re.findall(r"^\| `(\w+)", DOC, re.M)  # first column of the member tables
  assert set(members) >= {"name", "head", "prepare", "loss_fn", "predicts", "predict_step", "finalize"}
  assert [m for m in members if not (hasattr(Task, m) or m in Task.__annotations__)] == []
  assert set(Task.__abstractmethods__) <= set(members)  # every abstract method is documented


def _blocks():
  task_code, config_code = re.findall(r"```python\n(.*?)```", DOC, re.S)
  return task_code, config_code


def test_the_page_example_trains(tmp_path, cache_dir, monkeypatch, caplog):
  """The page's task module, registered as it says, trains 4 steps from its config and evaluates on 10 dev rows
  (two eval batches of 8, the last padded: accuracy is a multiple of 1/10 only if the padding is ignored).

  It runs on a fake terminal, so it also exercises the live progress bar (training.progress_bar=auto): a tqdm bar
  with steps, loss and tokens/s instead of the periodic train log lines; eval lines and the summary (with the best
  checkpoint row) are still logged, TensorBoard still gets every scalar, the log handlers are restored."""
  task_code, config_code = _blocks()
  (tmp_path / "tsv_example.py").write_text(task_code)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(tasks.TASKS, "tsv", "tsv_example:TsvTask")
  words = {"pos": ["a fine film", "great acting", "lovely story", "superb cast"],
           "neg": ["a dull film", "poor plot", "awful story", "weak cast"]}
  rows = [(w, label) for label in words for w in words[label]]
  (tmp_path / "train.tsv").write_text("".join(f"{t}\t{label}\n" for t, label in rows * 3))
  (tmp_path / "dev.tsv").write_text("".join(f"{t}\t{label}\n" for t, label in rows[:5] + rows[-5:]))
  namespace = {}
  exec(config_code, namespace)
  c = namespace["get_config"]()
  assert c.task == "tsv" and c.optimizer.learning_rate == 5e-5 and c.training.num_epochs == 3.0
  c.init_from_hf, c.model.preset = "", "tiny"
  c.data.update(train_file=str(tmp_path / "train.tsv"), dev_file=str(tmp_path / "dev.tsv"), tokenizer=minilm_dir(),
                cache_dir=cache_dir, max_seq_length=16)
  c.training.update(global_batch_size=8, eval_batch_size=8, num_train_steps=4, log_every_steps=2,
                    eval_every_steps=2, checkpoint_every_steps=4, async_checkpointing=False)
  c.optimizer.learning_rate = 1e-3
  from bertjax.train import checkpoint
  from bertjax.train.trainer import train_and_evaluate
  wd = tmp_path / "wd"
  tty, handlers = FakeTty(), list(logging.getLogger().handlers)
  with monkeypatch.context() as m, caplog.at_level(logging.INFO):
    m.setattr("sys.stderr", tty)
    final = train_and_evaluate(c, str(wd))
  saved = json.loads((wd / "eval_metrics.json").read_text())
  assert saved["step"] == 4 and saved["accuracy"] == final["accuracy"]
  assert round(saved["accuracy"] * 10, 6) == int(round(saved["accuracy"] * 10)) and 0 <= saved["accuracy"] <= 1
  assert saved["best_step"] in (2, 4) and saved["best_accuracy"] >= saved["accuracy"]
  meta = checkpoint.read_meta(str(wd / "checkpoints" / "4"))
  assert meta["task"] == "tsv" and meta["label_names"] == ["neg", "pos"] and meta["num_labels"] == 2


  bar, messages = tty.getvalue(), [r.getMessage() for r in caplog.records]
  scalars = writers.read_scalars(str(wd))
  final_redraw = [seg for seg in bar.split("\r") if "4/4 [" in seg][-1]
  assert final_redraw.startswith("train: 100%") and f"loss {scalars['train/loss'][4]:.4f} | " in final_redraw, bar
  assert re.search(r"\| [\d,]+ tokens/s\]", final_redraw), final_redraw
  assert not any(m.startswith(("train step ", "Setting work unit notes", "[2] train/", "[4] train/")) for m in messages)
  assert [m.split(" |")[0] for m in messages if m.startswith("eval step ")] == ["eval step 2/4", "eval step 4/4"]
  assert logging.getLogger().handlers == handlers
  assert sorted(scalars["train/loss"]) == [2, 4] and 4 in scalars["steps_per_sec"]
  assert scalars["eval/accuracy"][4] == pytest.approx(final["accuracy"], abs=1e-6)
  rows = summary_rows(messages)
  assert rows["steps"] == "4/4" and rows["best checkpoint"] == str(wd / "best")
  assert rows["best eval"] == f"accuracy {saved['best_accuracy']:.4f} at step {saved['best_step']}"
  assert rows["checkpoints"] == f"{wd / 'checkpoints'} (steps 4)"

  (tmp_path / "bad.tsv").write_text("fine\tpos\nno label here\n")
  c.data.dev_file = str(tmp_path / "bad.tsv")
  with pytest.raises(UserError, match=r"bad.tsv line 2 is not text<TAB>label; fix that line"):
    tasks.get("tsv")(c, str(tmp_path / "wd2")).prepare()
  assert not (tmp_path / "wd2").exists()
