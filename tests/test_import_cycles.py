"""No import circle inside tcmlib: the graph of its modules' imports has no cycle.

The graph is read from the source with ``ast``: every ``import tcmlib...`` / ``from tcmlib... import``
anywhere in a module, *including imports inside functions* (a deferred import still makes two modules
depend on each other; it only hides the circle from the interpreter).  Left out: imports under
``if __name__ == "__main__":``, which run only when a module is executed as a script (``python -m``),
never when it is imported, and under ``if TYPE_CHECKING:``, which never run.  ``from pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg`` (its ``__init__``); a module's parent
packages are not edges (Python initialises them first, before any sibling import could loop back).
"""

from __future__ import annotations

import ast
from pathlib import Path

TCMLIB = Path(__file__).resolve().parents[1] / "tcmlib"


def module_names(root: Path) -> dict[str, Path]:
    """``{"tcmlib.metrics.opis": path, "tcmlib.metrics": path/__init__.py, ...}`` under ``root``."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _skipped(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` or ``TYPE_CHECKING`` (plain or ``typing.``)."""
    if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__":
        return any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, name: str, modules: dict[str, Path]) -> dict[str, int]:
    """``{imported tcmlib module: first line}`` for the module ``name`` at ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _skipped(node.test):
            for child in node.orelse:
                visit(child)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # import tcmlib.a.b.c where c is a name: the deepest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.setdefault(t, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def cycles(root: Path) -> list[list[str]]:
    """The import cycles among the modules under ``root`` (each as a path a -> b -> ... -> a)."""
    modules = module_names(root)
    graph = {m: imports(p, m, modules) for m, p in modules.items()}
    found, state = [], {}  # state: 1 on the current path, 2 done

    def dfs(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                dfs(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])
    return found


def test_no_import_circle_inside_tcmlib() -> None:
    found = cycles(TCMLIB)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_checker_finds_a_circle_even_through_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "tcmlib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tcmlib.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from tcmlib import a\n    return a\n")
    (pkg / "c.py").write_text("if __name__ == '__main__':\n    from tcmlib import a\nimport tcmlib.a\n")
    assert cycles(pkg) == [["tcmlib.a", "tcmlib.sub.b", "tcmlib.a"]]
    (pkg / "sub" / "b.py").write_text("if __name__ == '__main__':\n    from tcmlib import a\n")
    assert cycles(pkg) == []


def test_the_study_package_imports_point_one_way() -> None:
    """``tcmlib.study``: the runner and the analysis build on the protocol, never the other way, and neither on
    the other (so the protocol and its rules can be read, and lifted, alone)."""
    modules = module_names(TCMLIB)
    layers = {"protocols": set(), "runner": {"protocols"}, "analysis": {"protocols"}}
    assert {m.rpartition(".")[2] for m in modules if m.startswith("tcmlib.study.")} == set(layers)
    for name, allowed in layers.items():
        full = f"tcmlib.study.{name}"
        inside = {t.rpartition(".")[2] for t in imports(modules[full], full, modules) if t.startswith("tcmlib.study")}
        assert inside <= allowed, f"{full} imports {sorted(inside - allowed)} (allowed: {sorted(allowed)})"
