"""The project's shape, read from its imports (ast, every import, also those inside functions): no cycle between
modules, and every arrow goes down the layers of ../shared/DESIGN.md.

    utils/                          shared by every layer; imports nothing of ours above it
    models/   datasets/             models know no datasets, datasets know no network
    engine.py inference.py          the training step / evaluation, and the inference tools' glue
    scripts (main.py, ...) tools/ bench/ reliability/    import anything below; nothing imports a script
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"main", "validation", "detect", "visualization", "export", "batch_overfit"}
LAYER = {"utils": 0, "models": 1, "datasets": 1, "engine": 2, "inference": 2, "tools": 3, "bench": 3,
         "reliability": 3, **dict.fromkeys(SCRIPTS, 3)}
OURS = set(LAYER)


def module_name(path: Path) -> str:
    """models/yolo.py -> models.yolo; models/__init__.py -> models."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of ours, by dotted name (tests, logs and the venv left out)."""
    paths = [p for p in ROOT.glob("*.py")] + [p for top in OURS if (ROOT / top).is_dir()
                                               for p in (ROOT / top).rglob("*.py")]
    return {module_name(p): p for p in paths}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of ours that `path` imports, anywhere in it (`from a.b import c` is a.b.c when that is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            # `from models import darknet` imports the submodule; `from models import build_model`, the package
            names = [n if n in modules else node.module for n in names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (itself left out)."""
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring)."""
    colour, stack = dict.fromkeys(graph, 0), []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    return next((cycle for node in sorted(graph) if colour[node] == 0 and (cycle := visit(node))), None)


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up or sideways where DESIGN.md forbids it."""
    bad = []
    for source, targets in graph.items():
        top = source.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other in SCRIPTS:
                bad.append(f"{source} -> {target}: nothing imports a script")
            elif LAYER[other] > LAYER[top] or (LAYER[other] == LAYER[top] and other != top and LAYER[top] < 3):
                bad.append(f"{source} -> {target}: {top} (layer {LAYER[top]}) may not import {other} "
                           f"(layer {LAYER[other]})")
            elif LAYER[top] == 3 and LAYER[other] == 3 and other != top:
                bad.append(f"{source} -> {target}: tools, bench and reliability are independent of each other")
    return sorted(bad)


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_import_goes_down_the_layers():
    assert forbidden_arrows(import_graph()) == []


def test_the_graph_sees_the_real_imports():
    graph = import_graph()
    assert {"engine", "datasets.loader", "models"} <= graph["main"]
    assert "models.loss" in graph["engine"]  # a from-import of a name
    assert "utils.augmentations" in graph["utils.config"]  # an import inside a function


@pytest.mark.parametrize("graph, cycle", [
    # the circle this test was written against: loader -> config -> evaluation -> loader
    ({"datasets.loader": {"utils.config"}, "utils.config": {"utils.evaluation", "models"},
      "utils.evaluation": {"datasets.loader"}, "models": set()},
     ["datasets.loader", "utils.config", "utils.evaluation", "datasets.loader"]),
    ({"a": {"b"}, "b": set()}, None),
])
def test_find_cycle_finds_a_known_circle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_forbidden_arrows_names_the_old_ones():
    old = {"utils.config": {"models"}, "reliability.kill_resume": {"main"}, "utils.inference": {"datasets.transforms"},
           "models.yolo": {"utils.config"}}
    assert forbidden_arrows(old) == [
        "reliability.kill_resume -> main: nothing imports a script",
        "utils.config -> models: utils (layer 0) may not import models (layer 1)",
        "utils.inference -> datasets.transforms: utils (layer 0) may not import datasets (layer 1)",
    ]
