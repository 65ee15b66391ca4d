"""The module rules of docs/DESIGN.md, checked: no import cycle inside `shared`, and the deployed app (function_app
and every module it can reach) never imports the development tools (`sandbox`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO / "shared"


def _imports(path: Path) -> set[str]:
    """The `shared` modules a module imports at module level or inside functions (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("shared."):
                found.add(node.module.split(".")[1])
            elif node.module == "shared":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("shared."))
    modules = {p.stem for p in SHARED.glob("*.py")}
    return found & modules


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) - {p.stem} for p in SHARED.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_shared_package_has_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_deployed_app_never_imports_the_development_tools() -> None:
    """Import function_app and every module of `shared` in a fresh interpreter: `sandbox` must not be loaded."""
    code = ("import importlib, pkgutil, sys, shared, function_app\n"
            "for m in pkgutil.iter_modules(shared.__path__):\n"
            "    if m.name != '__main__': importlib.import_module('shared.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n == 'sandbox' or n.startswith('sandbox.')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_functions_package_leaves_the_development_tools_out() -> None:
    ignored = {line.strip().rstrip("/") for line in (REPO / ".funcignore").read_text().splitlines()}
    assert {"sandbox", "tests", "benchmarks", "tools"} <= ignored


MAX_FUNCTION_LINES = 60


def _long_functions() -> list[str]:
    """Functions of the product over MAX_FUNCTION_LINES lines whose def is not preceded by a comment saying why."""
    found = []
    for path in [*SHARED.glob("*.py"), REPO / "function_app.py"]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                above = first - 2
                while above >= 0 and lines[above].strip().startswith("#") and not lines[above].strip().startswith(
                        "# long"):
                    above -= 1
                reason = above >= 0 and lines[above].strip().startswith("# long")
                if length > MAX_FUNCTION_LINES and not reason:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_a_function_fits_on_a_screen_or_says_why() -> None:
    """Issue 13: no function over ~60 lines in the product without its reason written beside it ("# long ...")."""
    assert _long_functions() == []
