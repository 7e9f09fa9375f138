"""The package layout holds: imports point down the stack (commands, then loops, then rollout, then runtime, then
algo, then config and data), no module imports another's private names, and there is no import cycle, lazy
imports inside functions included. Read from the sources with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.unit

GRPO = ROOT / "grpo"
# Higher imports lower, never the reverse. rollout sits above runtime: its engines use the runtime's collectives,
# weights and model loading; the runtime never generates.
LAYERS = {"__main__": 6, "vllm_plugin": 6, "commands": 5, "loop": 4, "rollout": 3, "runtime": 2, "algo": 1,
          "config": 0, "data": 0, "__init__": 0}


def _module(path: Path) -> str:
    rel = path.relative_to(GRPO.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return out


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    mods = {_module(p): p for p in GRPO.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        edges = []
        for mod, names, line in _imports(path):
            if not mod.startswith("grpo"):
                continue
            # `from grpo.runtime import collectives` imports the submodule grpo.runtime.collectives
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
            edges += [(s, [], line) for s in subs] or [(mod, names, line)]
        graph[name] = edges
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[top]


def test_every_module_has_a_layer():
    assert [m for m in _graph() if "." in m and m.split(".")[1] not in LAYERS] == []


def test_imports_point_down_the_stack():
    up = [f"{m} imports {t} (line {line})" for m, edges in _graph().items() for t, _, line in edges
          if _layer(t) > _layer(m)]
    assert up == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{m} takes {n} from {t} (line {line})" for m, edges in _graph().items() for t, names, line in edges
               for n in names if n.startswith("_") and t != m]
    assert private == []


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in edges if t in _graph_modules()}) for m, edges in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, []):
            if t.startswith(m + ".") or m.startswith(t + "."):
                continue  # a package and its own modules (its __init__ is a docstring)
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def _graph_modules() -> set[str]:
    return {_module(p) for p in GRPO.rglob("*.py")}


def test_checks_see_a_violation():
    """The checks above read what they should: the parser finds a private import and an upward import in text."""
    src = "from grpo.loop.update import _private\n\ndef f():\n    from grpo.commands import cli\n"
    tree = [(n.module, [a.name for a in n.names]) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert tree == [("grpo.loop.update", ["_private"]), ("grpo.commands", ["cli"])]
    assert _layer("grpo.commands.cli") > _layer("grpo.runtime.weights") > _layer("grpo.algo.loss")
