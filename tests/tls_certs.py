"""Fixtures for the TLS tests: throwaway certificates, and a watcher for servekit.features.tls logs.

The certificates are made once per session with the openssl command. A test CA signs two
server certificates (for reload) and a client certificate; a second, untrusted CA signs a
"stranger" client certificate. Keys are ECDSA P-256: generating one takes about a
millisecond where RSA-2048 takes tens, so the whole set costs well under a second.
Nothing here needs the cryptography package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["CertSet", "KeyPair", "LogWatcher", "tls_certs", "tls_log"]

# Bounds one openssl invocation; each takes milliseconds, so this only catches a hang.
OPENSSL_TIMEOUT = 30.0

# A config of our own, so the system's openssl.cnf (and any default extensions it
# adds) cannot change what is generated. The extensions are what Python 3.13's
# VERIFY_X509_STRICT default insists on: a critical basicConstraints on the CA, key
# identifiers on every certificate.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = placeholder

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclasses.dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class CertSet:
    """Paths of the generated files; read-only, shared by every test of the session."""

    directory: Path
    ca: Path
    server: KeyPair  # CN=server-1
    server2: KeyPair  # CN=server-2, same CA and names: what a rotation installs
    client: KeyPair  # CN=client-1, signed by the test CA
    stranger: KeyPair  # CN=stranger, signed by a CA the server does not trust

    def client_context(self, identity: KeyPair | None = None) -> ssl.SSLContext:
        """A client context that trusts the test CA and presents identity if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if identity is not None:
            context.load_cert_chain(str(identity.cert), str(identity.key))
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=OPENSSL_TIMEOUT,
    )


def _new_key_args(key: Path) -> list[str | Path]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]


def _make_ca(directory: Path, cnf: Path, name: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-new", "-config", cnf, "-extensions", "ca",
        *_new_key_args(pair.key), "-subj", f"/CN=servekit {name}", "-days", "2",
        "-out", pair.cert, cwd=directory,
    )  # fmt: skip
    return pair


def _make_leaf(
    directory: Path, cnf: Path, ca: KeyPair, name: str, *, kind: str, serial: int
) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    _openssl(
        "req", "-new", "-config", cnf, *_new_key_args(pair.key), "-subj", f"/CN={name}",
        "-out", csr, cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
        "-set_serial", str(serial), "-days", "2", "-extfile", cnf, "-extensions", kind,
        "-out", pair.cert, cwd=directory,
    )  # fmt: skip
    return pair


def make_cert_set(directory: Path) -> CertSet:
    """Generate the whole set in directory (which must exist)."""
    cnf = directory / "openssl.cnf"
    cnf.write_text(OPENSSL_CNF)
    ca = _make_ca(directory, cnf, "ca")
    other_ca = _make_ca(directory, cnf, "other-ca")
    return CertSet(
        directory=directory,
        ca=ca.cert,
        server=_make_leaf(directory, cnf, ca, "server-1", kind="server", serial=1001),
        server2=_make_leaf(directory, cnf, ca, "server-2", kind="server", serial=1002),
        client=_make_leaf(directory, cnf, ca, "client-1", kind="client", serial=1003),
        stranger=_make_leaf(directory, cnf, other_ca, "stranger", kind="client", serial=2001),
    )


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertSet]:
    """A CA, two server certificates, a client certificate and an untrusted one."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to generate the test certificates")
    yield make_cert_set(tmp_path_factory.mktemp("tls-certs"))


class LogWatcher(logging.Handler):
    """Collects log records from any thread and lets a test wait for one, bounded."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def messages(self) -> list[str]:
        with self._changed:
            return [record.getMessage() for record in self.records]

    def wait_for(self, text: str, timeout: float = 5.0) -> logging.LogRecord:
        """The first record whose message contains text; AssertionError after timeout."""

        def find() -> logging.LogRecord | None:
            return next((r for r in self.records if text in r.getMessage()), None)

        with self._changed:
            found = self._changed.wait_for(find, timeout)
        if found is None:
            raise AssertionError(
                f"no log message containing {text!r} in {timeout}s: {self.messages()}"
            )
        return found


@contextlib.contextmanager
def watching_log(name: str, level: int) -> Iterator[LogWatcher]:
    """A LogWatcher on logger name at level for the duration of a with block."""
    logger = logging.getLogger(name)
    watcher = LogWatcher()
    previous = logger.level
    logger.addHandler(watcher)
    logger.setLevel(level)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(previous)


@pytest.fixture
def tls_log() -> Iterator[LogWatcher]:
    """Everything logged to servekit.features.tls (INFO and up) during the test."""
    with watching_log("servekit.tls", logging.INFO) as watcher:
        yield watcher
