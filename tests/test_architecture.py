"""The package's layering, checked from its source (ast, nothing imported):

- no module outside zipvoice/bin imports zipvoice.bin (entry points sit on top of the library);
- no import cycle between the package's modules. Every import statement counts, also those
  inside functions (a lazy import is still a dependency); only imports under
  `if TYPE_CHECKING:` are left out, since they never run;
- zipvoice/models imports nothing from the training, ONNX, data, inference or demo code;
- no function is longer than MAX_FUNCTION_LINES, except the model constructors that mirror
  the reference specification (ALLOWED_LONG_FUNCTIONS).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "zipvoice"
MAX_FUNCTION_LINES = 80
# Constructors that build the reference architecture layer by layer, kept in the reference's
# order so that they can be read side by side with it.
ALLOWED_LONG_FUNCTIONS = {
    "zipvoice/models/modules/zipformer.py::TTSZipformer.__init__",
    "zipvoice/models/modules/zipformer.py::Zipformer2EncoderLayer.__init__",
}
MODELS_MUST_NOT_IMPORT = (
    "zipvoice.training",
    "zipvoice.onnx",
    "zipvoice.dataset",
    "zipvoice.inference",
    "zipvoice.demo",
    "zipvoice.bin",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def imported_modules(name: str) -> set[str]:
    """The package modules `name` imports: `from pkg import sub` counts as the submodule
    `pkg.sub` when there is one, else as `pkg` itself."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = name.split(".")[: -node.level or None]
                if MODULES[name].name == "__init__.py":
                    package = name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        found.update(t for t in targets if t == "zipvoice" or t.startswith("zipvoice."))
    return {t for t in found if t in MODULES and t != name}


GRAPH = {name: imported_modules(name) for name in MODULES}


def test_the_walk_sees_the_package():
    # A walk that found nothing would pass every check below.
    assert "zipvoice.training.trainer" in GRAPH
    assert "zipvoice.training.config" in GRAPH["zipvoice.training.trainer"]
    assert "zipvoice.inference.torch_backend" in GRAPH["zipvoice.inference.flags"]
    # Function-level imports count: the trainer imports the data module inside a method.
    assert "zipvoice.dataset.datamodule" in GRAPH["zipvoice.training.trainer"]


def test_only_entry_points_import_entry_points():
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if not name.startswith("zipvoice.bin")
        for target in targets
        if target == "zipvoice.bin" or target.startswith("zipvoice.bin.")
    )
    assert not offenders, offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_models_do_not_import_training_onnx_data_or_inference_code():
    offenders = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name.startswith("zipvoice.models")
        for target in targets
        if target.startswith(MODELS_MUST_NOT_IMPORT)
    )
    assert not offenders, offenders


def function_lengths(path: Path) -> dict[str, int]:
    """'Class.method' or 'function' -> number of lines, decorators included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                lengths[prefix + child.name] = child.end_lineno - start + 1
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    return lengths


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_functions_fit_on_a_screen(path: Path):
    relative = path.relative_to(REPO).as_posix()
    too_long = {
        name: lines
        for name, lines in function_lengths(path).items()
        if lines > MAX_FUNCTION_LINES and f"{relative}::{name}" not in ALLOWED_LONG_FUNCTIONS
    }
    assert not too_long, f"{relative}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_allow_list_names_real_long_functions():
    # An entry that no longer exists or has become short must leave the list.
    for entry in sorted(ALLOWED_LONG_FUNCTIONS):
        relative, name = entry.split("::")
        assert function_lengths(REPO / relative).get(name, 0) > MAX_FUNCTION_LINES, entry
