"""Where the stories come from: the data package's import order, the local folder, the hub, `source: auto`."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_imports() -> dict[str, set[str]]:
    """Module of data/ -> the data modules it imports anywhere in it (function bodies included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "data").glob("*.py")):
        name = f"data.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("data.") and m != name}
    return graph


def test_the_data_package_has_no_import_cycle() -> None:
    graph = data_imports()
    assert "data.tokenizer" in graph and "data.tinystories" in graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())
    assert "data.tinystories" not in graph["data.tokenizer"]  # the tokenizer reads stories through data.stories
