"""Suite-wide fixtures (TLS certificates, a log watcher) and checks (no zombie child)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.tls_certs import tls_certs, tls_log

__all__ = ["tls_certs", "tls_log"]  # fixtures, made available to every test module

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the test extra
    psutil = None


@pytest.fixture(autouse=True)
def _no_zombies() -> Iterator[None]:
    """Every child process a test started has been reaped when it ends."""
    yield
    if psutil is None:
        return
    zombies = [
        child.pid
        for child in psutil.Process().children(recursive=True)
        if child.status() == psutil.STATUS_ZOMBIE
    ]
    assert not zombies, f"zombie child processes left by this test: {zombies}"
