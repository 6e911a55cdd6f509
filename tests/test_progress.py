"""Readable progress: the `train step N/M | ...` log lines when not interactive (unchanged) and the end-of-run
summary table with the run's real numbers. The live bar on a (fake) terminal is exercised by the run in
tests/test_adding_a_task.py (one tiny training run less)."""

import io
import json
import logging
import re

import pytest

from bertjax.errors import UserError
from bertjax.train import progress, writers
from bertjax.train.trainer import train_and_evaluate
from test_trainer import tiny_config

LINE = re.compile(r"^train step (\d+)/4 \| loss (\d+\.\d{4}) \| mlm_accuracy \d\.\d{4} \| nsp_accuracy \d\.\d{4} \| "
                  r"learning_rate \d\.\d\de[-+]\d\d \| .* \| skipped_steps 0\.0000 \| [\d,]+ tokens/s$")


class FakeTty(io.StringIO):
  def isatty(self):
    return True


def summary_rows(messages):
  (table,) = [m for m in messages if m.startswith("run summary\n")]
  return dict(re.split(r"\s{2,}", row, maxsplit=1) for row in table.splitlines()[2:-1])


def test_log_lines_and_summary_when_not_interactive(small_corpus, cache_dir, tmp_path, caplog, capsys):
  """Under pytest stderr is no terminal: `auto` logs the train lines (format unchanged), no bar is drawn."""
  wd = tmp_path / "run"
  c = tiny_config(small_corpus, cache_dir)  # 4 steps, logged every 2, checkpoints at 2 and 4, one eval at the end
  with caplog.at_level(logging.INFO):
    final = train_and_evaluate(c, str(wd))
  messages = [r.getMessage() for r in caplog.records]
  lines = [m for m in messages if m.startswith("train step ")]
  assert [LINE.match(m).group(1) for m in lines] == ["2", "4"], lines
  assert any(m.startswith("Setting work unit notes: ") and "(4/4)" in m for m in messages)
  assert "step/s" not in capsys.readouterr().err  # no tqdm bar

  rows = summary_rows(messages)
  assert list(rows) == ["steps", "wall time", "steps/s", "final train loss", "final eval", "checkpoints",
                        "eval metrics"]  # pretraining keeps no best checkpoint
  assert rows["steps"] == "4/4"
  loss = writers.read_scalars(str(wd))["train/loss"][4]  # the last interval's loss, as TensorBoard has it
  assert rows["final train loss"] == f"{loss:.4f} (last logging interval)" == \
      f"{float(LINE.match(lines[-1]).group(2)):.4f} (last logging interval)"
  saved = json.loads((wd / "eval_metrics.json").read_text())
  assert saved["step"] == 4 and final["mlm_accuracy"] == saved["mlm_accuracy"]
  assert rows["final eval"] == ", ".join(f"{k} {saved[k]:.4f}" for k in ("loss", "mlm_accuracy", "nsp_accuracy"))
  assert rows["checkpoints"] == f"{wd / 'checkpoints'} (steps 2, 4)"
  assert rows["eval metrics"] == str(wd / "eval_metrics.json")
  h, m, s = map(int, rows["wall time"].split(":"))
  rate = float(rows["steps/s"].split()[0])
  assert 0 < h * 3600 + m * 60 + s < 600 and 4 / rate <= h * 3600 + m * 60 + s + 1


def test_when_a_bar_is_shown():
  assert progress.want_bar("auto", FakeTty()) and not progress.want_bar("auto", io.StringIO())
  assert progress.want_bar("on", io.StringIO()) and not progress.want_bar("off", FakeTty())
  c = tiny_config("unused", "unused")
  c.training.progress_bar = "yes"
  with pytest.raises(UserError, match=r"training.progress_bar='yes' is unknown; choose one of \['auto', 'on', 'off'\]"):
    progress.check(c)


def test_summary_table_rows():
  text = progress.summary(step=30, total=40, first_step=10, wall_secs=125.4, loop_secs=10.0, train_loss=0.51234,
                          eval_metrics={"accuracy": 0.875, "loss": 0.3}, main_metric="accuracy",
                          best={"value": 0.9, "step": 20}, checkpoint_dir="/w/checkpoints", checkpoint_steps=[20, 30],
                          best_dir="/w/best", metrics_file="/w/eval_metrics.json")
  assert text.splitlines() == [
      "run summary",
      "-" * 60,
      "steps             30/40 (20 in this run, from step 10)",
      "wall time         0:02:05",
      "steps/s           2.00 (training loop, evaluations included)",
      "final train loss  0.5123 (last logging interval)",
      "final eval        accuracy 0.8750, loss 0.3000",
      "best eval         accuracy 0.9000 at step 20",
      "checkpoints       /w/checkpoints (steps 20, 30)",
      "best checkpoint   /w/best",
      "eval metrics      /w/eval_metrics.json",
      "-" * 60]
