"""Fine-tune BERT for SQuAD v1.1 / v2.0 question answering (the BERT paper's span-extraction recipe).

  python -m bertjax.main --config=configs/squad.py --config.data.data_dir=/data/squad            # v1.1
  python -m bertjax.main --config=configs/squad.py --config.data.data_dir=/data/squad \
      --config.data.version=2.0 --config.optimizer.learning_rate=5e-5 --config.training.global_batch_size=48
`data_dir` holds train-v<version>.json and dev-v<version>.json (or set train_file / dev_file; with neither,
the hub's squad / squad_v2 are used). Outputs: exact / F1 every epoch, the best model in <workdir>/best and
<workdir>/predictions/predictions.json (+ null_odds.json for v2.0) for the official evaluation scripts.
"""

from bertjax.config import finetune_config


def get_config():
  config = finetune_config("squad", learning_rate=3e-5, max_seq_length=384, num_epochs=2.0)
  d = config.data
  # no packing: a question + context window fills max_seq_length (doc_stride slides windows over long contexts), so
  # rows have little padding to reclaim; length buckets cut the rest
  d.packing = False
  d.version = "1.1"  # "1.1" | "2.0" (unanswerable questions, null odds)
  d.data_dir = ""  # folder with train-v<version>.json and dev-v<version>.json
  d.train_file = ""  # or name the SQuAD JSON files one by one
  d.dev_file = ""
  d.doc_stride = 128  # window starts advance by this many context tokens
  d.max_query_length = 64
  d.n_best_size = 20
  d.max_answer_length = 30
  d.null_score_diff_threshold = 0.0  # v2.0: answer "" when null score - best span score exceeds this
  return config
