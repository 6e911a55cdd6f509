"""BERT pretraining (masked LM + next-sentence prediction).

The defaults train BERT-tiny (2 layers, hidden 128, a WordPiece vocabulary of 4,096 learnt from the corpus)
on the embedded BBC News corpus in under 10 minutes on a 2-core CPU; docs/pretraining.md explains the recipe.
For real pretraining pick a bigger preset and corpus, e.g.
  --config.model.preset=base --config.data.corpus=/data/wiki/*.txt --config.data.sample_by=paragraph
  --config.data.tokenizer=/path/to/vocab.txt --config.training.global_batch_size=256
  --config.training.num_train_steps=1000000 --config.optimizer.name=lamb
"""

from bertjax.config import base_config


def get_config():
  config = base_config()
  config.task = "pretraining"
  d = config.data
  d.corpus = "bbc_news"  # embedded default | local file/folder/glob (.txt/.json/.jsonl/.parquet) | hub name
  d.text_column = "text"
  d.sample_by = "document"  # .txt files: one document per file ("document") or blank-line separated ("paragraph")
  d.tokenizer = ""  # vocab.txt / tokenizer.json / HF folder; empty: train WordPiece on the corpus
  d.vocab_size = 4096  # when training a vocabulary (small corpus, small model)
  d.lowercase = True
  d.max_seq_length = 128
  # The first half at 32 tokens (64 pairs a step, the same tokens): attention over 32 positions finds the
  # neighbouring words that a [MASK] needs, where at 128 it stays uniform and the model learns only word
  # frequencies (docs/pretraining.md, "The default recipe"). The run ends at max_seq_length.
  d.short_seq_length = 32  # > 0: train on pairs cut to this length (same tokens per step) first, then max_seq_length
  d.short_seq_fraction = 0.5  # of num_train_steps spent at short_seq_length
  d.short_seq_prob = 0.1
  d.nsp_probability = 0.5
  d.nsp_loss_weight = 1.0  # 0: MLM only (NSP still measured); configs/dapt.py
  d.mask_prob = 0.2  # more predictions per token processed than BERT's 15%: a short run is signal-starved
  d.max_predictions_per_seq = 26
  d.mask_token_frac = 0.8
  d.random_token_frac = 0.1
  d.whole_word_masking = False
  d.eval_fraction = 0.05  # of documents, held out

  config.model.preset = "tiny"
  config.model.hidden_dropout_prob = 0.0  # a 10-minute run does not overfit 13k pairs; dropout only slows it
  config.model.attention_probs_dropout_prob = 0.0
  t = config.training
  t.global_batch_size = 16  # small batches, many updates: what a short CPU run learns most from
  t.eval_batch_size = 64
  t.num_train_steps = 3600
  t.log_every_steps = 100
  t.eval_every_steps = 600
  t.checkpoint_every_steps = 600

  o = config.optimizer
  o.learning_rate = 1e-3  # 2e-3 scores higher at [MASK] but NSP stays at its majority; 3e-3 can collapse
  o.warmup_steps = 100
  return config
