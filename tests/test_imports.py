"""The import graph of bertjax/, read with `ast` (nothing imported): every import, function bodies included, runs
downward through the layers that docs/architecture.md lists, and no module imports itself back through others.

`python tests/test_imports.py` prints the package graph and the function-level imports."""

import ast
import re
from pathlib import Path

from conftest import REPO

PKG = REPO / "bertjax"
DOC = REPO / "docs" / "architecture.md"
# Imports allowed inside a function: optional heavy dependencies only (each with a comment saying why).
OPTIONAL = ("torch", "transformers", "sentence_transformers", "peft", "matplotlib", "wandb", "gcsfs", "libtpu",
            "jax.experimental.pallas", "jax.experimental.topologies", "jax._src.lib", "nvidia")


def _module(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node, me: str, package: str, modules: set[str]) -> set[str]:
  """The modules one Import / ImportFrom node names (`from a import b` counts as a.b when that is a module)."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names}
  base = node.module or ""
  if node.level:
    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
  subs = {f"{base}.{a.name}" for a in node.names} & modules
  return subs or {base}


def _scan(path: Path, modules: set[str]):
  """(bertjax modules imported at module level, those imported anywhere, [(line, target, comment) of function-level
  imports])."""
  source = path.read_text()
  tree = ast.parse(source)
  lines = source.splitlines()
  me = _module(path)
  package = me if path.name == "__init__.py" else me.rpartition(".")[0]
  in_function = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      in_function |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
  top, every, inner = set(), set(), []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    names = _targets(node, me, package, modules)
    ours = {m for m in names if m in modules and m != me}
    every |= ours
    if id(node) in in_function:
      first = node.lineno - 1  # the comment may stand above a run of imports
      while first > 0 and re.match(r"\s*(import|from)\s", lines[first - 1]):
        first -= 1
      comment = " ".join(l.split("#", 1)[1] for l in lines[max(first - 1, 0):node.lineno] if "#" in l)
      inner += [(f"{path.relative_to(REPO)}:{node.lineno}", n, comment.strip()) for n in sorted(names)]
    else:
      top |= ours
  return top, every, inner


def _graph():
  files = sorted(PKG.rglob("*.py"))
  modules = {_module(f) for f in files}
  scans = {_module(f): _scan(f, modules) for f in files}
  return ({m: s[0] for m, s in scans.items()}, {m: s[1] for m, s in scans.items()},
          [i for s in scans.values() for i in s[2]])


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


def layers() -> dict[str, int]:
  """{package or top-level module name: layer} from the table between the `layers` markers of architecture.md."""
  text = DOC.read_text()
  table = text[text.index("<!-- layers"):text.index("<!-- /layers -->")]
  out = {}
  for row in table.splitlines():
    m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", row)
    if m:
      out.update({name: int(m.group(1)) for name in re.findall(r"`([\w.]+)`", m.group(2))})
  return out


def _unit(module: str) -> str:
  """bertjax.train.trainer -> train; bertjax.paths -> paths; bertjax -> bertjax."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  edges: dict[str, set[str]] = {}
  for a, bs in graph.items():
    for b in bs:
      if _unit(a) != _unit(b):
        edges.setdefault(_unit(a), set()).add(_unit(b))
  return edges


def test_no_import_cycles_between_modules_even_inside_functions():
  _, every, _ = _graph()
  assert len(every) > 60 and "bertjax.artifacts.checkpoint" in every["bertjax.artifacts.load"]
  assert _cycle(every) == [], "import cycle"


def test_every_import_runs_down_the_layers_of_architecture_md():
  layer = layers()
  _, every, _ = _graph()
  units = {_unit(m) for m in every} - {"bertjax"}
  assert units == set(layer), f"docs/architecture.md's layer table does not list exactly the packages: " \
                              f"missing {sorted(units - set(layer))}, stale {sorted(set(layer) - units)}"
  upward = sorted(f"{a} -> {b} (layer {layer[_unit(a)]} -> {layer[_unit(b)]})" for a, bs in every.items()
                  for b in bs if _unit(a) != _unit(b) and _unit(a) != "bertjax" and layer[_unit(b)] >= layer[_unit(a)])
  assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_function_level_imports_are_optional_dependencies_with_a_reason():
  _, _, inner = _graph()
  bad = [f"{where} imports {name}" for where, name, _ in inner if not name.startswith(OPTIONAL)]
  assert not bad, "move these imports to module level (only optional heavy dependencies may wait):\n" + "\n".join(bad)
  silent = [f"{where} ({name})" for where, name, why in inner if not why]
  assert not silent, "say why in a comment on (or just above) the import line:\n" + "\n".join(silent)


def test_the_checks_catch_what_they_are_for():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
  layer = layers()
  assert layer["artifacts"] < layer["tasks"] < layer["train"] < layer["deploy"] < layer["main"]
  tree = ast.parse("def f():\n  from bertjax.train import trainer\n")
  path = PKG / "tasks" / "_probe.py"
  try:  # a function-level upward import in a task module is seen, with its target
    path.write_text(ast.unparse(tree))
    top, every, inner = _graph()
    assert "bertjax.train.trainer" in every["bertjax.tasks._probe"] and not top["bertjax.tasks._probe"]
    assert inner and inner[-1][1] == "bertjax.train.trainer" or any(n == "bertjax.train.trainer" for _, n, _ in inner)
  finally:
    path.unlink()


if __name__ == "__main__":
  _, every, inner = _graph()
  lay = layers()
  for unit, deps in sorted(package_graph(every).items(), key=lambda kv: -lay.get(kv[0], 99)):
    print(f"{unit:10s} (layer {lay.get(unit, '?')}) -> {', '.join(sorted(deps, key=lambda d: -lay.get(d, 99)))}")
  print(f"\n{len(inner)} function-level imports:")
  for where, name, why in inner:
    print(f"  {where:40s} {name:55s} # {why}")
