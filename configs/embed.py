"""Sentence embeddings: fine-tune a bi-encoder as sentence-transformers does (its STS-B recipe by default).

STS-B from a local GLUE copy, starting from the offline MiniLM sentence-transformers folder (cosine loss on
scores / 5, batch 16, 4 epochs, AdamW lr 5e-5 with 10% warmup, no weight decay: transformers Trainer's defaults):
  python -m bertjax.main --config=configs/embed.py --workdir=workdirs/stsb_emb \
    --config.init_from_hf=$MINILM --config.data.data_dir=../shared/data/glue
Question -> answer pairs without scores train with in-batch negatives instead (embedding.loss=ranking, or auto):
    --config.data.glue_task="" --config.data.train_file=pairs.jsonl --config.data.validation_file=dev.jsonl \
    --config.data.text_field=question --config.data.text_pair_field=answer --config.data.label_field=""
The dev split reports spearman / pearson (scored pairs) or recall@1/5/10 and mrr@10 (retrieval); export with
  python -m bertjax.convert to_hf --checkpoint=workdirs/stsb_emb --out=stsb_st --format=sentence-transformers
"""

import ml_collections

from bertjax.config import finetune_config


def get_config():
  config = finetune_config("embedding", learning_rate=5e-5, num_epochs=4.0)
  config.init_from_hf = "sentence-transformers/all-MiniLM-L6-v2"
  d = config.data
  d.glue_task = "stsb"  # GLUE-layout pairs: stsb (scored) | mrpc, qqp (positive pairs; dev = retrieval)
  d.data_dir = ""  # <data_dir>/<TASK>/{train,dev}.tsv; empty with glue_task: the hub nyu-mll/glue
  d.train_file = ""  # or files: .csv | .tsv | .jsonl/.json | .parquet (set glue_task="")
  d.validation_file = ""
  d.dataset = ""  # or a hub dataset "name" / "name:config" (set glue_task="")
  d.train_split = "train"
  d.validation_split = "validation"
  d.text_field = "sentence1"  # the first text (query / anchor)
  d.text_pair_field = "sentence2"  # the second (positive)
  d.negative_field = ""  # an optional hard negative per row (ranking loss)
  d.label_field = ""  # the pair's similarity score ('' = none: ranking loss)
  d.max_score = 0.0  # scores are divided by this for the cosine loss (0 = the largest training score if > 1, else 1)
  d.max_texts_per_row = 16  # packing: at most this many texts share a row

  e = config.embedding = ml_collections.ConfigDict()
  e.pooling = ""  # mean | cls ('' = the starting model's: a sentence-transformers folder or embedding run; else mean)
  e.normalize = ml_collections.config_dict.placeholder(bool)  # L2-normalise the embeddings (None = the starting model's)
  e.loss = "auto"  # auto (cosine with scores, else ranking) | cosine | ranking
  e.scale = 20.0  # ranking: similarity scale (sentence-transformers' MultipleNegativesRankingLoss default)

  t = config.training
  t.global_batch_size, t.eval_batch_size = 16, 64
  t.main_metric = ""  # '' = spearman (scored dev pairs) or mrr@10 (retrieval dev set)
  t.keep_checkpoints = 2
  o = config.optimizer  # sentence-transformers' trainer (transformers' Trainer) defaults
  o.weight_decay, o.eps = 0.0, 1e-8
  return config
