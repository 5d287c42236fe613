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
    assert PreforkMixIn.__module__ == "servekit.prefork"


def test_settings_doc_is_generated_from_the_knobs() -> None:
    """docs/settings.md is exactly what `python -m servekit.settings` prints (regenerate it after changing a knob)."""
    proc = subprocess.run(
        [sys.executable, "-m", "servekit.settings"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(SRC.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    documented = (SRC.parent.parent / "docs" / "settings.md").read_text()
    assert documented == proc.stdout
