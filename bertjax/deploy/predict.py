"""Predictions from a fine-tuned checkpoint on new text: `python -m bertjax.predict` (`bertjax-predict`).

    python -m bertjax.predict --checkpoint=workdirs/sst2 --input=reviews.txt --output=labels.jsonl
    python -m bertjax.predict --checkpoint=workdirs/embed --input=texts.txt --output=embeddings.npy

The predictor itself (`Predictor`, every head's outputs) is `bertjax.deploy.predictor`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable

from bertjax.deploy.cli import Parser, prog, run_cli
from bertjax.deploy.loading import load
from bertjax.deploy.predictor import Predictor, predict_file, read_input
from bertjax.errors import UserError

__all__ = ["Predictor", "load", "main", "parser"]


def parser() -> argparse.ArgumentParser:
  p = Parser(prog=prog("bertjax.predict"), description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="workdir (its best checkpoint), <workdir>/best or a step "
                 "folder; or a quantized model folder (python -m bertjax.quantize)")
  p.add_argument("--input", required=True, help=".txt (one text a line), .tsv (header row) or .jsonl")
  p.add_argument("--output", required=True, help=".jsonl or .tsv; for a sentence_embedding model also .npy (the "
                 "embeddings as one float32 array [N, D], in input order)")
  p.add_argument("--text_field", default=None, help="input column of the text (default: text, else sentence; "
                 "QA: question)")
  p.add_argument("--text_pair_field", default=None, help="second text of pairs (QA: the context, default context)")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_seq_length", type=int, default=None, help="default: the training run's data.max_seq_length")
  p.add_argument("--tokenizer", default=None, help="default: <workdir>/tokenizer")
  p.add_argument("--doc_stride", type=int, default=None, help="QA window stride (default: the training run's)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
  return p


def main(argv: Iterable[str] | None = None) -> int:

  def run():
    a = parser().parse_args(argv)
    if a.batch_size < 1:
      raise UserError(f"--batch_size={a.batch_size} must be >= 1")
    rows = read_input(a.input)  # a missing, empty or malformed input fails before the model loads
    predictor = load(a.checkpoint, max_seq_length=a.max_seq_length, tokenizer=a.tokenizer, batch_size=a.batch_size,
                     doc_stride=a.doc_stride)
    n = predict_file(predictor, a.input, a.output, a.text_field, a.text_pair_field, a.progress, rows=rows)
    print(f"wrote {n} predictions ({predictor.head}, {predictor.source}) to {a.output}", file=sys.stderr)

  return run_cli("bertjax.predict", run)


if __name__ == "__main__":
  sys.exit(main())
