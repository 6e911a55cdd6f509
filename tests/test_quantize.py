"""`bertjax.quantize` (qwix PTQ): int8 kernels absmax-rounded, predictions close, predict and export take it."""

import json
import os

import numpy as np

from test_predict import TEXTS, make_checkpoint


def test_int8_weight_only_and_dynamic(tmp_path, capsys):
  from bertjax import export, predict, quantize
  from bertjax.train import checkpoint
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "pos"], data={"max_seq_length": 40})
  out = tmp_path / "q8"
  assert quantize.main([f"--checkpoint={wd}", f"--out={out}", "--mode=int8"]) == 0
  assert "quantized" in capsys.readouterr().err
  params, _ = checkpoint.load_params(wd)
  with np.load(out / "quantized.npz") as z:
    key = "['bert']['encoder']['layer'][1]['intermediate']['dense']['kernel']['array']"
    q, scale = z[key + "['qvalue'].value"], z[key + "['scale'].value"]
    emb = z["['bert']['embeddings']['word_embeddings']['embedding'].value"]
  w = params["bert"]["encoder"]["layer"][1]["intermediate"]["dense"]["kernel"]
  assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (1, w.shape[1])
  np.testing.assert_allclose(scale[0], np.abs(w).max(0) / 127.5, rtol=1e-6)  # qwix's absmax per output channel
  err = np.abs(q * scale - w)  # round to nearest: within half a step (ties at +-127.5 steps go either way)
  assert (err <= 0.5 * scale * (1 + 1e-4)).all() and err.max() > 0.4 * scale.min()
  assert emb.dtype == np.float32  # gathers are not matmuls: embeddings stay float
  assert json.loads((out / "meta.json").read_text())["quantization"]["mode"] == "int8"

  ref = predict.Predictor.from_checkpoint(wd)(TEXTS)
  p8 = predict.load(str(out))
  assert p8.max_seq_length == 40 and p8.head == "sequence_classification"
  got = p8(TEXTS)
  diff = [abs(a["probabilities"]["pos"] - b["probabilities"]["pos"]) for a, b in zip(got, ref)]
  assert 0 < max(diff) < 0.02, diff  # quantized (not the float model), and close to it

  assert quantize.main([f"--checkpoint={wd}", f"--out={tmp_path / 'dyn'}", "--mode=int8_dynamic"]) == 0
  dyn = predict.load(str(tmp_path / "dyn"))(TEXTS)
  diff_dyn = [abs(a["probabilities"]["pos"] - b["probabilities"]["pos"]) for a, b in zip(dyn, ref)]
  assert 0 < max(diff_dyn) < 0.05 and diff_dyn != diff, diff_dyn

  assert export.main([f"--checkpoint={out}", f"--out={tmp_path / 'exp'}"]) == 0  # serve's export takes it
  exported = predict.load(str(tmp_path / "exp"))(TEXTS)
  np.testing.assert_allclose([o["probabilities"]["pos"] for o in exported],
                             [o["probabilities"]["pos"] for o in got], atol=2e-6)


def test_quantize_errors(tmp_path, capsys):
  from bertjax import quantize
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["a", "b"])
  pre, _ = make_checkpoint(tmp_path / "pre", "pretraining")
  for args, msg in [([f"--checkpoint={wd}", "--mode=int4"], "--mode='int4' is unknown"),
                    ([f"--checkpoint={pre}"], "not a fine-tuning head")]:
    assert quantize.main([*args, f"--out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  assert not (tmp_path / "o").exists()


def test_output_folders_need_overwrite_and_inputs_are_checked_before_the_model_loads(tmp_path, capsys):
  """export / quantize refuse a non-empty --out (one line, nothing touched) unless --overwrite, which replaces it;
  predict rejects an empty input before it reads the checkpoint; usage errors name the command as invoked."""
  from bertjax import export, predict, quantize
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["a", "b"])
  for command, extra in ((quantize, []), (export, ["--platforms=cpu"])):
    out = tmp_path / f"out_{command.__name__.rsplit('.', 1)[-1]}"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert command.main([f"--checkpoint={wd}", f"--out={out}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass a new folder or --overwrite" in err[0] and os.listdir(out) == ["old.txt"], err
    assert command.main([f"--checkpoint={wd}", f"--out={out}", "--overwrite", *extra]) == 0
    assert "old.txt" not in os.listdir(out) and len(os.listdir(out)) >= 2
    capsys.readouterr()
  (tmp_path / "empty.tsv").write_text("text\n")
  assert predict.main([f"--checkpoint={tmp_path / 'no_such_run'}", f"--input={tmp_path / 'empty.tsv'}",
                       f"--output={tmp_path / 'o.jsonl'}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "has no rows (only a header?)" in err[0], err
  assert predict.main(["--checkpoint=x"]) == 2
  assert "see `python -m bertjax.predict --help`" in capsys.readouterr().err
