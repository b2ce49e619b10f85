"""The package's layers hold: imports only go down, there are no import cycles, and the CLI
calls nothing but the public API.

Every ``import`` of a ``lowbit`` module anywhere in a source file counts, also one inside a
function: a lazy import still ties the two modules together. Imports under ``if TYPE_CHECKING:``
do not run, and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lowbit"

#: layer of each module, by the longest matching name prefix; a module imports only its own
#: layer or lower ones (docs/architecture.md draws the same picture)
LAYERS = {
    "lowbit.errors": 0,
    "lowbit.version": 0,
    "lowbit.device": 0,
    "lowbit.formats": 1,
    "lowbit.qtensor": 1,
    "lowbit.kernels": 1,
    "lowbit.algorithms": 1,
    "lowbit.arch": 2,
    "lowbit.folding": 2,
    "lowbit.nn": 2,
    "lowbit.config": 2,
    "lowbit.gguf_names": 2,
    "lowbit.plan": 3,
    "lowbit.pipeline": 3,
    "lowbit.sources": 3,
    "lowbit.lazy": 3,
    "lowbit.gguf_cache": 3,
    "lowbit.skeleton": 3,
    "lowbit.eval": 3,
    "lowbit.export": 3,
    "lowbit.advisor": 3,
    "lowbit.report": 3,
    "lowbit.inspection": 3,
    "lowbit.imatrix_file": 3,
    "lowbit.importance": 3,
    "lowbit.api": 4,
    "lowbit.integrations": 4,  # lowbit inside transformers and peft: uses the API
    "lowbit": 4,  # the package itself re-exports the API
    "lowbit.cli": 5,
    "lowbit.__main__": 5,
}
#: what the command line may import: the public API, its errors, and text formatting
CLI_ALLOWED = {"lowbit", "lowbit.errors", "lowbit.report"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The lowbit modules ``name`` imports (``from lowbit.x import y`` counts lowbit.x.y when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lowbit")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lowbit" and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    found.discard(name)
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (node for statement in child.orelse for node in [statement, *_runtime_nodes(statement)])
            continue
        yield child
        yield from _runtime_nodes(child)


def layer(name: str) -> int:
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no layer in LAYERS: add it (and to docs/architecture.md)"
    return LAYERS[max(matches, key=len)]


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name):
    upward = sorted(other for other in GRAPH[name] if layer(other) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports higher layers: {upward}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for other in sorted(GRAPH.get(name, ())):
            if other not in MODULES:
                continue
            if state.get(other) == 1:
                cycle = path[path.index(other) :] + [other]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if other not in state:
                visit(other)
        path.pop()
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name)


def test_cli_calls_only_the_public_api():
    assert GRAPH["lowbit.cli"] <= CLI_ALLOWED, f"the CLI imports {sorted(GRAPH['lowbit.cli'] - CLI_ALLOWED)}"


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle search is not vacuous: a two-module cycle is reported."""
    monkeypatch.setitem(GRAPH, "lowbit.plan", GRAPH["lowbit.plan"] | {"lowbit.pipeline"})
    monkeypatch.setitem(GRAPH, "lowbit.pipeline", GRAPH["lowbit.pipeline"] | {"lowbit.plan"})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
