"""The package's import graph: no circle, and every import goes down the layers (losses, outputs, assets and
environments at the ground; then data, scoring, modules, the planner, callbacks, the CLI; the demos on top, the
package root above them). Function-level imports count: a lazy import is still a dependency."""

import ast
from pathlib import Path

import lightning_align

PACKAGE = Path(lightning_align.__file__).parent
LAYERS = [
    ("losses", "outputs", "assets", "environments"),
    ("data",),
    ("scoring",),
    ("modules",),
    ("plan",),
    ("callbacks",),
    ("cli", "__main__"),
    ("demos",),
]


def module_name(path: Path) -> str:
    parts = ["lightning_align", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports (wherever in the file)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in files and c != name}
        graph[name] = targets
    return graph


def layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return len(LAYERS)  # the package root re-exports everything
    return next(i for i, tops in enumerate(LAYERS) if parts[1] in tops)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_belongs_to_a_layer():
    assert all(isinstance(layer(name), int) for name in import_graph())


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_no_library_module_imports_the_demos():
    graph = import_graph()
    library = [name for name in graph if name.split(".")[1:2] not in (["demos"], [])]
    assert [f"{a} -> {b}" for a in library for b in sorted(graph[a]) if b.startswith("lightning_align.demos")] == []


def test_the_checks_see_a_circle_and_an_upward_import():
    # The checks' own power: a made-up graph with a circle through two layers.
    graph = {
        "lightning_align.data.a": {"lightning_align.modules.b"},
        "lightning_align.modules.b": {"lightning_align.data.a"},
    }
    assert circles(graph) == [["lightning_align.data.a", "lightning_align.modules.b", "lightning_align.data.a"]]
    assert layer("lightning_align.modules.b") > layer("lightning_align.data.a")
