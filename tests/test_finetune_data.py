"""GLUE / SQuAD / CoNLL readers and feature conversion, on synthetic and real shared data."""

import json
import os
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from bertjax.data import glue, ner, squad
from bertjax.errors import UserError
from bertjax.tasks import metrics

WORDS = ("the a of to and in is was for on cat sat mat dog ran far away quick brown fox jumps over "
         "lazy river bank money city paris france capital museum tower bridge king queen").split()


def shared_data() -> Path:
  return Path(os.environ.get("BERTJAX_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))


def need(*parts: str) -> Path:
  path = shared_data().joinpath(*parts)
  if not path.exists():
    pytest.skip(f"shared data not found at {path} (set BERTJAX_SHARED_DATA)")
  return path


def make_tokenizer(tmp: Path, extra_words=()) -> tokenizers.Tokenizer:
  """Cased WordPiece: whole words plus every printable char and its ## form, so unknown words
  split into several sub-tokens."""
  chars = list(string.ascii_letters + string.digits + string.punctuation)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *extra_words, *chars,
           *("##" + c for c in chars)]
  path = tmp / "vocab.txt"
  path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
  return tokenizers.BertWordPieceTokenizer(str(path), lowercase=False)._tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(tmp_path_factory.mktemp("vocab"))


# ------------------------------------------------------------------ GLUE


@pytest.mark.parametrize("task,split,count", [
    ("sst2", "train", 67349), ("sst2", "dev", 872), ("sst2", "test", 1821),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("mrpc", "test", 1725),
    ("stsb", "train", 5749), ("stsb", "dev", 1500), ("stsb", "test", 1379),
    ("cola", "train", 8551), ("cola", "dev", 516),
    ("rte", "train", 1244), ("rte", "dev", 139),
    ("wnli", "train", 565), ("wnli", "dev", 70),
])
def test_glue_real_counts(task, split, count):
  examples = glue.read_split(need("glue"), task, split)
  t = glue.GLUE_TASKS[task]
  assert len(examples) == count
  assert all(e.text_a for e in examples)
  assert all((e.text_b is not None) == (len(t.text_columns) == 2) for e in examples)
  labels = [e.label for e in examples]
  if split == "test":
    assert labels == [None] * count
    assert len({e.index for e in examples}) == count
  elif t.labels is None:
    assert all(0.0 <= l <= 5.0 for l in labels) and len(set(labels)) > 10
  else:
    assert set(labels) == set(t.labels)  # Every class occurs.


def test_glue_real_first_rows():
  root = need("glue")
  assert glue.read_split(root, "sst2", "dev")[0].text_a == "one long string of cliches ."
  mrpc = glue.read_split(root, "mrpc", "test")[1]
  assert mrpc.index == 1 and mrpc.text_a.startswith("The world's two largest automakers")
  stsb = glue.read_split(root, "stsb", "dev")[1]
  assert (stsb.text_a, stsb.text_b, stsb.label) == (
      "A young child is riding a horse.", "A child is riding a horse.", 4.75)
  rte = glue.read_split(root, "rte", "dev")[0]
  assert (rte.index, rte.label, rte.text_b) == (
      57, "not_entailment", "Lufthansa Technik Automotive fires 30 workers.")


def _reference_pair(tk, a, b, max_len):
  """BERT's pop-one-at-a-time truncation on separately encoded halves."""
  ia = tk.encode(a, add_special_tokens=False).ids
  ib = tk.encode(b, add_special_tokens=False).ids
  while len(ia) + len(ib) > max_len - 3:
    (ia if len(ia) > len(ib) else ib).pop()
  return ia, ib


def test_glue_convert_pairs(tok):
  cls_id, sep_id, pad_id = glue.special_ids(tok)
  examples = [glue.Example("a", "the cat sat on the mat", "a dog ran", "1", 0),
              glue.Example("b", "Paris", "the quick brown fox jumps over the lazy dog " * 3, "0",
                           1),
              glue.Example("c", "xyzzy plugh " * 9, "qwerty " * 7, "1", 2),
              glue.Example("d", "tower", "bridge", None, 3)]
  feats = glue.convert_examples(examples, tok, 24, ["0", "1"])
  assert feats["input_ids"].shape == (4, 24) and feats["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(feats["labels"], [1, 0, 1, -1])
  # A pair that fits equals the tokenizer's own BERT template encoding.
  ref = tokenizers.BertWordPieceTokenizer(tok.get_vocab(), lowercase=False)
  enc = ref.encode("the cat sat on the mat", "a dog ran")
  n = len(enc.ids)
  np.testing.assert_array_equal(feats["input_ids"][0, :n], enc.ids)
  np.testing.assert_array_equal(feats["token_type_ids"][0, :n], enc.type_ids)
  assert (feats["input_ids"][0, n:] == pad_id).all() and feats["attention_mask"][0].sum() == n
  for i, e in enumerate(examples):
    ia, ib = _reference_pair(tok, e.text_a, e.text_b, 24)
    want = [cls_id, *ia, sep_id, *ib, sep_id]
    np.testing.assert_array_equal(feats["input_ids"][i, :len(want)], want)
    np.testing.assert_array_equal(feats["attention_mask"][i], np.arange(24) < len(want))
    np.testing.assert_array_equal(feats["token_type_ids"][i],
                                  (np.arange(24) >= len(ia) + 2) & (np.arange(24) < len(want)))
  assert feats["attention_mask"][1:3].sum(1).tolist() == [24, 24]  # Truncated rows are full.


def test_glue_convert_real_single_and_regression(tok):
  root = need("glue")
  dev = glue.read_split(root, "sst2", "dev")
  feats = glue.convert_examples(dev, tok, 32, glue.GLUE_TASKS["sst2"].labels)
  assert feats["input_ids"].shape == (872, 32)
  assert (feats["token_type_ids"] == 0).all() and (feats["input_ids"][:, 0] == 2).all()
  np.testing.assert_array_equal(feats["labels"], [int(e.label) for e in dev])
  stsb = glue.read_split(root, "stsb", "dev")[:50]
  feats = glue.convert_examples(stsb, tok, 32, None)
  assert feats["labels"].dtype == np.float32
  np.testing.assert_allclose(feats["labels"], [e.label for e in stsb])
  with pytest.raises(UserError, match="not in the label list"):
    glue.convert_examples(dev[:3], tok, 32, ["neg", "pos"])


def test_tokenizer_interfaces(tmp_path, tok):
  transformers = pytest.importorskip("transformers")
  (tmp_path / "vocab.txt").write_text("\n".join(
      sorted(tok.get_vocab(), key=tok.get_vocab().get)) + "\n", encoding="utf-8")
  # from_pretrained(folder): transformers 5 ignores BertTokenizerFast(vocab_file=...).
  fast = transformers.BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=False)
  assert fast.backend_tokenizer.get_vocab_size() == tok.get_vocab_size()
  ex = [glue.Example("a", "the cat", "sat on the mat", "1", 0)]
  want = glue.convert_examples(ex, tok, 16, ["0", "1"])
  got = glue.convert_examples(ex, fast, 16, ["0", "1"])
  for k in glue.MODEL_KEYS:
    np.testing.assert_array_equal(got[k], want[k])
  padded = tokenizers.Tokenizer.from_str(tok.to_str())
  padded.enable_padding(length=40)
  padded.enable_truncation(8)
  got = glue.convert_examples(ex, padded, 16, ["0", "1"])
  np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
  assert padded.padding is not None  # The caller's tokenizer is left as it was.
  with pytest.raises(UserError, match="fast tokenizer"):
    glue.convert_examples(ex, object(), 16, ["0", "1"])


def _write(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def test_glue_errors(tmp_path):
  with pytest.raises(UserError, match="data_dir") as e:
    glue.read_split(tmp_path, "sst2", "train")
  assert str(tmp_path / "SST-2" / "train.tsv") in str(e.value)
  with pytest.raises(UserError, match="unknown GLUE task"):
    glue.read_split(tmp_path, "sst3", "train")
  with pytest.raises(UserError, match=r"dev_matched"):
    glue.read_split(tmp_path, "mnli", "dev")
  p = _write(tmp_path / "SST-2" / "train.tsv", "text\tlabel\nfine\t1\n")
  with pytest.raises(UserError) as e:
    glue.read_split(tmp_path, "sst2", "train")
  assert f"{p}:1" in str(e.value) and "'sentence'" in str(e.value) and "'text'" in str(e.value)
  p = _write(tmp_path / "SST-2" / "dev.tsv", 'sentence\tlabel\n"good\t1\nbad\t0\nmeh\t7\n')
  with pytest.raises(UserError) as e:
    glue.read_split(tmp_path, "sst2", "dev")
  assert str(e.value) == f"{p}:4: label '7' is not one of ['0', '1'] for task sst2"
  p = _write(tmp_path / "RTE" / "train.tsv",
             "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
  with pytest.raises(UserError, match=f"{p}:3: expected 4 tab-separated fields"):
    glue.read_split(tmp_path, "rte", "train")
  p = _write(tmp_path / "STS-B" / "train.tsv", "sentence1\tsentence2\tscore\na\tb\tfive\n")
  with pytest.raises(UserError, match=f"{p}:2: score 'five' is not a finite number"):
    glue.read_split(tmp_path, "stsb", "train")
  p = _write(tmp_path / "CoLA" / "train.tsv", "src\t1\t\tok .\nsrc\t1\tok .\n")
  with pytest.raises(UserError, match=f"{p}:2: expected 4"):
    glue.read_split(tmp_path, "cola", "train")


def test_glue_quotes_are_literal(tmp_path):
  _write(tmp_path / "SST-2" / "dev.tsv", 'sentence\tlabel\n"good\t1\nbad "x"\t0\n')
  got = glue.read_split(tmp_path, "sst2", "dev")
  assert [(e.text_a, e.label) for e in got] == [('"good', "1"), ('bad "x"', "0")]


def test_glue_registry_metrics_and_labels():
  rng = np.random.default_rng(0)
  for name, t in glue.GLUE_TASKS.items():
    n_cls = 2 if t.labels is None else len(t.labels)
    labels = rng.uniform(0, 5, 20) if t.is_regression else rng.integers(0, n_cls, 20)
    assert t.metric in metrics.glue_metrics(name, labels, labels), name
    assert len(t.submission_names) == len(t.test_splits)


def _read_submission(path):
  lines = path.read_text(encoding="utf-8").splitlines()
  assert lines[0] == "index\tprediction"
  return [line.split("\t") for line in lines[1:]]


def test_submission_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  idx = [5, 0, 3, 9]
  path = glue.write_submission(tmp_path, "sst2", idx, np.array([1, 0, 0, 1]))
  assert path.name == "SST-2.tsv"
  assert _read_submission(path) == [["5", "1"], ["0", "0"], ["3", "0"], ["9", "1"]]
  path = glue.write_submission(tmp_path, "mrpc", idx, [0, 1, 1, 0])
  assert path.name == "MRPC.tsv" and [r[1] for r in _read_submission(path)] == ["0", "1", "1", "0"]
  scores = rng.uniform(0, 5, 4)
  path = glue.write_submission(tmp_path, "stsb", idx, scores)
  rows = _read_submission(path)
  assert path.name == "STS-B.tsv" and [int(r[0]) for r in rows] == idx
  np.testing.assert_allclose([float(r[1]) for r in rows], scores, atol=5e-4)
  assert all(len(r[1].split(".")[1]) == 3 for r in rows)
  path = glue.write_submission(tmp_path, "mnli", [0, 1], [2, 0], split="test_mismatched")
  assert path.name == "MNLI-mm.tsv"
  assert _read_submission(path) == [["0", "contradiction"], ["1", "entailment"]]
  assert glue.submission_filename("mnli", "test_matched") == "MNLI-m.tsv"
  with pytest.raises(ValueError):
    glue.write_submission(tmp_path, "rte", [0], [2])


def test_submission_real_test_indices(tmp_path):
  test = glue.read_split(need("glue"), "mrpc", "test")
  preds = np.arange(len(test)) % 2
  rows = _read_submission(glue.write_submission(tmp_path, "mrpc", [e.index for e in test], preds))
  assert len(rows) == 1725 and [int(r[0]) for r in rows] == [e.index for e in test]


# ------------------------------------------------------------------ SQuAD


def _synthetic_squad(rng, n, version_2=False):
  vocab = WORDS + ["Zorblax", "qwertyuiop", "snarf", "1234", "x-ray", "Eiffel's"]
  examples = []
  for i in range(n):
    words = [str(rng.choice(vocab)) for _ in range(int(rng.integers(5, 160)))]
    context = " ".join(words) + "."
    a0 = int(rng.integers(0, len(words)))
    a1 = min(len(words), a0 + int(rng.integers(1, 5)))
    start = len(" ".join(words[:a0])) + (a0 > 0)
    text = " ".join(words[a0:a1])
    impossible = version_2 and i % 3 == 0
    question = "what is the " + " ".join(str(rng.choice(vocab)) for _ in range(rng.integers(1, 20)))
    examples.append(squad.SquadExample(f"q{i}", question, context, [] if impossible else [text],
                                       [] if impossible else [start], impossible))
  return examples


def _context_tokens(tok, context):
  return [tuple(o) for o in tok.encode(context, add_special_tokens=False).offsets]


def test_squad_features_windows_and_positions(tok):
  rng = np.random.default_rng(0)
  examples = _synthetic_squad(rng, 60, version_2=True)
  L, stride, max_q = 48, 12, 10
  f = squad.convert_examples_to_features(examples, tok, L, stride, max_q, is_training=True)
  cls_id, sep_id, _ = glue.special_ids(tok)
  assert f["input_ids"].shape[1] == L and (f["input_ids"][:, 0] == cls_id).all()
  assert len(f["input_ids"]) > 3 * len(examples)  # Long contexts really were windowed.
  found_answers = 0
  for ei, ex in enumerate(examples):
    rows = np.flatnonzero(f["example_index"] == ei)
    q_ids = tok.encode(ex.question, add_special_tokens=False).ids[:max_q]
    ctx = _context_tokens(tok, ex.context)
    seen, spans = Counter(), []
    for k, r in enumerate(rows):
      np.testing.assert_array_equal(f["input_ids"][r, 1:len(q_ids) + 1], q_ids)
      assert f["input_ids"][r, len(q_ids) + 1] == sep_id
      off = f["offsets"][r]
      is_ctx = off[:, 0] >= 0
      n_tok = int(f["attention_mask"][r].sum())
      assert f["input_ids"][r, n_tok - 1] == sep_id  # Segment B: the window and its final [SEP].
      np.testing.assert_array_equal(np.flatnonzero(f["token_type_ids"][r]),
                                    np.arange(len(q_ids) + 2, n_tok))
      window = [tuple(o) for o in off[is_ctx]]
      assert window == ctx[k * stride:k * stride + len(window)]  # Starts advance by doc_stride.
      seen.update(o for o, m in zip(window, f["token_is_max_context"][r][is_ctx]) if m)
      spans.append((k * stride, len(window)))
      s, e = f["start_positions"][r], f["end_positions"][r]
      if s == 0:
        assert e == 0
      else:
        assert not ex.is_impossible and is_ctx[s] and is_ctx[e]
        assert ex.context[off[s, 0]:off[e, 1]] == ex.answers[0]
        found_answers += 1
    # Every context token is in some window and has max context in exactly one: the first
    # window maximising min(left, right context) + 0.01 * window length (BERT's rule).
    assert sorted(seen) == sorted(ctx) and set(seen.values()) <= {1}
    for j, o in enumerate(ctx):
      scores = [min(j - a, a + n - 1 - j) + 0.01 * n if a <= j < a + n else -1 for a, n in spans]
      best = int(np.argmax(scores))
      r = rows[best]
      assert f["token_is_max_context"][r][np.flatnonzero((f["offsets"][r] == o).all(1))].all()
    if not ex.is_impossible:
      a_s = ex.answer_starts[0]
      n_ans = sum(1 for o in ctx if a_s <= o[0] < a_s + len(ex.answers[0]))
      if n_ans <= L - len(q_ids) - 3 - stride:  # Then some window must hold it whole.
        assert any(f["start_positions"][r] > 0 for r in rows), ex.id
  assert found_answers >= 40


@pytest.mark.parametrize("context,answer", [
    ("the (cat) sat.", "cat"),  # Right after punctuation: '(' ends where the answer starts.
    ("an x-ray of it", "ray"),
    ("the Zorblax fox", "orb"),  # Inside a word split into ## pieces.
    ("it was the lazy dog.", "lazy dog"),  # Last word before a final period.
    ("Paris is far", "Paris"),  # First character of the context.
])
def test_squad_answer_token_span(tok, context, answer):
  ex = [squad.SquadExample("q", "where", context, [answer], [context.index(answer)])]
  f = squad.convert_examples_to_features(ex, tok, 32, 8, 8, is_training=True)
  s, e = f["start_positions"][0], f["end_positions"][0]
  assert s > 0 and context[f["offsets"][0, s, 0]:f["offsets"][0, e, 1]] == answer


def _logits_for_gold(f, rng):
  """Small random logits with a bump at each feature's gold start/end ([CLS] if none)."""
  n, L = f["input_ids"].shape
  start, end = rng.normal(0, 0.1, (n, L)), rng.normal(0, 0.1, (n, L))
  start[np.arange(n), f["start_positions"]] += 5.0
  end[np.arange(n), f["end_positions"]] += 5.0
  return start, end


def test_squad_postprocess_picks_gold(tok):
  rng = np.random.default_rng(1)
  examples = _synthetic_squad(rng, 40)
  train = squad.convert_examples_to_features(examples, tok, 64, 24, 16, is_training=True)
  evalf = squad.convert_examples_to_features(examples, tok, 64, 24, 16, is_training=False)
  assert "start_positions" not in evalf
  for k in ("input_ids", "offsets", "token_is_max_context", "example_index"):
    np.testing.assert_array_equal(evalf[k], train[k])
  start, end = _logits_for_gold(train, rng)
  preds, odds = squad.postprocess_predictions(examples, evalf, start, end, 20, 30)
  answerable = {ex.id for ei, ex in enumerate(examples)
                if (train["start_positions"][train["example_index"] == ei] > 0).any()}
  assert len(answerable) >= 30
  for ex in examples:
    if ex.id in answerable:
      assert preds[ex.id] == ex.answers[0], ex.id
  scores = metrics.squad_metrics([e for e in examples if e.id in answerable], preds, False)
  assert scores["exact"] == 100.0
  assert set(odds) == {e.id for e in examples}


def test_squad_postprocess_constraints(tok):
  ctx = "the cat sat on the mat and the dog ran far away"
  ex = [squad.SquadExample("q", "where", ctx, ["mat"], [ctx.index("mat")])]
  f = squad.convert_examples_to_features(ex, tok, 40, 16, 8, is_training=True)
  mat = int(f["start_positions"][0])
  cat, sat, dog = mat - 4, mat - 3, mat + 3
  words = [ctx[slice(*f["offsets"][0, i])] for i in (cat, sat, mat, dog)]
  assert words == ["cat", "sat", "mat", "dog"]
  start, end = np.zeros((1, 40)), np.zeros((1, 40))
  start[0, 1] = end[0, 1] = 20.0  # A question token (40): never part of an answer.
  start[0, dog], end[0, cat] = 9.0, 9.0  # dog..cat (18) ends before it starts: invalid.
  start[0, mat], end[0, mat] = 6.0, 6.0  # mat..mat: 12, the best valid span.
  preds, _ = squad.postprocess_predictions(ex, f, start, end, 20, 30)
  assert preds["q"] == "mat"
  start[0, sat] = 8.0  # sat..mat: 14 but 4 tokens long.
  assert squad.postprocess_predictions(ex, f, start, end, 20, 3)[0]["q"] == "mat"
  assert squad.postprocess_predictions(ex, f, start, end, 20, 4)[0]["q"] == "sat on the mat"


def test_squad_v2_null_threshold(tok):
  ctx = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
  ex = [squad.SquadExample("q", "who", ctx, ["lazy dog"], [ctx.index("lazy dog")])]
  f = squad.convert_examples_to_features(ex, tok, 32, 8, 4, is_training=True)
  assert len(f["input_ids"]) > 2
  hit = int(np.flatnonzero(f["start_positions"] > 0)[0])
  start, end = np.zeros(f["input_ids"].shape), np.zeros(f["input_ids"].shape)
  start[:, 0], end[:, 0] = 6.0, 5.0  # Null score 11 in every window ...
  start[0, 0] = 5.0  # ... except 10 in window 0: the minimum is used.
  start[hit, f["start_positions"][hit]] = 4.0
  end[hit, f["end_positions"][hit]] = 3.0  # Best span 7 -> null odds 10 - 7 = 3.
  for thresh, want in [(0.0, ""), (2.9, ""), (3.1, "lazy dog")]:
    preds, odds = squad.postprocess_predictions(ex, f, start, end, 20, 30, True, thresh)
    assert preds["q"] == want and odds["q"] == pytest.approx(3.0)
  preds, _ = squad.postprocess_predictions(ex, f, start, end, 20, 30, False, 0.0)
  assert preds["q"] == "lazy dog"  # v1.1 never abstains.


def test_squad_postprocess_uses_max_context(tok):
  ctx = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
  ex = [squad.SquadExample("q", "who", ctx, ["lazy dog"], [ctx.index("lazy dog")])]
  f = squad.convert_examples_to_features(ex, tok, 32, 8, 4, is_training=True)
  # 26-token windows starting at context tokens 0, 8, ...; question 'who' is w ##h ##o.
  c0 = 1 + 3 + 1
  assert f["start_positions"][0] == c0 + 7 and f["end_positions"][0] == c0 + 8
  # Context token 20 is in windows 0 and 1: min(20, 5) < min(12, 13), so it counts in window 1 only.
  assert not f["token_is_max_context"][0, c0 + 20] and f["token_is_max_context"][1, c0 + 12]
  start, end = np.zeros(f["input_ids"].shape), np.zeros(f["input_ids"].shape)
  start[0, c0 + 20] = end[0, c0 + 20] = 10.0  # Strong, but in the window lacking max context.
  start[0, c0 + 7] = end[0, c0 + 8] = 4.0
  # Length cap 2: spans ending at token 20 must start at 19 or 20, neither max-context here.
  preds, _ = squad.postprocess_predictions(ex, f, start, end, 20, 2)
  assert preds["q"] == "lazy dog"


def test_squad_reader_and_errors(tmp_path):
  ctx = "Paris is the capital of France."
  data = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": ctx, "qas": [
      {"id": "a1", "question": "capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
      {"id": "a2", "question": "king?", "answers": [], "is_impossible": True,
       "plausible_answers": [{"text": "France", "answer_start": 24}]}]}]}]}
  p = _write(tmp_path / "dev.json", json.dumps(data))
  got = squad.read_squad(p)
  assert [(e.id, e.answers, e.answer_starts, e.is_impossible) for e in got] == [
      ("a1", ["Paris"], [0], False), ("a2", [], [], True)]
  data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
  p = _write(tmp_path / "bad.json", json.dumps(data))
  with pytest.raises(UserError) as e:
    squad.read_squad(p)
  assert str(p) in str(e.value) and "'a1'" in str(e.value) and "answer_start 3" in str(e.value)
  with pytest.raises(UserError, match="not found"):
    squad.read_squad(tmp_path / "missing.json")
  with pytest.raises(UserError, match=f"{tmp_path / 'x.json'}:1: not valid JSON"):
    squad.read_squad(_write(tmp_path / "x.json", "{"))
  out = squad.write_predictions(tmp_path / "out" / "predictions.json", {"a1": "Paris", "a2": ""})
  assert json.loads(out.read_text(encoding="utf-8")) == {"a1": "Paris", "a2": ""}


# ------------------------------------------------------------------ NER


def _first_subtoken_positions(tk, words):
  """Expected first-sub-token position of each word, counting [CLS] at 0."""
  pos, out = 1, []
  for w in words:
    out.append(pos)
    pos += len(tk.encode(w, add_special_tokens=False).ids)
  return out, pos + 1  # Total length with [SEP].


def test_ner_synthetic_alignment(tok):
  rng = np.random.default_rng(0)
  labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  vocab = WORDS + ["Zorblax", "snarfle", "qq", "U.S.", "1996-08-30", "(", "Phil"]
  sents = [ner.NerSentence([str(rng.choice(vocab)) for _ in range(rng.integers(1, 12))], [])
           for _ in range(30)]
  for s in sents:
    s.tags = [str(rng.choice(labels)) for _ in s.tokens]
  L = 40
  f = ner.convert_examples(sents, tok, L, {t: i for i, t in enumerate(labels)})
  logits = rng.normal(size=(len(sents), L, len(labels)))
  aligned = ner.align_predictions(logits, f["word_index"], sents, labels)
  multi = 0
  for i, s in enumerate(sents):
    pos, total = _first_subtoken_positions(tok, s.tokens)
    multi += total - 2 > len(s.tokens)
    if total > L:
      continue
    np.testing.assert_array_equal(np.flatnonzero(f["labels"][i] != ner.IGNORE_INDEX), pos)
    assert [labels[f["labels"][i, p]] for p in pos] == s.tags
    assert aligned[i] == [labels[int(np.argmax(logits[i, p]))] for p in pos]
    assert f["attention_mask"][i].sum() == total
  assert multi > 10  # Many sentences have words split into several sub-tokens.
  # Gold ids as predictions round-trip to the gold tags.
  gold = np.where(f["labels"] >= 0, f["labels"], 0)
  assert ner.align_predictions(gold, f["word_index"], sents, labels) == [s.tags for s in sents]


def test_ner_truncation_tags_o(tok):
  s = [ner.NerSentence(["the"] * 10, ["B-PER"] + ["I-PER"] * 9)]
  f = ner.convert_examples(s, tok, 6, {"O": 0, "B-PER": 1, "I-PER": 2})
  assert f["labels"][0].tolist() == [-100, 1, 2, 2, 2, -100]
  tags = ner.align_predictions(np.maximum(f["labels"], 0), f["word_index"], s,
                               ["O", "B-PER", "I-PER"])
  assert tags == [["B-PER", "I-PER", "I-PER", "I-PER"] + ["O"] * 6]


def test_ner_real_dev_round_trip(tmp_path):
  path = need("conll2003", "dev.txt")
  sents = ner.read_conll(path)
  assert len(sents) == 3250
  labels = ner.label_list_from(sents)
  assert labels[0] == "O" and len(labels) == 9 and labels[1:] == sorted(labels[1:])
  top = [w for w, _ in Counter(t for s in sents for t in s.tokens).most_common(1500)]
  tk = make_tokenizer(tmp_path, top)
  L = 96
  f = ner.convert_examples(sents, tk, L, {t: i for i, t in enumerate(labels)})
  gold = np.where(f["labels"] >= 0, f["labels"], 0)
  aligned = ner.align_predictions(gold, f["word_index"], sents, labels)
  fits = [len(tk.encode(s.tokens, is_pretokenized=True, add_special_tokens=False).ids) + 2 <= L
          for s in sents]
  assert 0.9 * len(sents) < sum(fits) < len(sents)  # Most fit; some are cut.
  for s, a, ok, w in zip(sents, aligned, fits, f["word_index"]):
    if not ok:  # Cut sentences: the words that made it in keep their tags, the rest are 'O'.
      k = int((w >= 0).sum())
      assert 0 < k < len(s.tokens) and a == s.tags[:k] + ["O"] * (len(s.tokens) - k)
  fit_gold = [s.tags for s, ok in zip(sents, fits) if ok]
  fit_pred = [a for a, ok in zip(aligned, fits) if ok]
  assert fit_pred == fit_gold
  assert metrics.ner_f1(fit_gold, fit_pred)["f1"] == 1.0
  split = sum(len(tk.encode(w, add_special_tokens=False).ids) > 1 for s in sents for w in s.tokens)
  assert split > 1000  # The round trip really exercised multi-sub-token words.
  out = ner.write_conll(tmp_path / "pred.txt", sents[:5], aligned[:5])
  back = ner.read_conll(out)
  assert [(b.tokens, b.tags) for b in back] == [(s.tokens, a) for s, a in zip(sents, aligned)][:5]
  assert out.read_text(encoding="utf-8").splitlines()[0] == "CRICKET O O"


def test_conll_reader_formats_and_errors(tmp_path):
  p = _write(tmp_path / "a.txt", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
             "\n-DOCSTART- -X- O O\nPeter NNP B-NP B-PER\n")
  got = ner.read_conll(p)
  assert [(s.tokens, s.tags) for s in got] == [(["EU", "rejects"], ["B-ORG", "O"]),
                                               (["Peter"], ["B-PER"])]
  assert got[1].source == f"{p}:8"
  p = _write(tmp_path / "b.txt", "EU B-ORG\nrejects\n")
  with pytest.raises(UserError, match=f"{p}:2: expected 'token TAG'"):
    ner.read_conll(p)
  p = _write(tmp_path / "c.txt", "EU B-ORG\n\nB-PER Peter\n")
  with pytest.raises(UserError, match=f"{p}:3: tag 'Peter' is not an IOB tag"):
    ner.read_conll(p)
  p = _write(tmp_path / "d.txt", "EU B-ORG\nrejects O\n\nPeter B-PERSON\n")
  with pytest.raises(UserError, match=f"{p}:4: tag 'B-PERSON' is not in the label list"):
    ner.read_conll(p, ["O", "B-ORG", "B-PER", "I-PER"])
  with pytest.raises(UserError, match="not found"):
    ner.read_conll(tmp_path / "nope.txt")
