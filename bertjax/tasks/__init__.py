"""Tasks by name: `config.task` picks one; a new task is one module here plus a config."""

from __future__ import annotations

import importlib

from bertjax.errors import UserError

TASKS = {
    "pretraining": "bertjax.tasks.pretraining:PretrainingTask",
    "glue": "bertjax.tasks.glue:GlueTask",
    "ner": "bertjax.tasks.ner:NerTask",
    "squad": "bertjax.tasks.squad:SquadTask",
    "classification": "bertjax.tasks.classify:ClassificationTask",
    "embedding": "bertjax.tasks.embed:EmbeddingTask",
}


def get(name: str):
  if name not in TASKS:
    raise UserError(f"config.task={name!r} is unknown; choose one of {sorted(TASKS)}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)
