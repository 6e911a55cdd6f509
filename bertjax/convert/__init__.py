"""Hugging Face interop: `python -m bertjax.convert {from_hf,to_hf}` and the `bertjax.convert.hf` library API.

Modules: `mapping` (key map), `hf_io` (read HF folders, tokenizer files), `hf` (init params from HF weights or a
bertjax checkpoint), `commands` (whole-folder conversions), `verify` (numeric parity with transformers).
"""
