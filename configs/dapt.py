"""Domain-adaptive pretraining (DAPT): continue masked-LM training of a pretrained BERT on your own corpus.

  python -m bertjax.main --config=configs/dapt.py --workdir=workdirs/dapt \
    --config.init_from_hf=google-bert/bert-base-uncased --config.data.corpus='/data/my_domain/*.txt'
  python -m bertjax.main --config=configs/classify.py --workdir=workdirs/clf --config.init_from_hf="" \
    --config.init_checkpoint=workdirs/dapt --config.data.train_file=... --config.data.test_file=...

The run keeps the checkpoint's vocabulary and architecture: no WordPiece vocabulary is trained (`data.vocab_size=0`;
a `data.tokenizer` with other token ids is refused) and no preset applies. A missing MLM head (a bare `BertModel`
folder) starts fresh. The recipe is BERT's continued-pretraining one: 15% masking, learning rate 1e-4 after 6%
warmup, dropout 0.1, full-length sequences from the first step (the pretrained attention already finds the context
of a [MASK]). Masked LM only, as in Gururangan et al. 2020 (DAPT) and RoBERTa: segment B continues segment A, NSP is
not in the loss (`data.nsp_loss_weight=0`; it is still measured), so the pooler gets no gradient.
docs/pretraining.md, "Domain-adaptive pretraining", explains the flow and how to read the numbers.
"""

import importlib.util
import os

# configs/mlm.py beside this file (a checkout's configs/ or the wheel's bertjax_configs)
_spec = importlib.util.spec_from_file_location("_bertjax_mlm_config", os.path.join(os.path.dirname(__file__), "mlm.py"))
mlm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlm)


def get_config():
  config = mlm.get_config()
  config.init_from_hf = ""  # an HF folder or hub name; or init_checkpoint: a bertjax workdir or step folder
  config.model.preset = ""  # the architecture comes from the checkpoint
  config.model.hidden_dropout_prob = 0.1
  config.model.attention_probs_dropout_prob = 0.0  # 0 lets accelerators use fused attention kernels
  d = config.data
  d.corpus = ""  # your domain text: a file, folder or glob of .txt/.json/.jsonl/.parquet, a URL or a hub name
  d.tokenizer = ""  # empty: the checkpoint's; another vocabulary is refused
  d.vocab_size = 0  # never train a vocabulary
  d.short_seq_length = 0  # no short-sequence phase
  d.mask_prob = 0.15
  d.max_predictions_per_seq = 20
  d.nsp_probability = 0.0  # B continues A (single-sentence chunks still take a random B)
  d.nsp_loss_weight = 0.0  # masked LM only
  t = config.training
  t.global_batch_size = 16
  t.num_train_steps = 1000
  t.eval_every_steps = 250
  t.checkpoint_every_steps = 250
  o = config.optimizer
  o.learning_rate = 1e-4
  o.warmup_steps = 0
  o.warmup_fraction = 0.06
  o.weight_decay = 0.01
  return config
