# Listening addresses written as strings, as users type them on a command line or in a
# config file. Pure parsing: no sockets are created here, so every address of a server
# can be checked, and every mistake reported, before anything binds.
#
#   HOST:PORT, tcp://HOST:PORT       TCP; HOST may be a name, an IPv4 or [IPv6] literal
#   :PORT                            TCP on all IPv4 interfaces
#   [::]:PORT                        TCP on all IPv6 interfaces (and IPv4 where the OS
#                                    allows dual-stack, as Linux does by default)
#   udp://HOST:PORT                  UDP
#   unix:/path, unix:@name           Unix stream socket; @ is the abstract namespace
#   unix-dgram:/path                 Unix datagram socket
#   fd://N, fd://NAME                an inherited socket: a descriptor number, or a
#                                    name from systemd's LISTEN_FDNAMES
from __future__ import annotations

import dataclasses
import ipaddress
import re

from servekit.errors import ServekitError

__all__ = ["Address", "AddressError", "format_peer", "parse_address", "parse_addresses"]

# Linux's sockaddr_un.sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

_SCHEMES = ("tcp", "udp", "unix", "unix-dgram", "fd")


class AddressError(ServekitError, ValueError):
    """An address string cannot be understood."""


@dataclasses.dataclass(frozen=True)
class Address:
    """One parsed listening address."""

    kind: str  # "tcp", "udp", "unix", "unix-dgram" or "fd"
    host: str = ""
    port: int = 0
    path: str = ""  # Unix: a filesystem path, or "\0name" for the abstract namespace
    fd: int | None = None
    fd_name: str = ""
    text: str = ""  # as the user wrote it, for messages

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_abstract(self) -> bool:
        return self.path.startswith("\0")

    @property
    def stream(self) -> bool:
        return self.kind in ("tcp", "unix")

    def sockaddr(self) -> tuple[str, int] | str:
        """What socket.bind() takes for this address (not for kind "fd")."""
        if self.kind in ("tcp", "udp"):
            return (self.host, self.port)
        return self.path

    def __str__(self) -> str:
        if self.kind in ("tcp", "udp"):
            host = f"[{self.host}]" if self.is_ipv6 else (self.host or "0.0.0.0")
            return f"{self.kind}://{host}:{self.port}"
        if self.kind == "fd":
            return f"fd://{self.fd_name or self.fd}"
        shown = "@" + self.path[1:] if self.is_abstract else self.path
        return f"{self.kind}:{shown}"


def parse_address(text: str) -> Address:
    """Parse one address; raise AddressError naming the problem and quoting the text."""
    original = text
    text = text.strip()
    if not text:
        raise AddressError("empty address")
    scheme = "tcp"
    match = re.match(r"^([a-z][a-z0-9-]*):(//)?", text)
    if match and match.group(1) in _SCHEMES:
        scheme = match.group(1)
        text = text[match.end() :]
    elif match and match.group(2):
        raise AddressError(
            f"unknown scheme {match.group(1)!r} in {original!r}; expected one of "
            + ", ".join(_SCHEMES)
        )
    if scheme in ("unix", "unix-dgram"):
        return _parse_unix(scheme, text, original)
    if scheme == "fd":
        return _parse_fd(text, original)
    host, port = _split_host_port(text, original)
    return Address(scheme, host=host, port=port, text=original)


def parse_addresses(texts: list[str] | tuple[str, ...]) -> list[Address]:
    """Parse several addresses, reporting every bad one at once, and refuse duplicates."""
    parsed, problems = [], []
    for text in texts:
        try:
            parsed.append(parse_address(text))
        except AddressError as exc:
            problems.append(str(exc))
    if problems:
        raise AddressError("; ".join(problems))
    seen: dict[tuple[object, ...], str] = {}
    for address in parsed:
        key = (address.kind, address.host, address.port, address.path, address.fd, address.fd_name)
        if address.kind in ("tcp", "udp") and address.port == 0:
            continue  # each port 0 is a different port
        if key in seen:
            raise AddressError(f"{address.text!r} is listed twice (also as {seen[key]!r})")
        seen[key] = address.text
    return parsed


def _split_host_port(text: str, original: str) -> tuple[str, int]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"missing ']' after the IPv6 address in {original!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"{host!r} is not an IPv6 address in {original!r}") from None
        if not rest.startswith(":"):
            raise AddressError(f"missing ':PORT' after [{host}] in {original!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise AddressError(f"missing ':PORT' in {original!r} (write HOST:PORT)")
        if ":" in host:
            raise AddressError(f"write IPv6 addresses in brackets: [{host}]:{port_text}")
    if not port_text.isdigit():
        raise AddressError(f"port {port_text!r} is not a number in {original!r}")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"port {port} is out of range 0..65535 in {original!r}")
    return host, port


def _parse_unix(scheme: str, text: str, original: str) -> Address:
    if not text:
        raise AddressError(f"missing path in {original!r} (write unix:/path or unix:@name)")
    path = "\0" + text[1:] if text.startswith("@") else text
    if len(path.encode()) > UNIX_PATH_MAX:
        raise AddressError(
            f"Unix socket path is {len(path.encode())} bytes, longer than the "
            f"{UNIX_PATH_MAX} the kernel allows, in {original!r}"
        )
    if path == "\0":
        raise AddressError(f"empty abstract socket name in {original!r}")
    return Address(scheme, path=path, text=original)


def _parse_fd(text: str, original: str) -> Address:
    if not text:
        raise AddressError(f"missing descriptor in {original!r} (write fd://3 or fd://NAME)")
    if text.isdigit():
        fd = int(text)
        if fd < 3:
            raise AddressError(f"descriptor {fd} is stdin/stdout/stderr in {original!r}")
        return Address("fd", fd=fd, text=original)
    # systemd: FileDescriptorName= is ASCII without control characters or ":" (the
    # separator of LISTEN_FDNAMES), at most 255 characters.
    if not re.fullmatch(r"[A-Za-z0-9_.@+-]{1,255}", text):
        raise AddressError(f"{text!r} is not a descriptor number or name in {original!r}")
    return Address("fd", fd_name=text, text=original)


def format_peer(address: object) -> str:
    """A client's address for a log line: host:port, [v6]:port, a Unix path, or a name
    for a peer that has none (an unbound Unix client)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(address, (str, bytes)) and address:
        return repr(address)
    return "an unnamed Unix peer"
