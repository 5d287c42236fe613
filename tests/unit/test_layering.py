"""The package's layering: the core stands alone, protocol code does no I/O."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import servekit

SRC = Path(servekit.__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_import_servekit_loads_only_the_core() -> None:
    """A fresh `import servekit` loads the compatibility core and nothing of the production layer or optional dependencies."""
    code = (
        "import sys, servekit\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('servekit'))))\n"
        "print(' '.join(m for m in ('uvloop', 'psutil', 'prometheus_client', 'ssl') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(SRC.parent)},
    )
    assert out.returncode == 0, out.stderr
    loaded, optional = out.stdout.splitlines()[0].split(), out.stdout.splitlines()[1:]
    allowed = ("servekit.core", "servekit.install", "servekit.errors")
    assert all(m == "servekit" or m.startswith(allowed) for m in loaded), loaded
    assert optional in ([], [""])


def test_core_imports_nothing_else_of_servekit() -> None:
    """Modules of servekit.core import only the standard library and servekit.core."""
    for path in (SRC / "core").glob("*.py"):
        for name in imported_modules(path):
            if name.startswith("servekit"):
                assert name.startswith("servekit.core"), f"{path.name} imports {name}"


def test_protocol_modules_do_no_io() -> None:
    """Sans-IO protocol modules never import socket, threading, time or selectors."""
    forbidden = {"socket", "threading", "time", "selectors", "os"}
    for path in (SRC / "protocols").glob("*.py"):
        assert not (imported_modules(path) & forbidden), path.name


def test_servekit_all_is_socketserver_all() -> None:
    """servekit.__all__ is exactly the standard library's socketserver.__all__ (3.13's names)."""
    import socketserver

    assert set(socketserver.__all__) <= set(servekit.__all__)
    extra = set(servekit.__all__) - set(socketserver.__all__)
    # 3.11 lacks the two ForkingUnix* names that 3.12 added; nothing else may differ.
    assert extra <= {"ForkingUnixStreamServer", "ForkingUnixDatagramServer"}


def test_lazy_production_names() -> None:
    """Production classes are reachable from the package root by name."""
    from servekit import PreforkMixIn, ThreadPoolMixIn, ThreadPoolTCPServer

    assert issubclass(ThreadPoolTCPServer, ThreadPoolMixIn)
    assert PreforkMixIn.__module__ == "servekit.process.prefork"


def test_settings_doc_is_generated_from_the_knobs() -> None:
    """docs/settings.md is exactly what `python -m servekit.config` prints (regenerate it after changing a knob)."""
    proc = subprocess.run(
        [sys.executable, "-m", "servekit.config"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(SRC.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    documented = (SRC.parent.parent / "docs" / "settings.md").read_text()
    assert documented == proc.stdout


# The layers from the bottom up; a module may import its own layer and those below it.
LAYERS = [
    ("servekit.errors", "servekit.knobs", "servekit.core", "servekit.protocols"),
    ("servekit.features",),
    ("servekit.apps",),
    ("servekit.process",),
    ("servekit.config",),
    ("servekit.cli",),
]


def _layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_import_points_down() -> None:
    """No module imports a layer above its own: features never import process, config or cli; process never imports config or cli."""
    for path in SRC.rglob("*.py"):
        mine = _layer_of(_module_name(path))
        if mine is None:
            continue
        for name in imported_modules(path):
            theirs = _layer_of(name)
            if theirs is not None:
                assert theirs <= mine, f"{_module_name(path)} imports {name}, a layer above it"


def test_no_import_cycles_between_modules() -> None:
    """The module import graph of servekit (imports anywhere in a module) has no cycle."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {m for m in imported_modules(path) if m in modules and m != name}
        # A package's __init__ re-exporting from its modules is not a cycle of concern.
        graph[name] = {d for d in deps if not name.startswith(d + ".") or d == "servekit"}
    graph["servekit"] = set()  # the root re-exports lazily, by name
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep] if dep in stack else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_two_modules_share_a_name() -> None:
    """A module's name says its layer: no two modules (or packages) in different packages share a name."""
    seen: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        stem = path.parent.name if path.stem == "__init__" else path.stem
        if path.stem in ("__init__", "__main__") and path.parent == SRC:
            continue
        if path.stem == "__main__":
            continue
        other = seen.get(stem)
        assert other is None or other.parent == path.parent, f"{path} and {other}"
        seen[stem] = path
