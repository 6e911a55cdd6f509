"""Run artifacts, the bottom layer every other package builds and loads models through; it imports none of them.

  checkpoint.py  orbax checkpoints `<workdir>/checkpoints/<step>/{params, opt_state, meta}`: save, restore,
                 resume, step folders, meta
  load.py        `load_params`: a checkpoint's full params (PEFT checkpoints merged onto their base),
                 `init_from_checkpoint` into a model's params tree
  weights.py     Hugging Face folders into a params tree (`init_params`, `init_from_hf`) and the load report
  hf_io.py       reading HF folders (config, safetensors / pytorch weights, tokenizer files), hub downloads
  mapping.py     bertjax <-> transformers parameter names and layouts
  place.py       pretrained weights placed straight onto target shardings (each process reads its slices)
  factory.py     the model factory: a BertConfig from checkpoint meta, the NNX model of any head, adapters
  workdir.py     run folders: best / latest step, the run's tokenizer and config.json beside a checkpoint
"""
