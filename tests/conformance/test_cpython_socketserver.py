"""CPython's own test_socketserver, from every interpreter installed here, run against servekit."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import servekit

pytestmark = pytest.mark.conformance

RUNNER = Path(__file__).with_name("run_cpython_socketserver.py")
SRC = Path(servekit.__file__).resolve().parent.parent
# The versions the project promises (README, pyproject classifiers).
REQUIRED = ("3.11", "3.12", "3.13")


def _pyenv_root() -> str:
    root = os.environ.get("PYENV_ROOT")
    if root:
        return root
    try:
        return subprocess.run(
            ["pyenv", "root"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.path.expanduser("~/.pyenv")


def _interpreter(minor: str) -> str | None:
    """The newest patch release of a minor version: pyenv's, else the running one."""
    candidates = glob.glob(os.path.join(_pyenv_root(), "versions", f"{minor}.*", "bin", "python"))

    def patch(path: str) -> int:
        match = re.search(rf"{re.escape(minor)}\.(\d+)/", path)
        return int(match.group(1)) if match else -1

    candidates = [c for c in candidates if patch(c) >= 0]
    if candidates:
        return max(candidates, key=patch)
    if f"{sys.version_info.major}.{sys.version_info.minor}" == minor:
        return sys.executable
    return None


def _run(minor: str, runner: Path, timeout: float) -> tuple[dict[str, object], int, str]:
    """Run a conformance runner on Python minor: its summary, exit status and stderr."""
    python = _interpreter(minor)
    if python is None:
        if os.environ.get("CI"):
            pytest.fail(f"Python {minor} is required in CI but is not installed")
        pytest.skip(f"Python {minor} is not installed here")
    proc = subprocess.run(
        [python, str(runner)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SERVEKIT_SRC": str(SRC)},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CONFORMANCE ")]
    assert lines, f"no summary; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    summary: dict[str, object] = json.loads(lines[-1].removeprefix("CONFORMANCE "))
    assert str(summary["python"]).startswith(minor + ".")
    return summary, proc.returncode, proc.stderr[-4000:]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("minor", REQUIRED)
def test_cpython_test_socketserver_passes(minor: str) -> None:
    """Every test of the interpreter's own test_socketserver passes on servekit, none skipped."""
    summary, returncode, stderr = _run(minor, RUNNER, 170)
    assert Path(str(summary["servekit"])).resolve().parent == SRC / "servekit"
    assert summary["servers_constructed"] > 0
    assert summary["skipped"] == []
    assert (summary["failures"], summary["errors"]) == (0, 0), stderr
    assert summary["run"] >= 27
    assert returncode == 0


STDLIB_SERVERS_RUNNER = Path(__file__).with_name("run_cpython_stdlib_servers.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("minor", REQUIRED)
def test_cpython_http_xmlrpc_wsgiref_suites_pass_through_install(minor: str) -> None:
    """The interpreter's own test_httpservers, test_xmlrpc and test_wsgiref pass with servekit installed under them."""
    summary, returncode, stderr = _run(minor, STDLIB_SERVERS_RUNNER, 290)
    assert summary["servers_constructed"] > 0
    assert (summary["failures"], summary["errors"]) == ([], []), stderr
    assert summary["run"] >= 150
    assert returncode == 0
