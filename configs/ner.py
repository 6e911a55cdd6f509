"""Fine-tune BERT for named-entity recognition on CoNLL-2003 (the BERT paper's token-classification recipe).

  python -m bertjax.main --config=configs/ner.py --config.data.data_dir=/data/conll2003
The tokenizer comes with `init_from_hf` (cased BERT, as NER wants). Any BERT checkpoint works, e.g. a local
HF folder: --config.init_from_hf=/path/to/model (its own vocab; an uncased one lowercases the words).
Outputs: entity precision/recall/F1 every epoch, the best model in <workdir>/best, and
`token gold pred` files for dev (and test) in <workdir>/predictions/.
"""

from bertjax.config import finetune_config


def get_config():
  config = finetune_config("ner", learning_rate=5e-5, init_from_hf="google-bert/bert-base-cased", lowercase=False,
                           checkpoint_every_steps=500)
  d = config.data
  d.data_dir = ""  # folder with train.txt, dev.txt and optionally test.txt
  d.train_file = ""  # or name the CoNLL files one by one (token ... TAG per line, blank line between sentences)
  d.dev_file = ""
  d.test_file = ""
  d.hub_dataset = "eriktks/conll2003"  # used when no local files are given (needs network)
  return config
