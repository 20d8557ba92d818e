"""The project's shape, read from its imports (ast, every import, also those inside functions): no cycle between
modules, and every arrow goes down the layers of docs/DESIGN.md.

    utils/                          shared by every layer; imports nothing of ours above it
    models/   datasets/             models know no datasets, datasets know no network
    engine/                         training and the one prediction / evaluation path, a package by job (state,
                                    train, optim, ema, evaluate, budget, progress)
    inference.py                    the inference tools' glue (may call engine's prediction path)
    scripts (main.py, ...) tools/ bench/ reliability/    import anything below; nothing imports a script

Packages and scripts are found on disk, not listed: a new top-level package (or a module that becomes a package, as
engine.py became engine/) is in the graph at once, and one that has no layer here fails
test_every_package_has_a_layer until it is given one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_CODE = {"tests", "logs", "data"}  # tests, run folders, datasets (a folder without .py files, as configs/, is none)
LIBRARY = [{"utils"}, {"models", "datasets"}, {"engine"}, {"inference"}]  # layers 0..3, from the bottom
APPS = {"tools", "bench", "reliability"}  # the top layer with the scripts: independent of each other
# The one arrow up: the config schema checks `model:` and `augment:` against the model's tables and the augmentation
# vocabulary, leaf modules that import nothing of ours (test_vocabularies_are_leaves), so that each is written once;
# and the anchors' fit (datasets/anchors.py) reads Darknet's anchors and masks from the same leaf, across its layer.
VOCABULARIES = {"utils.config": {"models.tables", "datasets.augmentations"}, "datasets.anchors": {"models.tables"}}


def top_level(root: Path) -> tuple[set[str], set[str]]:
    """(packages, scripts) of the repository at `root`: folders holding Python files (hidden ones and NOT_CODE left
    out), and top-level .py files that are not a library module (main.py, validation.py, ...)."""
    packages = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in NOT_CODE
                and any(d.glob("*.py"))}
    library = set().union(*LIBRARY)
    return packages, {p.stem for p in root.glob("*.py")} - library


def layers(root: Path = ROOT) -> dict[str, int]:
    """Top-level name -> layer: LIBRARY's from 0 up, then APPS and every script one above."""
    _, scripts = top_level(root)
    table = {name: i for i, names in enumerate(LIBRARY) for name in names}
    return {**table, **dict.fromkeys(APPS | scripts, len(LIBRARY))}


def module_name(path: Path, root: Path = ROOT) -> str:
    """models/yolo.py -> models.yolo; models/__init__.py -> models."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ours, by dotted name: top-level files and everything under each package."""
    packages, _ = top_level(root)
    paths = [*root.glob("*.py"), *(p for top in packages for p in (root / top).rglob("*.py"))]
    return {module_name(p, root): p for p in paths}


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


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (itself left out)."""
    modules = project_modules(root)
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


def forbidden_arrows(graph: dict[str, set[str]], root: Path = ROOT) -> list[str]:
    """Every import that goes up or sideways where DESIGN.md forbids it, or touches a package with no layer."""
    layer, (_, scripts) = layers(root), top_level(root)
    top_layer, bad = len(LIBRARY), []
    for source, targets in graph.items():
        top = source.split(".")[0]
        for target in targets - VOCABULARIES.get(source, set()):
            other = target.split(".")[0]
            if top not in layer or other not in layer:
                bad.append(f"{source} -> {target}: {top if top not in layer else other} has no layer")
            elif other in scripts:
                bad.append(f"{source} -> {target}: nothing imports a script")
            elif layer[other] > layer[top] or (layer[other] == layer[top] and other != top and layer[top] < top_layer):
                bad.append(f"{source} -> {target}: {top} (layer {layer[top]}) may not import {other} "
                           f"(layer {layer[other]})")
            elif layer[top] == layer[other] == top_layer and other != top:
                bad.append(f"{source} -> {target}: tools, bench and reliability are independent of each other")
    return sorted(bad)


def test_every_package_has_a_layer():
    packages, _ = top_level(ROOT)
    assert packages - set(layers()) == set(), "give each new package a layer in tests/test_layering.py"


def test_nothing_outside_tests_and_bench_names_a_folder_beside_the_clone():
    """A clone has no `../shared` (the development machines' data and weights): README, docs/DESIGN.md, the Makefile,
    the configs and the code outside tests/ and bench/ (whose records name it) must work without it."""
    packages, _ = top_level(ROOT)
    files = [ROOT / "README.md", ROOT / "docs" / "DESIGN.md", ROOT / "Makefile", *ROOT.glob("*.yaml"),
             *ROOT.glob("configs/*.yaml"), *ROOT.glob("*.py"),
             *(p for top in packages - {"bench"} for p in (ROOT / top).rglob("*.py"))]
    assert [str(f.relative_to(ROOT)) for f in files if f.is_file() and "../shared" in f.read_text()] == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_import_goes_down_the_layers():
    assert forbidden_arrows(import_graph()) == []


def test_vocabularies_are_leaves():
    """The modules the config schema may import from above import nothing of ours (so no circle can pass through)."""
    graph = import_graph()
    assert {target: graph[target] for targets in VOCABULARIES.values() for target in targets} == {
        "models.tables": set(), "datasets.augmentations": set()}
    assert graph["utils.config"] == {"models.tables", "datasets.augmentations"}


def test_the_graph_sees_the_real_imports():
    graph = import_graph()
    tops = {name.split(".")[0] for name in graph}
    assert {"utils", "models", "datasets", "engine", "inference", "main", "tools", "bench", "reliability"} <= tops
    below_engine = set().union(*(targets for name, targets in graph.items() if name.split(".")[0] == "engine"))
    assert {"models", "datasets", "utils"} <= {t.split(".")[0] for t in below_engine}
    assert {"engine", "datasets", "models"} <= {t.split(".")[0] for t in graph["main"]}
    # engine/ by job (docs/DESIGN.md); the tools' detection is evaluation's own detect_batch
    assert {"engine", "engine.state", "engine.train", "engine.optim", "engine.ema", "engine.evaluate", "engine.budget",
            "engine.progress"} <= set(graph)
    assert "engine.evaluate" in graph["inference"] and "engine.state" in graph["engine.train"]


def test_a_circle_among_the_real_engine_modules_is_found():
    graph = import_graph()
    assert find_cycle(graph) is None
    graph["engine.state"] = graph["engine.state"] | {"engine.train"}  # state importing train closes a circle
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["engine.state", "engine.train"]


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """A small repository: relative path -> source."""
    for relative, source in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source)
    return root


def test_the_graph_reads_every_kind_of_import(tmp_path):
    root = write_tree(tmp_path, {
        "models/__init__.py": "def build_model(): ...\n", "models/loss.py": "", "utils/__init__.py": "",
        "utils/boxes.py": "", "datasets/__init__.py": "", "datasets/loader.py": "",
        "engine/__init__.py": "", "engine/optim.py": "import utils.boxes\n",
        "engine/train.py": ("from models import build_model\nfrom models import loss\nfrom engine.optim import x\n"
                            "def f():\n    from datasets import loader  # inside a function\n"),
        "main.py": "import engine.train\nimport torch\n",
    })
    graph = import_graph(root)
    assert graph["engine.train"] == {"models", "models.loss", "engine.optim", "datasets.loader"}
    assert graph["engine.optim"] == {"utils.boxes"} and graph["main"] == {"engine.train"}
    assert forbidden_arrows(graph, root) == [] and find_cycle(graph) is None


def test_a_circle_inside_a_new_package_and_a_package_without_a_layer_fail(tmp_path):
    root = write_tree(tmp_path, {
        "engine/__init__.py": "", "engine/train.py": "from engine.optim import build\n",
        "engine/optim.py": "def f():\n    from engine.train import step\n",
        "newpkg/__init__.py": "import engine.train\n", "main.py": "import newpkg\n",
    })
    graph = import_graph(root)
    assert find_cycle(graph) == ["engine.optim", "engine.train", "engine.optim"]
    assert forbidden_arrows(graph, root) == ["main -> newpkg: newpkg has no layer",
                                             "newpkg -> engine.train: newpkg has no layer"]
    assert top_level(root)[0] - set(layers(root)) == {"newpkg"}


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
           "models.yolo": {"utils.config"}, "engine.evaluate": {"inference"}, "inference": {"engine.evaluate"},
           "bench.model": {"tools.anchors"}}
    assert forbidden_arrows(old) == [
        "bench.model -> tools.anchors: tools, bench and reliability are independent of each other",
        "engine.evaluate -> inference: engine (layer 2) may not import inference (layer 3)",
        "reliability.kill_resume -> main: nothing imports a script",
        "utils.config -> models: utils (layer 0) may not import models (layer 1)",
        "utils.inference -> datasets.transforms: utils (layer 0) may not import datasets (layer 1)",
    ]
