"""A small SQuAD-format question-answering set built from CoNLL-2003 entity annotations (offline QA data).

    python benchmarks/conll_qa.py --conll_dir=../shared/data/conll2003 --out=workdirs/conll_qa
    python -m bertjax.main --config=configs/squad.py --config.data.data_dir=workdirs/conll_qa ...

No SQuAD copy is reachable offline, so this makes one from gold entity labels to show extractive QA fine-tuning
and `bertjax.predict` on question + context end to end. Each sentence of at least `--min_tokens` tokens becomes a
context; for every entity type it holds exactly once (PER, ORG, LOC, MISC) one question asks for that entity with
a template ("Who is mentioned?", "Which organisation is mentioned?", ...), the answer being the entity's span.
It teaches typed entity extraction phrased as questions, not reading comprehension: read the resulting model's
answers in that light. Writes `train-v1.1.json` and `dev-v1.1.json` (from train.txt and dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bertjax.data import ner  # noqa: E402

QUESTIONS = {
    "PER": ["Who is mentioned?", "Which person is named?", "Who is this about?"],
    "ORG": ["Which organisation is mentioned?", "What company, team or group is named?"],
    "LOC": ["Which place is mentioned?", "Where did it happen?"],
    "MISC": ["Which nationality, event or other name is mentioned?"],
}


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
  """(type, first token, last token) of each IOB entity."""
  spans, start, typ = [], None, None
  for i, t in enumerate(tags + ["O"]):
    inside = t.startswith("I-") and typ == t[2:]
    if start is not None and not inside:
      spans.append((typ, start, i - 1))
      start = typ = None
    if t.startswith("B-") or (t.startswith("I-") and start is None):
      start, typ = i, t[2:]
  return spans


def build(sentences, split: str, min_tokens: int, rng: random.Random) -> dict:
  paragraphs = []
  for n, s in enumerate(sentences):
    if len(s.tokens) < min_tokens:
      continue
    starts, pos = [], 0
    for tok in s.tokens:
      starts.append(pos)
      pos += len(tok) + 1
    context = " ".join(s.tokens)
    spans = entity_spans(s.tags)
    qas = []
    for typ in QUESTIONS:
      mine = [sp for sp in spans if sp[0] == typ]
      if len(mine) != 1:
        continue
      _, a, b = mine[0]
      text = context[starts[a]:starts[b] + len(s.tokens[b])]
      qas.append({"id": f"{split}-{n}-{typ}", "question": rng.choice(QUESTIONS[typ]),
                  "answers": [{"text": text, "answer_start": starts[a]}]})
    if qas:
      paragraphs.append({"context": context, "qas": qas})
  return {"version": "1.1", "data": [{"title": f"conll2003-{split}", "paragraphs": paragraphs}]}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--conll_dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "conll2003"))
  ap.add_argument("--out", required=True)
  ap.add_argument("--min_tokens", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  rng = random.Random(a.seed)
  os.makedirs(a.out, exist_ok=True)
  for split, src in (("train", "train.txt"), ("dev", "dev.txt")):
    data = build(ner.read_conll(os.path.join(a.conll_dir, src)), split, a.min_tokens, rng)
    n = sum(len(p["qas"]) for p in data["data"][0]["paragraphs"])
    with open(os.path.join(a.out, f"{split}-v1.1.json"), "w", encoding="utf-8") as f:
      json.dump(data, f, ensure_ascii=False)
    print(f"{split}: {len(data['data'][0]['paragraphs'])} contexts, {n} questions")


if __name__ == "__main__":
  main()
