"""CLI: `python -m bertjax.convert {from_hf,to_hf} ...`; a user mistake prints one line and exits 2."""

from __future__ import annotations

import argparse
import os
import sys

from bertjax import logs
from bertjax.convert import commands
from bertjax.convert.verify import ParityError
from bertjax.errors import UserError


class _Parser(argparse.ArgumentParser):

  def error(self, message: str):  # one line, like UserError
    raise UserError(f"{message} (see `{self.prog} --help`)")


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m bertjax.convert",
              description="Convert between Hugging Face BERT folders and bertjax checkpoints.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  a = sub.add_parser("from_hf", help="Hugging Face BERT folder or hub name -> bertjax checkpoint")
  a.add_argument("--hf", required=True, help="HF model folder or hub name (e.g. bert-base-uncased), or a "
                 "sentence-transformers folder")
  a.add_argument("--out", required=True, help="bertjax workdir to write (checkpoints/0, tokenizer/)")
  a.add_argument("--head", default="auto", choices=commands.HEAD_CHOICES, metavar="|".join(commands.HEAD_CHOICES),
                 help="default: from the source (sentence_embedding for a sentence-transformers folder)")
  a.add_argument("--num_labels", type=int, default=None, help="classifier size (default: from the source)")
  a.add_argument("--seed", type=int, default=0, help="seed for heads initialised fresh")
  a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  a.add_argument("--peft", default="", help="HF peft LoRA folder to put onto --hf (writes a bertjax PEFT checkpoint)")
  b = sub.add_parser("to_hf", help="bertjax checkpoint -> Hugging Face folder (transformers or sentence-transformers)")
  b.add_argument("--checkpoint", required=True, help="bertjax workdir or checkpoint step folder")
  b.add_argument("--out", required=True, help="HF folder to write")
  b.add_argument("--format", dest="fmt", default=None, choices=commands.FORMATS, metavar="|".join(commands.FORMATS),
                 help="folder layout (default: sentence-transformers for a sentence_embedding checkpoint, "
                      "else transformers)")
  b.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                 help="reload with transformers (sentence-transformers for embeddings) and compare outputs "
                      "(default: when they are installed)")
  b.add_argument("--atol", type=float, default=1e-4, help="parity tolerance, max abs diff (default 1e-4)")
  b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  b.add_argument("--peft", action="store_true",
                 help="LoRA checkpoint -> HF peft adapter folder for its base (default: LoRA merged into the weights)")
  return p


def main(argv: list[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logs.quiet_libraries()
  log = lambda line: print(line, flush=True)
  try:
    args = parser().parse_args(argv)
    if args.command == "from_hf" and args.peft:
      commands.from_hf_peft(args.peft, args.hf, args.out, args.overwrite, log=log)
    elif args.command == "from_hf":
      commands.from_hf(args.hf, args.out, args.head, args.num_labels, args.overwrite, args.seed, log=log)
    else:
      commands.to_hf(args.checkpoint, args.out, args.verify, args.atol, args.overwrite, log=log, peft=args.peft,
                     fmt=args.fmt)
  except UserError as e:
    print(f"bertjax.convert: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except ParityError as e:
    print(f"bertjax.convert: error: parity check failed: {' '.join(str(e).split())}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
