"""Fine-tune a BERT classifier on your own labelled texts (CSV, TSV, JSON lines, parquet or a hub dataset).

  python -m bertjax.data.classify bbc_news --out=data/bbc      # the offline example: BBC News topics
  python -m bertjax.main --config=configs/classify.py --workdir=workdirs/bbc --config.init_from_hf=$MINILM \
    --config.data.train_file=data/bbc/train.jsonl --config.data.test_file=data/bbc/test.jsonl

Labels are read from the training data (strings or integers, any number of classes). Without
`validation_file` a seeded `dev_fraction` of the training rows is the dev split. Each epoch reports accuracy and
macro / micro precision, recall, F1 (plus a per-class table in the log); the best checkpoint by
`training.main_metric` is kept in `<workdir>/best` and predicts `<workdir>/predictions/{dev,test}.jsonl`, with
confusion-matrix PNGs and per-class reports (`eval_metrics.json`) beside them.
"""

from bertjax.config import finetune_config


def get_config():
  config = finetune_config("classification", learning_rate=5e-5)
  d = config.data
  d.train_file = ""  # .csv | .tsv (tab-separated, quotes literal) | .jsonl/.json | .parquet
  d.validation_file = ""  # empty: carve dev_fraction of the training rows
  d.test_file = ""  # optional; may lack the label field (then predictions only)
  d.dataset = ""  # instead of files: hub dataset "name" or "name:config" (or a local dataset folder)
  d.train_split = "train"
  d.validation_split = "validation"  # a missing split is carved from train like a missing validation_file
  d.test_split = "test"
  d.text_field = "text"
  d.text_pair_field = ""  # second text of a sentence pair, e.g. "sentence2"
  d.label_field = "label"
  d.problem_type = "classification"  # classification | regression (a number per row, MSE loss)
  d.multi_label = False  # several labels per row: a JSON list, or a label_separator-joined string in CSV/TSV
  d.label_separator = ","
  d.threshold = 0.5  # multi-label: a label is predicted when its sigmoid probability >= threshold
  d.class_weights = ""  # "balanced": weight class k by n / (K * count_k) (multi-label: BCE pos_weight)
  d.dev_fraction = 0.1

  t = config.training
  t.main_metric = ""  # best checkpoint / early stopping: accuracy | macro_f1 | micro_f1 | macro_precision | ...
  #                     ('' = macro_f1; regression: pearson | spearman | pearson_spearman_mean, '' = pearson)
  t.keep_checkpoints = 2
  return config
