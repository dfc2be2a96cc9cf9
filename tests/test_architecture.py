"""The package's dependency direction, read from its import graph: tools, CLI and launcher on top,
then the worker, then the components, then the checkpoint engine, then the plain helpers. No module
imports one from a layer above its own, and the sub-packages import each other without cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trainer"

# Highest first. A module belongs to the layer of the longest prefix that names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("trainer.cli", "trainer.__main__", "trainer.launcher", "trainer.tools")),
    ("worker", ("trainer.train",)),
    ("components", ("trainer.data", "trainer.models", "trainer.optim", "trainer.metrics")),
    ("checkpoint", ("trainer.checkpoint",)),
    ("base", ("trainer.distributed", "trainer.config", "trainer.errors", "trainer")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``trainer`` module the file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a submodule imported by name
    return {name for name in found if name == "trainer" or name.startswith("trainer.")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules} for name, path in modules.items()}


def layer_of(module: str) -> int:
    best = max(((len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                  for source, targets in graph.items() for target in targets if layer_of(target) < layer_of(source))


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the sub-packages (``trainer.data``, ``trainer.models``, ...), or None."""
    edges: dict[str, set[str]] = {}
    for source, targets in graph.items():
        for target in targets:
            if package_of(source) != package_of(target) and target != "trainer":
                edges.setdefault(package_of(source), set()).add(package_of(target))
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_sub_packages_import_each_other_without_cycles():
    assert package_cycle(import_graph()) is None


def test_the_checks_catch_an_arrow_back_up_and_a_cycle():
    graph = import_graph()
    graph["trainer.checkpoint.manager"] = graph["trainer.checkpoint.manager"] | {"trainer.train"}
    assert upward_imports(graph) == ["trainer.checkpoint.manager (checkpoint) imports trainer.train (worker)"]
    graph = import_graph()
    graph["trainer.data.loader"] = graph["trainer.data.loader"] | {"trainer.optim.schedule"}
    graph["trainer.optim.schedule"] = graph["trainer.optim.schedule"] | {"trainer.data.dataset"}
    assert package_cycle(graph) in (["trainer.data", "trainer.optim", "trainer.data"],
                                    ["trainer.optim", "trainer.data", "trainer.optim"])


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_sub_package_says_what_it_holds(package):
    docstring = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert docstring and len(docstring.split()) >= 20, f"trainer/{package}/__init__.py needs a paragraph"
