"""Parameter-efficient fine-tuning: LoRA (Hu et al. 2021) and bottleneck adapters (Houlsby et al. 2019).

`config.peft.method = "lora" | "adapter"` (see `bertjax/config.py`). Modules:
  core.py      which parameters train (adapter/LoRA leaves + task head + `modules_to_save`), split / combine of
               the trainable and frozen trees, LoRA merged into the kernels inside the jitted step, base fingerprint
  adapters.py  the bottleneck adapter module and attaching it to BertSelfOutput / BertOutput
  base.py      PEFT checkpoints: the base reference in `meta`, merged params for `load_params`
LoRA lives at the parameter-tree level (effective kernel W + alpha/r * A @ B), so the model code is untouched and
it works for every head and sharding; adapters are the one model hook (`adapter` in BertSelfOutput / BertOutput).
"""
