"""Deployment: what happens to a trained model. Each command is a module with a `main`, run as
`python -m bertjax.<command>` (thin entry modules at the package top) or its console script.

  predictor.py  `Predictor`: raw text in, labels / scores / entities / answers / embeddings out (every head)
  loading.py    a Predictor from a checkpoint, an export or a quantized model
  predict.py    files in, predictions out
  export.py     the forward pass serialized with jax.export (runs with jax + numpy + tokenizers only)
  quantize.py   int8 post-training quantization (qwix)
  prune.py      attention-head pruning, with an optional recovery fine-tune by the trainer
  serve.py      the HTTP service (Starlette / uvicorn): API keys, metrics, health, drain, workers
  search.py     `Index`: exact cosine top-k over a corpus embedded by a sentence_embedding model, and its command
  cli.py        the commands' shared argument parsing, one-line errors and output folders
"""
