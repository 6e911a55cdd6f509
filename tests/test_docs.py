"""docs/configuration.md against the code: every field of every config is listed with its default, and the page
names no field that does not exist (field tables and the Hugging Face name mapping alike)."""

import importlib
import json
import re
import sys

from conftest import REPO

from bertjax import config as shared

DOC = REPO / "docs" / "configuration.md"
SECTIONS = ("model", "data", "training", "optimizer", "mesh", "peft", "wandb")
PER_CONFIG = {"task", "optimizer.learning_rate"}  # each config section shows its own, even when it is the default
ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|")


def flatten(config, prefix: str = "") -> dict:
  """`a.b.c` -> value of every leaf (nested ConfigDicts are walked, lists and tuples are leaves)."""
  out = {}
  for k, v in config.items():
    if hasattr(v, "items") and not isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def fmt(value) -> str:
  """A default as the page shows it: JSON, as in <workdir>/config.json (tuples as lists, None as null)."""
  return json.dumps(json.loads(json.dumps(value)))


def configs() -> dict[str, dict]:
  """Each config the page has a section for: base_config(), finetune_config() and every configs/*.py."""
  sys.path.insert(0, str(REPO))
  out = {"base_config()": flatten(shared.base_config()), "finetune_config()": flatten(shared.finetune_config("task", 2e-5))}
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.stem != "__init__":
      out[f"configs/{path.name}"] = flatten(importlib.import_module(f"configs.{path.stem}").get_config())
  return out


def documented() -> dict[str, dict[str, str]]:
  """{section source: {field: default cell}} from the page's `## ` sections and their `| `field` | `default` |` rows."""
  out, source = {}, None
  for line in DOC.read_text().splitlines():
    if line.startswith("## "):
      source = next((s for s in configs() if f"`{s}`" in line or f"`bertjax/config.py` `{s}`" in line), None)
      out.setdefault(source, {})
    m = ROW.match(line)
    if m:
      out.setdefault(source, {})[m.group(1)] = m.group(2)
  return out


def test_every_field_of_every_config_is_documented_with_its_default():
  docs, missing, wrong = documented(), [], []
  for source, fields in configs().items():
    parent = configs()["base_config()"] if source in ("configs/mlm.py", "finetune_config()") else \
        configs()["configs/mlm.py"] if source == "configs/dapt.py" else \
        configs()["finetune_config()"] if source.startswith("configs/") else {}
    own = {k: v for k, v in fields.items() if k not in parent or parent[k] != v or k in PER_CONFIG}  # set here
    rows = docs.get(source, {})
    missing += [f"{source}: {k}" for k in own if k not in rows]
    wrong += [f"{source}: {k} is {fmt(v)}, the page says {rows[k]}" for k, v in own.items()
              if k in rows and rows[k] != fmt(v)]
  assert not missing, "fields missing from docs/configuration.md:\n" + "\n".join(missing)
  assert not wrong, "defaults that differ in docs/configuration.md:\n" + "\n".join(wrong)


def test_the_page_names_no_field_that_does_not_exist():
  fields = set().union(*(c.keys() for c in configs().values()))
  prefixes = {f.rsplit(".", i)[0] for f in fields for i in range(f.count(".") + 1)}  # `mesh.shape` is a group
  docs = documented()
  stale = [f"{s}: {k}" for s, rows in docs.items() if s for k in rows if k not in configs()[s]]
  text = DOC.read_text()
  named = set(re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*)", text))
  stale += [f"named: {n}" for n in sorted(named) if n not in prefixes]
  assert not stale, "docs/configuration.md names fields that do not exist:\n" + "\n".join(stale)
  assert len(fields) > 100 and {None, "base_config()", "configs/mlm.py"} <= set(docs)


def test_the_checker_finds_a_missing_and_a_stale_field(monkeypatch, tmp_path):
  page = tmp_path / "configuration.md"
  page.write_text(DOC.read_text().replace("| `training.grad_accum_steps` |", "| `training.grad_accum_stepz` |"))
  monkeypatch.setattr(sys.modules[__name__], "DOC", page)
  for test in (test_every_field_of_every_config_is_documented_with_its_default,
               test_the_page_names_no_field_that_does_not_exist):
    try:
      test()
    except AssertionError as e:
      assert "training.grad_accum_step" in str(e)
    else:
      raise AssertionError(f"{test.__name__} passed on a page with a renamed field")
