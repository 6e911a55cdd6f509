"""Sentence embeddings through the deployment commands: `Predictor` (checkpoint and export), `bertjax.predict`
(.jsonl / .npy).

One tiny random-parameter sentence_embedding checkpoint (mean pooling, normalised; MiniLM's vocabulary) and one
tiny classifier serve the whole module. The reference is the model itself applied to the texts at the full
training length (48); the predictor pads batches to shorter buckets instead.
"""

import json

import numpy as np
import pytest

from test_predict import TEXTS, make_checkpoint

LONG = " ".join(TEXTS[3].split() * 4)  # more than 48 tokens: truncated like training
EMB_TEXTS = [*TEXTS, LONG, "Ada Lovelace wrote the first program"]


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
  """(workdir, the NNX model, a Predictor with batch size 4) of the embedding checkpoint."""
  from bertjax import predict
  wd, model = make_checkpoint(tmp_path_factory.mktemp("emb") / "wd", "sentence_embedding", pooling="mean",
                              normalize=True, seed=5)
  return wd, model, predict.Predictor.from_checkpoint(wd, batch_size=4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
  wd, _ = make_checkpoint(tmp_path_factory.mktemp("clf") / "wd", "sequence_classification", ["neg", "pos"])
  return wd


def direct(model, tokenizer, texts, **kw):
  from bertjax.data import glue
  f = glue.encode_pairs(tokenizer, texts, None, 48)
  return np.asarray(model(f["input_ids"], f["token_type_ids"], f["attention_mask"], deterministic=True, **kw))


def one_line_error(capsys, prefix):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"{prefix}: error:"), err
  return err[0]


def test_predictor_equals_the_model_and_reads_pooling_from_meta(emb):
  from bertjax.artifacts import load as artifacts_load
  from bertjax.deploy.predictor import Predictor
  wd, model, p = emb
  assert p.head == "sentence_embedding" and p.embedding == {"pooling": "mean", "normalize": True, "dim": 32}
  got = p.embed(EMB_TEXTS)
  want = direct(model, p.tokenizer, EMB_TEXTS, pooling="mean", normalize=True)
  assert got.dtype == np.float32 and got.shape == (len(EMB_TEXTS), 32)
  assert np.abs(got - want).max() < 2e-6
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  gaps = np.abs(got[:, None] - got[None]).max(-1)[np.triu_indices(len(got), 1)]
  assert gaps.min() > 1e-3  # every text has its own embedding
  assert [o["embedding"] for o in p(EMB_TEXTS)] == got.tolist()  # the dict per text carries the same floats
  assert p.embed([]).shape == (0, 32)
  # [CLS] pooling without normalisation, from the meta alone
  params, meta = artifacts_load.load_params(p.source)
  cls_p = Predictor.from_params(params, {**meta, "pooling": "cls", "normalize": False}, p.source, batch_size=4)
  got = cls_p.embed(EMB_TEXTS)
  assert np.abs(got - direct(model, p.tokenizer, EMB_TEXTS, pooling="cls", normalize=False)).max() < 2e-6
  assert np.linalg.norm(got, axis=1).min() > 1.5  # really not normalised
  from bertjax.errors import UserError
  with pytest.raises(UserError, match="pools by mean or cls"):
    Predictor.from_params(params, {**meta, "pooling": "max"}, p.source)
  with pytest.raises(UserError, match="single texts"):
    p(["a"], ["b"])


def test_predict_writes_jsonl_and_npy_in_input_order(emb, classifier, tmp_path, capsys):
  from bertjax import predict
  wd, _, p = emb
  src = tmp_path / "texts.txt"
  src.write_text("\n".join(EMB_TEXTS) + "\n")
  want = p.embed(EMB_TEXTS)
  args = [f"--checkpoint={wd}", f"--input={src}", "--batch_size=4", "--no-progress"]
  assert predict.main([*args, f"--output={tmp_path / 'emb.jsonl'}"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "emb.jsonl").read_text().splitlines()]
  assert [r["text"] for r in rows] == EMB_TEXTS and np.array([r["embedding"] for r in rows], np.float32).tolist() \
      == want.tolist()
  assert predict.main([*args, f"--output={tmp_path / 'emb.npy'}"]) == 0
  arr = np.load(tmp_path / "emb.npy")
  assert arr.dtype == np.float32 and arr.shape == (len(EMB_TEXTS), 32) and np.array_equal(arr, want)
  capsys.readouterr()
  # .npy from a classifier: one line, exit 2, an existing output left as it was
  (tmp_path / "old.npy").write_bytes(b"keep")
  assert predict.main([f"--checkpoint={classifier}", f"--input={src}", f"--output={tmp_path / 'old.npy'}",
                       "--no-progress"]) == 2
  assert ".npy holds the embeddings" in one_line_error(capsys, "bertjax.predict")
  assert (tmp_path / "old.npy").read_bytes() == b"keep"
  assert predict.main([*args, f"--output={tmp_path / 'p.npy'}", "--text_pair_field=text"]) == 2
  assert "single texts" in one_line_error(capsys, "bertjax.predict") and not (tmp_path / "p.npy").exists()


def test_export_of_an_embedding_model_bakes_in_pooling(emb, tmp_path):
  from bertjax import export, predict
  wd, _, p = emb
  assert export.main([f"--checkpoint={wd}", f"--out={tmp_path / 'x'}", "--platforms=cpu"]) == 0
  ex = predict.load(str(tmp_path / "x"), batch_size=4)
  assert ex.head == "sentence_embedding" and ex.embedding == p.embedding
  assert np.abs(ex.embed(EMB_TEXTS) - p.embed(EMB_TEXTS)).max() < 2e-6
