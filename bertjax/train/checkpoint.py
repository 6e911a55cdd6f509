"""`bertjax.train.checkpoint`: the stable import path of checkpoint reading for users' scripts.

    params, meta = bertjax.train.checkpoint.load_params("workdirs/sst2")   # numpy pure dict + meta

Checkpoints live in the bottom layer, `bertjax.artifacts` (`checkpoint` for orbax I/O and meta, `load` for full
params with PEFT checkpoints merged); this module re-exports them so existing scripts keep working.
"""

from bertjax.artifacts.checkpoint import (CHECKPOINT_SUBDIR, all_finite, latest_meta, manager, model_meta,
                                          read_meta, read_params, resolve_step_dir, restore, restore_latest,
                                          save, save_params, set_aside)
from bertjax.artifacts.load import load_params

__all__ = ["CHECKPOINT_SUBDIR", "all_finite", "latest_meta", "load_params", "manager", "model_meta", "read_meta",
           "read_params", "resolve_step_dir", "restore", "restore_latest", "save", "save_params", "set_aside"]
