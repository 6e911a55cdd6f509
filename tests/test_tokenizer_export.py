"""A run's exported tokenizer takes its casing from the tokenizer it loaded, not from `data.lowercase`."""

import json
from pathlib import Path

import pytest

from test_trainer import tiny_config

TEXT = "Gordon Brown told BBC News that London's FTSE 100 rose; the Chancellor said UK growth was STRONG."


def test_continuing_pretraining_from_a_cased_tokenizer_exports_a_cased_one(small_corpus, cache_dir, tmp_path):
  transformers = pytest.importorskip("transformers")
  from bertjax.data import tokenizer as toklib
  from bertjax.tasks.pretraining import PretrainingTask
  texts = [p.read_text() for p in sorted(Path(small_corpus).glob("*.txt"))]
  cased = toklib.train(texts, 2000, lowercase=False)
  toklib.save(cased, str(tmp_path / "cased"), lowercase=False)
  c = tiny_config(small_corpus, cache_dir)
  c.data.tokenizer = str(tmp_path / "cased" / "tokenizer.json")
  assert c.data.lowercase  # the config's default says lowercase; the tokenizer says otherwise
  wd = tmp_path / "wd"
  task = PretrainingTask(c, str(wd))
  task.prepare()
  task.save_assets(str(wd))
  assert json.loads((wd / "tokenizer" / "tokenizer_config.json").read_text())["do_lower_case"] is False
  fast = transformers.AutoTokenizer.from_pretrained(str(wd / "tokenizer"))
  want = cased.encode(TEXT, add_special_tokens=False).ids
  assert fast(TEXT, add_special_tokens=False)["input_ids"] == want
  assert cased.encode(TEXT.lower(), add_special_tokens=False).ids != want  # casing really changes the ids
  # a resumed run reads the exported tokenizer back: the same ids
  assert toklib.for_run(str(wd), lambda: None)[0].encode(TEXT).ids == cased.encode(TEXT).ids


def test_lowercases_asks_the_normaliser(bbc_tokenizer):
  from bertjax.data import tokenizer as toklib
  tok, _ = bbc_tokenizer
  assert toklib.lowercases(tok) is True
  assert toklib.lowercases(toklib.train(["Some Cased Text here", "More Text"], 100, lowercase=False)) is False
