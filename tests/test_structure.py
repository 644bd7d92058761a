"""The house rules of llmreg/, checked on the source (ast): no import cycles, a torch-only core, small modules
and functions. Each test prints every offender, so a failure says what to move."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "llmreg"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# what llmreg.core may import at module level besides the standard library and itself
CORE_THIRD_PARTY = {"torch"}
HEAVY = {"transformers", "trl", "deepspeed", "peft", "accelerate", "datasets", "lm_eval", "evaluate"}


def _modules(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported dotted name, at module level?) for every import statement, nested ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            found.append((base, id(node) in top))
            found += [(f"{base}.{alias.name}", id(node) in top) for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the llmreg modules it imports (anywhere in the file), a `from pkg import name` resolved to
    `pkg.name` when that is a module and to `pkg` otherwise."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _ in _imports(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    # explicit imports only: a package's __init__ importing its submodules is fine, a submodule importing
    # names from its own package's __init__ (which imports it) is a cycle
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_core_imports_only_torch_and_itself():
    bad = []
    for module, path in _modules().items():
        if not (module == "llmreg.core" or module.startswith("llmreg.core.")):
            continue
        for name, top_level in _imports(module, path):
            root = name.split(".")[0]
            if root == "llmreg" and not (name == "llmreg.core" or name.startswith("llmreg.core.")):
                bad.append(f"{module} imports {name}")
            elif root in HEAVY and top_level:
                bad.append(f"{module} imports {name} at module level")
            elif (
                top_level
                and root not in CORE_THIRD_PARTY | {"llmreg", "__future__"}
                and root not in sys.stdlib_module_names
            ):
                bad.append(f"{module} imports {name} (not torch or the standard library)")
    assert not bad, "\n".join(bad)


def _function_lengths(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.lineno, node.end_lineno - start + 1


@pytest.mark.parametrize("limit", [MAX_MODULE_LINES])
def test_no_module_over_the_line_limit(limit):
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n} lines"
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > limit
    ]
    assert not long, f"modules over {limit} lines:\n" + "\n".join(long)


def test_no_function_over_the_line_limit():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}: {n} lines"
        for path in _modules().values()
        for name, line, n in _function_lengths(path)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
