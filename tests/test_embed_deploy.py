"""Sentence embeddings through the deployment commands: `Predictor` (checkpoint and export), `bertjax.predict`
(.jsonl / .npy), `POST /embed` of `bertjax.serve`, and `bertjax.search` (Index and command).

One tiny random-parameter sentence_embedding checkpoint (mean pooling, normalised; MiniLM's vocabulary) and one
tiny classifier serve the whole module. The reference is the model itself applied to the texts at the full
training length (48); the predictor pads batches to shorter buckets instead.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_predict import TEXTS, make_checkpoint
from test_serve_production import _metric, _request

LONG = " ".join(TEXTS[3].split() * 4)  # more than 48 tokens: truncated like training
EMB_TEXTS = [*TEXTS, LONG, "Ada Lovelace wrote the first program"]
CORPUS = ["the cat sat on the mat", "stock markets fell sharply on monday", "a recipe for apple pie",
          "the weather in Paris is sunny", "football results from the weekend", LONG,
          "a gripping , beautifully shot film"]


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


def _serve(predictor, **kw):
  from bertjax import serve
  server = serve.make_server(predictor, port=0, **kw)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return server, server.server_address[1]


def test_serve_embed_route(emb, classifier):
  from bertjax import predict
  _, _, p = emb
  want = {t: e for t, e in zip(EMB_TEXTS, p.embed(EMB_TEXTS))}
  server, port = _serve(p, max_batch_size=8, max_wait_ms=20, api_keys=["k1"])
  try:
    jobs = [EMB_TEXTS[i % 8:i % 8 + 1 + i % 3] for i in range(24)]
    with ThreadPoolExecutor(6) as pool:
      res = list(pool.map(lambda t: _request(port, "/embed", json.dumps({"texts": t}).encode(), key="k1"), jobs))
    for texts, (status, data) in zip(jobs, res):
      body = json.loads(data)
      assert status == 200 and body["dim"] == 32 and len(body["embeddings"]) == len(texts)
      assert np.abs(np.array(body["embeddings"]) - [want[t] for t in texts]).max() < 2e-6
    assert server.batcher.batches < 24  # requests shared forward passes
    status, data = _request(port, "/embed", json.dumps({"text": "fine"}).encode(), key="k1")
    assert status == 200 and np.abs(np.array(json.loads(data)["embeddings"]) - [want["fine"]]).max() < 2e-6
    assert _request(port, "/embed", json.dumps({"text": "fine"}).encode())[0] == 401
    bad = [("/predict", {"texts": ["a"]}, 400, "use POST /embed"),
           ("/embed", {"texts": ["a"], "text_pairs": ["b"]}, 400, "single texts"),
           ("/embed", {"texts": []}, 400, "no texts"), ("/embed", {"txt": "a"}, 400, "missing 'texts'")]
    for route, body, status, reason in bad:
      got, data = _request(port, route, json.dumps(body).encode(), key="k1")
      err = json.loads(data)["error"]
      assert got == status and reason in err and "\n" not in err, (route, body, got, err)
    text = _request(port, "/metrics", key="k1")[1].decode()
    assert _metric(text, "bertjax_requests_total", route="/embed", status="200") == 25
    assert _metric(text, "bertjax_requests_total", route="/embed", status="401") == 1
    assert _metric(text, "bertjax_requests_total", route="/embed", status="400") == 3
    assert _metric(text, "bertjax_requests_total", route="/predict", status="400") == 1
  finally:
    server.shutdown()
    server.server_close()
  server, port = _serve(predict.Predictor.from_checkpoint(classifier, batch_size=4))
  try:
    got, data = _request(port, "/embed", json.dumps({"text": "a"}).encode())
    assert got == 400 and json.loads(data)["error"] == ("POST /embed does not serve this model (head "
                                                       "sequence_classification); use POST /predict")
    assert _request(port, "/predict", json.dumps({"text": "a"}).encode())[0] == 200
  finally:
    server.shutdown()
    server.server_close()


def test_search_index_exact_cosine(emb, tmp_path, monkeypatch):
  from bertjax.deploy import search
  _, _, p = emb
  index = search.Index.build(p, CORPUS, [f"doc{i}" for i in range(len(CORPUS))])
  index.save(str(tmp_path / "ix"))
  loaded = search.Index.load(str(tmp_path / "ix"))
  assert loaded.ids == index.ids and loaded.texts == CORPUS and loaded.meta["checkpoint"] == p.source
  assert isinstance(loaded.embeddings, np.memmap) and loaded.embeddings.dtype == np.float32
  queries = [CORPUS[2], CORPUS[5], "cats on mats", "markets"]
  hits = loaded.search(queries, k=3)  # loads the index's own checkpoint for the text queries
  assert [h[0]["id"] for h in hits[:2]] == ["doc2", "doc5"] and hits[0][0]["text"] == CORPUS[2]
  c, q = p.embed(CORPUS), p.embed(queries)
  cos = (q @ c.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(c, axis=1)[None]
  for row, h in zip(cos, hits):
    assert [x["rank"] for x in h] == [1, 2, 3] and [x["id"] for x in h] == [f"doc{i}" for i in np.argsort(-row)[:3]]
    np.testing.assert_allclose([x["score"] for x in h], np.sort(row)[::-1][:3], atol=2e-6)
  # blocks of 2 queries x 3 texts give the same top-k as one block; k past N gives N
  full = loaded.top_k(q, 5)
  monkeypatch.setattr(search, "QUERY_BLOCK", 2)
  monkeypatch.setattr(search, "CORPUS_BLOCK", 3)
  blocked = loaded.top_k(q, 5)
  assert np.array_equal(full[1], blocked[1]) and np.allclose(full[0], blocked[0], atol=1e-7)
  assert loaded.top_k(q, 50)[1].shape == (4, len(CORPUS))
  from bertjax.errors import UserError
  with pytest.raises(UserError, match=r"wants \[n, 32\]"):
    loaded.top_k(np.zeros((1, 8)), 1)


def test_search_command(emb, classifier, tmp_path, capsys):
  from bertjax import search
  wd, _, p = emb
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS)) +
                    json.dumps({"id": "blank", "text": "  "}) + "\n")
  out = tmp_path / "ix"
  assert search.main(["index", f"--checkpoint={wd}", f"--corpus={corpus}", f"--out={out}", "--no-progress"]) == 0
  assert "1 blank texts skipped" in capsys.readouterr().err
  emb_file = np.load(out / "embeddings.npy")
  assert emb_file.dtype == np.float32 and emb_file.shape == (len(CORPUS), 32)
  np.testing.assert_allclose(np.linalg.norm(emb_file, axis=1), 1.0, atol=1e-6)
  assert [json.loads(l)["id"] for l in (out / "texts.jsonl").read_text().splitlines()] == \
      [f"d{i}" for i in range(len(CORPUS))]
  assert json.loads((out / "index.json").read_text())["checkpoint"] == p.source
  queries = tmp_path / "q.txt"
  queries.write_text(f"{CORPUS[4]}\n{CORPUS[0]}\n")
  hits = tmp_path / "hits.jsonl"
  assert search.main(["query", f"--index={out}", f"--queries={queries}", "--top_k=2", f"--output={hits}",
                      "--no-progress"]) == 0
  assert "FAISS" in capsys.readouterr().err
  rows = [json.loads(l) for l in hits.read_text().splitlines()]
  assert [r["text"] for r in rows] == [CORPUS[4], CORPUS[0]] and [len(r["hits"]) for r in rows] == [2, 2]
  assert [r["hits"][0]["id"] for r in rows] == ["d4", "d0"] and abs(rows[0]["hits"][0]["score"] - 1) < 1e-5
  cases = [(["index", f"--checkpoint={wd}", f"--corpus={corpus}", f"--out={out}"], "not an empty folder"),
           (["index", f"--checkpoint={classifier}", f"--corpus={corpus}", f"--out={tmp_path / 'c'}"],
            "search needs a sentence_embedding model"),
           (["index", f"--checkpoint={wd}", f"--corpus={corpus}", f"--out={tmp_path / 'd'}", "--id_field=key"],
            "no column 'key'"),
           (["query", f"--index={out}", f"--queries={queries}", "--top_k=0", f"--output={hits}"], "--top_k=0"),
           (["query", f"--index={tmp_path}", f"--queries={queries}", f"--output={hits}"], "is not a search index"),
           (["query", f"--index={out}", f"--queries={queries}", f"--output={tmp_path / 'h.csv'}"],
            "unknown file type"),
           (["query", f"--index={out}", f"--queries={queries}", f"--output={hits}", f"--checkpoint={classifier}"],
            "search needs a sentence_embedding model")]
  before = hits.read_text()
  for args, msg in cases:
    assert search.main([*args, "--no-progress"]) == 2, args
    assert msg in one_line_error(capsys, "bertjax.search"), args
  assert hits.read_text() == before and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
