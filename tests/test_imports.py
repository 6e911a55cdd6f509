"""The import graph of bertjax/, read with `ast` (nothing imported): no cycles, and subpackages import one way."""

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "bertjax"


def _module(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], top_level_only: bool) -> set[str]:
  """bertjax modules that `path` imports (`from a import b` counts as a.b when that is a module)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  me, out = _module(path), set()
  package = me if path.name == "__init__.py" else me.rpartition(".")[0]
  for node in nodes:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("bertjax")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      if not base.startswith("bertjax"):
        continue
      subs = {f"{base}.{a.name}" for a in node.names} & modules
      out |= subs or {base}
  return {m for m in out if m in modules and m != me}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
  files = sorted(PKG.rglob("*.py"))
  modules = {_module(f) for f in files}
  return {_module(f): _imports(f, modules, top_level_only) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as a list of nodes, or [] (iterative DFS with colours)."""
  colour, parent = {n: 0 for n in graph}, {}
  for root in graph:
    if colour[root]:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    colour[root] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        colour[node] = 2
        stack.pop()
      elif colour.get(child, 2) == 1:
        path = [node]
        while path[-1] != child:
          path.append(parent[path[-1]])
        return path[::-1] + [child]
      elif colour.get(child) == 0:
        colour[child], parent[child] = 1, node
        stack.append((child, iter(sorted(graph[child]))))
  return []


def _subpackage(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (PKG / parts[-1]).is_dir() else module  # bertjax.train.x -> train


# The one recursion over data, imported lazily: `load_params` of a PEFT checkpoint puts its leaves onto the base it
# references, and that base may itself be a bertjax checkpoint read by `load_params`
# (train.checkpoint -> peft.base -> convert.hf -> train.checkpoint). And `predict.load`, which hands a saved
# export or quantized model to the module that reads it (both build on predict's Predictor). Any other cycle fails.
ALLOWED_LAZY = {("bertjax.train.checkpoint", "bertjax.peft.base"), ("bertjax.predict", "bertjax.export"),
                ("bertjax.predict", "bertjax.quantize")}


def test_no_import_cycles_between_modules_even_inside_functions():
  graph = _graph(top_level_only=False)
  assert len(graph) > 40 and "bertjax.train.checkpoint" in graph["bertjax.convert.place"]  # the parser sees lazy ones
  for a, b in ALLOWED_LAZY:
    assert b in graph[a], f"{a} no longer imports {b}: drop it from ALLOWED_LAZY"
    graph[a] = graph[a] - {b}
  assert _cycle(graph) == [], "import cycle"


def test_subpackages_import_one_way_at_module_level():
  edges = {(_subpackage(a), _subpackage(b)) for a, bs in _graph(top_level_only=True).items() for b in bs}
  edges = {(a, b) for a, b in edges if a != b}
  sub = {}
  for a, b in edges:
    sub.setdefault(a, set()).add(b)
  for a in list(sub):
    sub.update({b: sub.get(b, set()) for b in sub[a]})
  assert _cycle(sub) == [], sub
  assert ("tasks", "train") not in edges and ("convert", "tasks") not in edges and ("models", "train") not in edges
  assert ("train", "convert") not in edges and ("data", "tasks") not in edges, edges


def test_the_cycle_finder_finds_cycles():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
