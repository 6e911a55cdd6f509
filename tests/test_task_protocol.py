"""Every registered task implements the `tasks.base.Task` protocol, and the trainer uses nothing outside it."""

import ast
import inspect

import pytest

from bertjax import tasks
from bertjax.models.heads import HEADS
from bertjax.tasks.base import PREDICT_MEMBERS, Task
from conftest import REPO

# What the trainer may call on a task: the protocol's methods and attributes (model_config is set by prepare).
PROTOCOL = {n for n, v in vars(Task).items() if not n.startswith("_") and (callable(v) or n in Task.__annotations__)}
PROTOCOL |= set(Task.__annotations__)
METHODS = sorted(n for n in PROTOCOL if callable(getattr(Task, n, None)))


def _arity(f):
  params = inspect.signature(f).parameters.values()
  assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params), f
  return len(params)


@pytest.mark.parametrize("key", sorted(tasks.TASKS))
def test_registered_task_implements_the_protocol(key):
  cls = tasks.get(key)
  assert issubclass(cls, Task)
  assert not cls.__abstractmethods__, f"{cls.__name__} lacks {sorted(cls.__abstractmethods__)}"
  assert cls.name == key and cls.head in HEADS and isinstance(cls.main_metric, str)
  for m in METHODS:  # as many positional parameters as the protocol's (the trainer passes them positionally)
    assert _arity(getattr(cls, m)) == _arity(getattr(Task, m)), m
  assert list(inspect.signature(cls.__init__).parameters) == ["self", "config", "workdir"]
  own = [m for m in PREDICT_MEMBERS if getattr(cls, m) is not getattr(Task, m)]
  assert own == (list(PREDICT_MEMBERS) if cls.predicts else [])


def test_which_tasks_predict():
  """Pretraining evaluates by averaging loss_fn's metrics; the fine-tuning tasks through their predictions."""
  assert {k: tasks.get(k).predicts for k in tasks.TASKS} == {
      "pretraining": False, "glue": True, "ner": True, "squad": True, "classification": True, "embedding": True}


def test_a_missing_member_is_refused():
  class NoLoss(Task):  # an abstract method missing: cannot be constructed
    name, head = "x", "pretraining"
    prepare = build_model = train_source = eval_batches = lambda self, *a: None

  assert NoLoss.__abstractmethods__ == {"loss_fn"}
  with pytest.raises(TypeError, match="loss_fn"):
    NoLoss(None, "")
  with pytest.raises(TypeError, match=r"predicts=True but \['compute_metrics'\] not implemented"):
    type("Half", (Task,), {"predicts": True, "predict_step": lambda self, model, batch: {}})
  with pytest.raises(TypeError, match=r"\['predict_step'\] implemented \(set predicts = True\)"):
    type("Silent", (Task,), {"predict_step": lambda self, model, batch: {}})


def _task_uses(path):
  """Attribute names read on a task in `path`: `task.x`, `self.task.x`, `trainer.task.x`."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Attribute):
      v = node.value
      if isinstance(v, ast.Name) and v.id == "task" or isinstance(v, ast.Attribute) and v.attr == "task":
        names.add(node.attr)
  return names


def test_the_trainer_uses_only_the_protocol():
  """Every member the trainer reads on a task is declared by `Task` (so the protocol lists everything it calls),
  and none is probed with hasattr / getattr."""
  path = REPO / "bertjax" / "train" / "trainer.py"
  used = _task_uses(path)
  assert {"loss_fn", "predict_step", "compute_metrics", "finalize", "main_metric", "predicts"} <= used
  assert used <= PROTOCOL, sorted(used - PROTOCOL)
  probes = [ast.unparse(n) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")]
  assert probes and [p for p in probes if "task" in p] == [], probes  # (trainer.source's are not the task's)
