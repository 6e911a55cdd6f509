"""`bertjax.predict` on a real (tiny) SST-2 fine-tune: it reproduces the run's own outputs.

A tiny BERT (test_glue_task's config: MiniLM vocabulary, 64 training sentences, dev = those 64) trains for 16
steps; then `python -m bertjax.predict` on the real SST-2 test file must give the training run's
`predictions/SST-2.tsv` row for row, and the dev sentences with their labels dropped must score exactly the
run's eval accuracy.
"""

import json

import pytest

from test_glue_task import glue_dir, minilm_dir, read_submission, tiny_config


@pytest.mark.slow
def test_predict_reproduces_sst2_run(cache_dir, tmp_path):
  from bertjax import predict
  from bertjax.train.trainer import train_and_evaluate
  src, data = glue_dir(), tmp_path / "glue"
  (data / "SST-2").mkdir(parents=True)
  (data / "SST-2" / "train.tsv").symlink_to(src / "SST-2" / "train.tsv")
  (data / "SST-2" / "test.tsv").symlink_to(src / "SST-2" / "test.tsv")
  dev = (src / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:65]
  (data / "SST-2" / "dev.tsv").write_text("".join(dev), encoding="utf-8")
  c = tiny_config("sst2", data, cache_dir, minilm_dir(), num_epochs=4.0, eval_every_steps=-1)
  wd = tmp_path / "wd"
  result = train_and_evaluate(c, str(wd))

  out = tmp_path / "test_pred.tsv"
  assert predict.main([f"--checkpoint={wd}", f"--input={src / 'SST-2' / 'test.tsv'}", f"--output={out}",
                       "--batch_size=64", "--no-progress"]) == 0
  header, want = read_submission(wd / "predictions" / "SST-2.tsv")
  lines = [l.split("\t") for l in out.read_text(encoding="utf-8").splitlines()]
  assert lines[0][:3] == ["index", "sentence", "label"] and len(lines) == 1822
  assert [(l[0], l[2]) for l in lines[1:]] == [tuple(r) for r in want]

  rows = [l.rstrip("\n").split("\t") for l in dev[1:]]
  p = predict.Predictor.from_checkpoint(str(wd), batch_size=64)
  assert p.max_seq_length == 32 and p.source.endswith(f"best/checkpoints/{result['best_step']}")
  got = [o["label"] for o in p([r[0] for r in rows])]
  accuracy = sum(g == r[1] for g, r in zip(got, rows)) / len(rows)
  assert accuracy == pytest.approx(result["best_accuracy"], abs=1e-9), (accuracy, result)
  assert json.loads((wd / "eval_metrics.json").read_text())["test_predictions"] == 1821
