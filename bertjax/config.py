"""Config fields shared by every task: `configs/mlm.py` starts from `base_config()`, the fine-tuning configs
(GLUE, NER, SQuAD, classification) from `finetune_config()`."""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = ""
  config.seed = 42
  config.init_checkpoint = ""  # a bertjax workdir or step folder to start from
  config.init_from_hf = ""  # an HF folder or hub name to start from
  config.compilation_cache = ""  # XLA's persistent cache: '' = <cache dir>/xla_compilation_cache, 'off', or a folder

  m = config.model = ml_collections.ConfigDict()
  m.preset = "base"  # tiny | mini | small | medium | base | large ('' = give every field)
  for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
    m[name] = config_dict.placeholder(int)  # override the preset's value
  m.max_position_embeddings = 512
  m.type_vocab_size = 2
  m.hidden_act = "gelu"
  m.hidden_dropout_prob = 0.1
  m.attention_probs_dropout_prob = 0.1
  m.initializer_range = config_dict.placeholder(float)  # std of the normal init (preset: 0.02)
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  m.attention = "auto"  # auto | xla | cudnn | splash; fused kernels need attention_probs_dropout_prob=0
  m.remat = "none"  # none | full | dots: recompute each layer's activations in the backward pass
  m.scan_layers = False  # layers under jax.lax.scan: one layer body compiled (same checkpoints / HF export)

  d = config.data = ml_collections.ConfigDict()
  d.cache_dir = ""  # default: $BERTJAX_CACHE or ~/.cache/bertjax
  d.num_proc = 1  # datasets.map worker processes; 1 = in-process (encode_batch already uses every core)
  d.prefetch = 2  # batches kept ready on device
  d.max_seq_length = 128
  # fine-tuning / prediction batches cut to the smallest of these widths that holds their longest example (only
  # padding columns are dropped): "auto" = 16, 32, 48, 64, 128, ..., max_seq_length; "" = off; or "16,32,64"
  d.bucket_lengths = "auto"
  d.packing = False  # pretraining: several NSP pairs per row (first-fit), attention kept within each pair
  d.max_segments_per_row = 4  # at most this many pairs in a packed row

  t = config.training = ml_collections.ConfigDict()
  t.global_batch_size = 32
  t.eval_batch_size = 64
  t.grad_accum_steps = 1
  t.num_train_steps = 1000
  t.log_every_steps = 50
  # a live bar (steps, loss, tokens/s, ETA) instead of the periodic train log lines: auto = on an interactive
  # terminal (stderr) and in Jupyter / Colab; on | off force it
  t.progress_bar = "auto"
  t.eval_every_steps = 500
  t.checkpoint_every_steps = 500
  t.keep_checkpoints = 3
  t.async_checkpointing = True
  # tuples, not lists: ml_collections overrides a tuple from the command line (--config.training.freeze="('pooler',)")
  t.freeze = ()  # regexes over '/'-joined parameter paths that get no updates
  t.freeze_embeddings = False
  t.freeze_layers = 0  # freeze the first k encoder layers
  t.num_epochs = 0.0  # used when num_train_steps <= 0
  t.early_stopping_patience = 0  # evaluations without main-metric improvement before stopping (0 = off)
  t.keep_best = True  # keep the best checkpoint by the task's main metric in <workdir>/best
  t.max_consecutive_skips = 10  # non-finite steps in a row (each skipped, not applied) before the run stops
  t.continue_schedule = ""  # resuming with a changed LR schedule: "restart" | "extend" (docs/pretraining.md)
  t.allow_batch_size_change = False  # resume a checkpoint trained with another global_batch_size
  t.eval_only = False  # evaluate (and write predictions) from the latest / init checkpoint; no training, no saving

  w = config.wandb = ml_collections.ConfigDict()  # optional Weights & Biases logging (pip install wandb)
  w.enabled = False
  w.project = "bertjax"
  w.entity = ""
  w.name = ""  # run name ('' = wandb's)
  w.mode = ""  # online | offline | disabled ('' = wandb's default)

  o = config.optimizer = ml_collections.ConfigDict()
  o.name = "adamw"  # adamw | lamb | sgd
  o.learning_rate = 1e-4
  o.schedule = "linear"  # linear | polynomial | constant (after warmup)
  o.warmup_steps = 0
  o.warmup_fraction = 0.0  # if > 0, overrides warmup_steps as a fraction of num_train_steps
  o.end_learning_rate = 0.0
  o.power = 1.0
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-6
  o.weight_decay = 0.01
  o.max_grad_norm = 1.0

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # within one slice
  # across slices (multi-slice TPU, or GPU nodes: one slice per process); the mesh is shape x dcn_shape
  mesh.dcn_shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  mesh.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("norm", None),
  )

  p = config.peft = ml_collections.ConfigDict()  # parameter-efficient fine-tuning (bertjax/peft)
  p.method = "none"  # none | lora | adapter
  p.rank = 8  # LoRA rank r
  p.alpha = 16.0  # LoRA scale alpha / r, as in HF peft
  p.dropout = 0.0  # dropout inside the adapter bottleneck (LoRA supports 0 only: it is merged per step)
  p.target_modules = ("query", "value")  # LoRA: regexes searched in '/'-joined Linear module paths
  p.adapter_size = 64  # adapter bottleneck width (after the attention and the FFN output)
  p.modules_to_save = ()  # regexes over parameter paths that also train fully (the task head always does)
  return config


def finetune_schedule(config: ml_collections.ConfigDict, learning_rate: float, num_epochs: float = 3.0,
                      checkpoint_every_steps: int = 1000) -> ml_collections.ConfigDict:
  """The BERT paper's fine-tuning recipe shared by GLUE / NER / SQuAD / classification: batch 32, AdamW with 10%
  warmup and weight decay 0.01, epochs instead of steps, an evaluation every epoch."""
  t = config.training
  t.global_batch_size, t.eval_batch_size = 32, 64
  t.num_train_steps, t.num_epochs = -1, num_epochs  # count epochs instead of steps
  t.eval_every_steps = -1  # every epoch
  t.log_every_steps, t.checkpoint_every_steps = 50, checkpoint_every_steps
  o = config.optimizer
  o.name, o.learning_rate, o.warmup_fraction, o.weight_decay = "adamw", learning_rate, 0.1, 0.01
  return config


def finetune_config(task: str, learning_rate: float, *, init_from_hf: str = "google-bert/bert-base-uncased",
                    lowercase: bool = True, max_seq_length: int = 128, num_epochs: float = 3.0,
                    checkpoint_every_steps: int = 1000) -> ml_collections.ConfigDict:
  """`base_config()` for fine-tuning `task`: starts from a pretrained checkpoint (architecture and tokenizer from it),
  the data fields every fine-tuning task reads, and the BERT paper's recipe (`finetune_schedule`)."""
  config = base_config()
  config.task = task
  config.init_from_hf = init_from_hf  # HF folder or hub name; or set init_checkpoint instead
  config.model.preset = ""  # the architecture comes from the checkpoint; set a preset to train from scratch
  d = config.data
  d.tokenizer = ""  # empty: the tokenizer that comes with init_from_hf / init_checkpoint
  d.lowercase = lowercase  # only for a bare vocab.txt without tokenizer_config.json
  d.max_seq_length = max_seq_length
  # several examples per row (first-fit into rows of max_seq_length; each keeps its own positions and attends only
  # to itself): the same losses as one example per row, with far less padding; bucket_lengths when off
  d.packing = True
  d.max_train_examples = 0  # keep the first N training examples (0 = all)
  d.max_eval_examples = 0  # keep the first N of each eval split (0 = all)
  return finetune_schedule(config, learning_rate, num_epochs, checkpoint_every_steps)
