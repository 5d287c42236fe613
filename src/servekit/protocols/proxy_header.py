# PROXY protocol versions 1 and 2, as HAProxy's doc/proxy-protocol.txt (revision of
# 2020/03/05) specifies them. Sans-IO: bytes in, a ProxyHeader or NeedData out, or a
# ProxyProtocolError that names what is wrong. Never imports socket, threading, time or
# selectors. Owns every limit on header size: 107 bytes for v1, 16 + 65535 for v2.
#
# Strategy. parse() never consumes: it looks at the start of a buffer (what a server
# peeked with MSG_PEEK, or a whole datagram) and the caller discards header.length
# bytes itself. It reads the buffer as a prefix of a header and stops at the first byte
# that no valid header could have there, so that an HTTP request or a TLS ClientHello
# sent to a PROXY port is rejected after its first byte instead of being left waiting
# (spec section 2.1: "abort the connection as soon as possible"). NeedData is returned
# only while more bytes could still complete a valid header, and carries a lower bound
# on the total length (exact for v2, whose length field says it). Each field is checked
# as soon as it is seen, a v1 field even while it is still growing; a v2 TLV is held to
# the header's declared length (and its type's size rules) as soon as its own 3-byte
# header is there. Only what needs the whole header waits for it: the CRC32C, and the
# sub-TLVs of an SSL TLV.
#
# Decisions where the specification leaves room, each with its reason:
#   * v1 numbers with leading zeros ("010.0.0.1", port "080") are rejected: the spec
#     says "Heading zeroes are not permitted in front of numbers in order to avoid any
#     possible confusion with octal numbers". A lone "0" is a number, not a leading zero.
#   * v1 IPv6 addresses are what inet_pton(3) accepts, without scope ids: groups of one
#     to four hex digits (the spec asks for "sets of 4 hexadecimal digits", but HAProxy
#     itself writes them with inet_ntop, which drops leading zeros), one "::", and a
#     dotted IPv4 tail, which HAProxy sends for an IPv4 client of a dual-stack listener
#     ("::ffff:192.0.2.1").
#   * v1 "UNKNOWN" may be followed by anything up to the CRLF ("the receiver must ignore
#     anything presented before the CRLF is found"), but the first CR or LF of the line
#     must be that CRLF: "The receiver must not tolerate a single CR or LF character to
#     end the line".
#   * v2 address family and transport: only the seven bytes the spec lists under "In
#     practice" (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32); other values "must be
#     rejected as invalid by receivers", and 0x10 or 0x01 would leave the address block
#     without a known size. AF_UNSPEC has an empty address block: what follows is TLVs,
#     as HAProxy sends for its LOCAL health checks.
#   * v2 LOCAL: addresses are never reported ("discard the protocol block including the
#     family which is ignored"). The address block is the family's size, or the whole
#     declared length when that is shorter, since a LOCAL header must be accepted.
#   * v2 TLVs: every TLV is kept raw, in order, unknown types included. Known types are
#     checked where the spec gives a rule: CRC32C is exactly 4 bytes and must match (at
#     most one, since two would leave the zeroed field ambiguous), UNIQUE_ID is "up to
#     128 bytes", SSL sub-TLVs must fill the SSL value exactly. Strings (authority, SSL
#     names, netns, Unix paths) are decoded as UTF-8 with surrogateescape, so no byte is
#     lost and decoding never fails.
#   * v2 total length: 16 + the 16-bit length field, so at most 65551 bytes. HAProxy's
#     own receiver peeks into one buffer (tune.bufsize, 16384 by default), so it cannot
#     take more; parse(max_v2_length=...) lets a server set such a cap, checked as soon as
#     the length field is read.
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from servekit.errors import ServekitError

__all__ = [
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_MAX_CUSTOM",
    "PP2_TYPE_MAX_EXPERIMENT",
    "PP2_TYPE_MAX_FUTURE",
    "PP2_TYPE_MIN_CUSTOM",
    "PP2_TYPE_MIN_EXPERIMENT",
    "PP2_TYPE_MIN_FUTURE",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "UNIQUE_ID_MAX_LENGTH",
    "UNIX_ADDRESS_LENGTH",
    "V1_MAX_LENGTH",
    "V1_MIN_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "Address",
    "Command",
    "NeedData",
    "ProxyHeader",
    "ProxyProtocolError",
    "SSLInfo",
    "Transport",
    "V1Transport",
    "build_ssl_value",
    "build_v1",
    "build_v2",
    "crc32c",
    "parse",
]

Command: TypeAlias = Literal["PROXY", "LOCAL"]
Transport: TypeAlias = Literal[
    "TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM", "UNKNOWN"
]
V1Transport: TypeAlias = Literal["TCP4", "TCP6", "UNKNOWN"]
# (ip, port) for TCP and UDP, a path for Unix sockets, None when not known.
Address: TypeAlias = tuple[str, int] | str | None

# --- Limits and wire constants --------------------------------------------------------

# Spec 2.1, worst case: "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
# is 107 characters including the CRLF; "If the CRLF sequence is not found in the first
# 107 characters, the receiver should declare the line invalid."
V1_MAX_LENGTH: Final = 107
# The shortest line, "PROXY UNKNOWN\r\n".
V1_MIN_LENGTH: Final = 15
# Spec 2.2: twelve bytes chosen to make HTTP, TLS, SMTP, FTP and POP servers fail fast.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version and command, family and transport, 16-bit length.
V2_HEADER_LENGTH: Final = 16
# The length field counts the bytes after the first 16 and has 16 bits.
V2_MAX_LENGTH: Final = V2_HEADER_LENGTH + 0xFFFF

# Spec 2.2, registered TLV types.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30
# Spec 2.2.8, reserved ranges: application-specific, experimental, future.
PP2_TYPE_MIN_CUSTOM: Final = 0xE0
PP2_TYPE_MAX_CUSTOM: Final = 0xEF
PP2_TYPE_MIN_EXPERIMENT: Final = 0xF0
PP2_TYPE_MAX_EXPERIMENT: Final = 0xF7
PP2_TYPE_MIN_FUTURE: Final = 0xF8
PP2_TYPE_MAX_FUTURE: Final = 0xFF
# Spec 2.2.6, bits of the SSL TLV's <client> field.
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

# Spec 2.2.5: "an opaque byte sequence of up to 128 bytes".
UNIQUE_ID_MAX_LENGTH: Final = 128
# Spec 2.2: "The addresses are exactly 108 bytes each" (Linux's sun_path).
UNIX_ADDRESS_LENGTH: Final = 108

_V1_MAGIC: Final = b"PROXY "
# The high nibble of byte 13 is the version, the low nibble the command.
_V2_COMMANDS: Final[dict[int, Command]] = {0x0: "LOCAL", 0x1: "PROXY"}
# Byte 14 -> (transport, size of the address block). Spec 2.2, "In practice".
_V2_FAMILIES: Final[dict[int, tuple[Transport, int]]] = {
    0x00: ("UNKNOWN", 0),
    0x11: ("TCP4", 2 * 4 + 2 * 2),
    0x12: ("UDP4", 2 * 4 + 2 * 2),
    0x21: ("TCP6", 2 * 16 + 2 * 2),
    0x22: ("UDP6", 2 * 16 + 2 * 2),
    0x31: ("UNIX_STREAM", 2 * UNIX_ADDRESS_LENGTH),
    0x32: ("UNIX_DGRAM", 2 * UNIX_ADDRESS_LENGTH),
}
_V2_FAMILY_BYTES: Final[dict[Transport, int]] = {t: b for b, (t, _) in _V2_FAMILIES.items()}
# A TLV is a type byte and a 16-bit length before its value.
_TLV_HEADER_LENGTH: Final = 3
# The SSL TLV's value starts with <client> (1 byte) and <verify> (4 bytes).
_SSL_FIXED_LENGTH: Final = 5

# Errors quote at most this many bytes of what the peer sent: enough to recognise an
# HTTP request or a ClientHello in a log, never a flood.
_QUOTE_LIMIT: Final = 40


class ProxyProtocolError(ServekitError, ValueError):
    """The bytes are not a valid PROXY protocol header, or not yet one that can be.

    The only exception parse() raises for any input. The message names the case, quotes
    the offending bytes and the limit that was broken. The connection should be closed.
    """


@dataclass(frozen=True)
class NeedData:
    """The bytes so far are a valid start of a header; come back with more.

    ``minimum`` is a lower bound on the total buffer length parse() needs before it can
    say more, always greater than the length given. For v2 it is exact once the first
    16 bytes are there.
    """

    minimum: int


@dataclass(frozen=True)
class SSLInfo:
    """The PP2_TYPE_SSL TLV: how the client talked TLS to the proxy (spec 2.2.6).

    ``client`` holds the PP2_CLIENT_* bits, ``verify`` is zero when a presented client
    certificate was verified. The string fields are the first sub-TLV of each
    PP2_SUBTYPE_SSL_* type, decoded as UTF-8 with surrogateescape; ``tlvs`` keeps every
    sub-TLV raw, in order.
    """

    client: int
    verify: int
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def used_ssl(self) -> bool:
        """The client connected over SSL/TLS (PP2_CLIENT_SSL)."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def certificate_verified(self) -> bool:
        """The client presented a certificate (on this connection or its TLS session)
        and it was verified.

        Both conditions are needed: HAProxy leaves ``verify`` at zero when no
        certificate was presented at all.
        """
        presented = self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)
        return bool(presented) and self.verify == 0


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed PROXY protocol header.

    ``source`` and ``destination`` are ``(ip, port)`` for TCP and UDP, with the address
    in its compressed text form (an IPv4-mapped IPv6 address as ``"::ffff:192.0.2.1"``);
    a path for Unix sockets (a Linux abstract address keeps its leading NUL; an unnamed
    socket is ``""``); None for UNKNOWN and for every LOCAL header. ``tlvs`` holds every
    v2 TLV raw, in order. ``length`` is how many bytes the header takes at the start of
    the input: what to discard before the payload.
    """

    version: Literal[1, 2]
    command: Command
    transport: Transport
    source: Address
    destination: Address
    tlvs: tuple[tuple[int, bytes], ...]
    length: int

    def tlv(self, type: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for tlv_type, value in self.tlvs:
            if tlv_type == type:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        """PP2_TYPE_ALPN: the application protocol negotiated with the client, e.g. b"h2"."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """PP2_TYPE_AUTHORITY: the host name the client asked for (TLS SNI), as text."""
        return _decode(self.tlv(PP2_TYPE_AUTHORITY))

    @property
    def unique_id(self) -> bytes | None:
        """PP2_TYPE_UNIQUE_ID: the proxy's opaque identifier of the connection."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """PP2_TYPE_NETNS: the name of the network namespace the connection came from."""
        return _decode(self.tlv(PP2_TYPE_NETNS))

    @property
    def ssl(self) -> SSLInfo | None:
        """PP2_TYPE_SSL, with its sub-TLVs parsed, or None when absent."""
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _parse_ssl(value, "v2 SSL TLV")


# --- Parsing --------------------------------------------------------------------------


def parse(
    data: bytes | bytearray | memoryview,
    *,
    accept_v1: bool = True,
    accept_v2: bool = True,
    max_v2_length: int = V2_MAX_LENGTH,
) -> ProxyHeader | NeedData:
    """Read a PROXY protocol header at the start of ``data``.

    Returns the header (its ``length`` says where the payload starts), or NeedData when
    ``data`` is a valid start of a header that is not complete yet. Raises
    ProxyProtocolError, and nothing else, as soon as ``data`` cannot be the start of a
    header of an accepted version. Bytes after the header are not looked at. For a
    datagram, the whole datagram is the input and NeedData means it was truncated.

    ``max_v2_length`` caps the total size of a v2 header (16 to 65551 bytes).
    Raises ValueError, before looking at ``data``, if both versions are refused or the
    cap is out of range: those are the caller's errors, not the peer's.
    """
    if not (accept_v1 or accept_v2):
        raise ValueError("parse() with accept_v1=False and accept_v2=False accepts nothing")
    if not V2_HEADER_LENGTH <= max_v2_length <= V2_MAX_LENGTH:
        raise ValueError(
            f"max_v2_length={max_v2_length} is outside {V2_HEADER_LENGTH}..{V2_MAX_LENGTH}"
        )
    buf = bytes(data[:V2_MAX_LENGTH])
    size = len(buf)
    looks_v1 = buf[: len(_V1_MAGIC)] == _V1_MAGIC[:size]
    looks_v2 = buf[: len(V2_SIGNATURE)] == V2_SIGNATURE[:size]
    if looks_v1 and accept_v1:
        if size < len(_V1_MAGIC):
            return NeedData(V1_MIN_LENGTH)
        return _parse_v1(buf)
    if looks_v2 and accept_v2:
        if size < len(V2_SIGNATURE):
            return NeedData(V2_HEADER_LENGTH)
        return _parse_v2(buf, max_v2_length)
    if looks_v1:
        raise ProxyProtocolError(f"v1 header refused, only v2 is accepted here: {_quote(buf)}")
    if looks_v2:
        raise ProxyProtocolError(f"v2 header refused, only v1 is accepted here: {_quote(buf)}")
    expected = " or ".join(
        name
        for name, accepted in (("b'PROXY ' (v1)", accept_v1), ("the v2 signature", accept_v2))
        if accepted
    )
    raise ProxyProtocolError(f"not a PROXY protocol header: expected {expected}, got {_quote(buf)}")


# v1 ----------------------------------------------------------------------------------

_IPV4_TEXT: Final = "an IPv4 address (four decimal numbers 0..255 without leading zeros)"
_IPV6_TEXT: Final = "an IPv6 address (hexadecimal groups, one '::' at most, no scope id)"
_PORT_TEXT: Final = "a port (a decimal number 0..65535 without leading zeros)"
_IPV6_CHARS: Final = b"0123456789abcdefABCDEF:."


def _octet(text: bytes) -> bool:
    """One dotted-decimal number: 0..255, no leading zero."""
    return (
        text.isdigit()
        and len(text) <= 3
        and (len(text) == 1 or text[0] != ord("0"))
        and int(text) <= 255
    )


def _ipv4_rest(text: bytes) -> int | None:
    """How many characters ``text`` at least lacks to be an IPv4 address, or None if
    no continuation can make it one."""
    parts = text.split(b".")
    if len(parts) > 4 or not all(_octet(part) for part in parts[:-1]):
        return None
    if parts[-1] and not _octet(parts[-1]):
        return None
    # An empty last part needs a digit; each missing part needs ".0".
    return (0 if parts[-1] else 1) + 2 * (4 - len(parts))


def _ipv6_valid(text: bytes) -> bool:
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def _ipv6_rest(text: bytes) -> int | None:
    """How many characters ``text`` at least lacks to be an IPv6 address, or None.

    The shortest continuation of any prefix that can still become an address is one
    of: nothing, a digit (after a single colon), a colon (making "::"), "::" (after a
    group), or the zeros that finish a dotted IPv4 tail. Trying those and keeping the
    shortest that ipaddress accepts decides exactly, with ipaddress as the judge.
    """
    if not text:
        return 2  # "::"
    if text.translate(None, _IPV6_CHARS):
        return None
    candidates = [b"", b"0", b":", b"::"]
    tail = text.rsplit(b":", 1)[-1]
    if b"." in tail:
        parts = tail.split(b".")
        if len(parts) <= 4:
            candidates.append((b"" if parts[-1] else b"0") + b".0" * (4 - len(parts)))
    lengths = [len(c) for c in candidates if _ipv6_valid(text + c)]
    return min(lengths) if lengths else None


def _port_rest(text: bytes) -> int | None:
    if not text:
        return 1
    valid = (
        text.isdigit()
        and len(text) <= 5
        and (len(text) == 1 or text[0] != ord("0"))
        and int(text) <= 0xFFFF
    )
    return 0 if valid else None


# Per protocol, the four fields after it: (name, checker, shortest text, description).
# A checker returns how many characters a field at least lacks, or None if no
# continuation can make it valid: 0 means complete.
_V1Field: TypeAlias = tuple[str, Callable[[bytes], int | None], int, str]
_V1_FIELDS: Final[dict[bytes, tuple[_V1Field, ...]]] = {
    b"TCP4": (
        ("source address", _ipv4_rest, 7, _IPV4_TEXT),
        ("destination address", _ipv4_rest, 7, _IPV4_TEXT),
        ("source port", _port_rest, 1, _PORT_TEXT),
        ("destination port", _port_rest, 1, _PORT_TEXT),
    ),
    b"TCP6": (
        ("source address", _ipv6_rest, 2, _IPV6_TEXT),
        ("destination address", _ipv6_rest, 2, _IPV6_TEXT),
        ("source port", _port_rest, 1, _PORT_TEXT),
        ("destination port", _port_rest, 1, _PORT_TEXT),
    ),
}
# Length of the shortest complete line of each protocol: "PROXY UNKNOWN\r\n",
# "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", "PROXY TCP6 :: :: 0 0\r\n".
_V1_SHORTEST: Final[dict[bytes, int]] = {
    b"UNKNOWN": V1_MIN_LENGTH,
    **{
        proto: len(_V1_MAGIC) + len(proto) + sum(1 + f[2] for f in fields) + 2
        for proto, fields in _V1_FIELDS.items()
    },
}


def _parse_v1(buf: bytes) -> ProxyHeader | NeedData:
    window = buf[:V1_MAX_LENGTH]
    breaks = [i for i in (window.find(b"\r"), window.find(b"\n")) if i >= 0]
    if not breaks:
        if len(window) > V1_MAX_LENGTH - 2:
            raise ProxyProtocolError(
                f"v1 header has no CRLF within the first {V1_MAX_LENGTH} bytes: {_quote(buf)}"
            )
        _proto, _fields, minimum = _check_v1_line(window, complete=False)
        return NeedData(minimum)
    end = min(breaks)
    if window[end] == ord("\n"):
        raise ProxyProtocolError(
            f"v1 header has a bare LF at byte {end}; the line must end with CRLF: "
            f"{_quote(buf[: end + 1])}"
        )
    if end > V1_MAX_LENGTH - 2:
        raise ProxyProtocolError(
            f"v1 header has no CRLF within the first {V1_MAX_LENGTH} bytes: {_quote(buf)}"
        )
    if end + 1 < len(buf) and buf[end + 1] != ord("\n"):
        raise ProxyProtocolError(
            f"v1 header has a CR not followed by LF at byte {end}; the line must end with "
            f"CRLF: {_quote(buf[: end + 2])}"
        )
    proto, fields, _minimum = _check_v1_line(window[:end], complete=True)
    if end + 1 == len(buf):
        return NeedData(end + 2)
    if proto == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), end + 2)
    transport: V1Transport = "TCP4" if proto == b"TCP4" else "TCP6"
    source_ip, destination_ip, source_port, destination_port = fields
    return ProxyHeader(
        1,
        "PROXY",
        transport,
        (_v1_ip(source_ip), int(source_port)),
        (_v1_ip(destination_ip), int(destination_port)),
        (),
        end + 2,
    )


def _check_v1_line(content: bytes, *, complete: bool) -> tuple[bytes, list[bytes], int]:
    """Check a v1 line without its CRLF, or the start of one when not ``complete``.

    Returns the protocol, the fields after it and a lower bound on the length of the
    whole line including CRLF; raises at the first field no line could have.
    """
    rest = content[len(_V1_MAGIC) :]
    proto, space, tail = rest.partition(b" ")
    if not space and not complete:
        shortest = [n for p, n in _V1_SHORTEST.items() if p.startswith(proto)]
        if not shortest:
            raise _bad_v1_protocol(proto)
        return proto, [], max(min(shortest), len(content) + 2)
    if proto not in _V1_SHORTEST:
        raise _bad_v1_protocol(proto)
    if proto == b"UNKNOWN":
        # Spec 2.1: "the receiver must ignore anything presented before the CRLF".
        return proto, [], len(content) + 2
    name = proto.decode("ascii")
    specs = _V1_FIELDS[proto]
    fields = tail.split(b" ") if space else []
    minimum = len(content) + 2
    for index, field in enumerate(fields):
        partial = not complete and index == len(fields) - 1
        if index == len(specs):
            raise ProxyProtocolError(
                f"v1 {name} header has more than {len(specs)} fields after the protocol; "
                f"fields are separated by exactly one space: {_quote(content)}"
            )
        label, checker, _shortest, description = specs[index]
        if not field and not partial:
            raise ProxyProtocolError(
                f"v1 {name} header has an empty {label}; fields are separated by exactly "
                f"one space: {_quote(content)}"
            )
        lacking = checker(field)
        if lacking is None or (lacking and not partial):
            raise ProxyProtocolError(f"v1 {name} {label} {_quote(field)} is not {description}")
        if partial:
            minimum += lacking
    if complete and len(fields) < len(specs):
        raise ProxyProtocolError(
            f"v1 {name} header has {len(fields)} fields after the protocol, expected "
            f"{len(specs)} (source and destination address, source and destination "
            f"port): {_quote(content)}"
        )
    minimum += sum(1 + spec[2] for spec in specs[len(fields) :])
    if minimum > V1_MAX_LENGTH:
        raise ProxyProtocolError(
            f"v1 {name} header cannot end within {V1_MAX_LENGTH} bytes: the shortest "
            f"completion of {_quote(content)} is {minimum} bytes"
        )
    return proto, fields, minimum


def _bad_v1_protocol(proto: bytes) -> ProxyProtocolError:
    return ProxyProtocolError(
        f"v1 protocol {_quote(proto)} is not TCP4, TCP6 or UNKNOWN "
        "(followed by one space, or CRLF after UNKNOWN)"
    )


def _v1_ip(text: bytes) -> str:
    address = ipaddress.ip_address(text.decode("ascii"))
    if isinstance(address, ipaddress.IPv6Address):
        return _ipv6_text(address)
    return str(address)


def _ipv6_text(address: ipaddress.IPv6Address) -> str:
    # RFC 5952 section 5 and inet_ntop(3) write an IPv4-mapped address with a dotted
    # tail; ipaddress only does so from Python 3.13 on, so spell it out.
    mapped = address.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else address.compressed


# v2 ----------------------------------------------------------------------------------


def _parse_v2(buf: bytes, max_length: int) -> ProxyHeader | NeedData:
    size = len(buf)
    if size <= 12:
        return NeedData(V2_HEADER_LENGTH)
    version, command_nibble = buf[12] >> 4, buf[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(
            f"v2 version is {version} (byte 13 is 0x{buf[12]:02x}); the only version is 2"
        )
    command = _V2_COMMANDS.get(command_nibble)
    if command is None:
        raise ProxyProtocolError(
            f"v2 command is 0x{command_nibble:x} (byte 13 is 0x{buf[12]:02x}); only "
            "LOCAL (0x0) and PROXY (0x1) are defined"
        )
    if size <= 13:
        return NeedData(V2_HEADER_LENGTH)
    family = _V2_FAMILIES.get(buf[13])
    if family is None:
        raise ProxyProtocolError(
            f"v2 family and transport byte is 0x{buf[13]:02x}; the specification defines "
            "0x00, 0x11, 0x12, 0x21, 0x22, 0x31 and 0x32 only"
        )
    if size < V2_HEADER_LENGTH:
        return NeedData(V2_HEADER_LENGTH)
    declared = int.from_bytes(buf[14:16], "big")
    total = V2_HEADER_LENGTH + declared
    if total > max_length:
        raise ProxyProtocolError(
            f"v2 header declares {total} bytes (16 + {declared}), more than the limit of "
            f"{max_length}"
        )
    transport, address_length = family
    if command == "LOCAL":
        address_length = min(address_length, declared)
    elif declared < address_length:
        raise ProxyProtocolError(
            f"v2 {transport} header declares {declared} bytes after the first 16, fewer "
            f"than its {address_length}-byte address block"
        )
    tlvs, crc_at = _v2_tlvs(buf, V2_HEADER_LENGTH + address_length, total)
    if size < total:
        return NeedData(total)
    if crc_at is not None:
        _check_crc(buf[:total], crc_at)
    if command == "LOCAL" or transport == "UNKNOWN":
        return ProxyHeader(2, command, "UNKNOWN", None, None, tuple(tlvs), total)
    block = buf[V2_HEADER_LENGTH : V2_HEADER_LENGTH + address_length]
    source: Address
    destination: Address
    if transport in ("UNIX_STREAM", "UNIX_DGRAM"):
        source = _unix_path(block[:UNIX_ADDRESS_LENGTH])
        destination = _unix_path(block[UNIX_ADDRESS_LENGTH:])
    else:
        width = 4 if transport in ("TCP4", "UDP4") else 16
        source_port, destination_port = struct.unpack("!HH", block[2 * width :])
        source = (_packed_ip(block[:width]), source_port)
        destination = (_packed_ip(block[width : 2 * width]), destination_port)
    return ProxyHeader(2, command, transport, source, destination, tuple(tlvs), total)


def _v2_tlvs(buf: bytes, start: int, end: int) -> tuple[list[tuple[int, bytes]], int | None]:
    """Walk the TLVs between ``start`` and ``end`` as far as ``buf`` goes.

    Returns the complete TLVs and the offset of the CRC32C TLV if one was seen. Raises
    as soon as a TLV's own header shows it cannot fit the declared length, without
    waiting for its value.
    """
    tlvs: list[tuple[int, bytes]] = []
    crc_at: int | None = None
    offset = start
    while offset < end:
        if end - offset < _TLV_HEADER_LENGTH:
            raise ProxyProtocolError(
                f"v2 header has {end - offset} stray bytes at offset {offset} after its "
                f"last TLV; a TLV needs at least {_TLV_HEADER_LENGTH}"
            )
        if offset + _TLV_HEADER_LENGTH > len(buf):
            break
        tlv_type = buf[offset]
        length = int.from_bytes(buf[offset + 1 : offset + 3], "big")
        value_at = offset + _TLV_HEADER_LENGTH
        if value_at + length > end:
            raise ProxyProtocolError(
                f"v2 TLV 0x{tlv_type:02x} at offset {offset} declares {length} bytes, but "
                f"only {end - value_at} remain in the header"
            )
        if tlv_type == PP2_TYPE_CRC32C:
            if length != 4:
                raise ProxyProtocolError(
                    f"v2 CRC32C TLV at offset {offset} is {length} bytes long; it must be 4"
                )
            if crc_at is not None:
                raise ProxyProtocolError(
                    f"v2 header has a second CRC32C TLV at offset {offset}; the first is at "
                    f"offset {crc_at} and at most one is allowed"
                )
            crc_at = offset
        if tlv_type == PP2_TYPE_UNIQUE_ID and length > UNIQUE_ID_MAX_LENGTH:
            raise ProxyProtocolError(
                f"v2 UNIQUE_ID TLV at offset {offset} is {length} bytes long, more than the "
                f"maximum of {UNIQUE_ID_MAX_LENGTH}"
            )
        if tlv_type == PP2_TYPE_SSL and length < _SSL_FIXED_LENGTH:
            raise ProxyProtocolError(
                f"v2 SSL TLV at offset {offset} is {length} bytes long, shorter than its "
                f"{_SSL_FIXED_LENGTH}-byte client and verify fields"
            )
        if value_at + length > len(buf):
            break
        value = buf[value_at : value_at + length]
        if tlv_type == PP2_TYPE_SSL:
            _parse_ssl(value, f"v2 SSL TLV at offset {offset}")
        tlvs.append((tlv_type, value))
        offset = value_at + length
    return tlvs, crc_at


def _parse_ssl(value: bytes, where: str) -> SSLInfo:
    if len(value) < _SSL_FIXED_LENGTH:
        raise ProxyProtocolError(
            f"{where} is {len(value)} bytes long, shorter than its {_SSL_FIXED_LENGTH}-byte "
            f"client and verify fields: {_quote(value)}"
        )
    subs: list[tuple[int, bytes]] = []
    offset = _SSL_FIXED_LENGTH
    while offset < len(value):
        if len(value) - offset < _TLV_HEADER_LENGTH:
            raise ProxyProtocolError(
                f"{where} has {len(value) - offset} stray bytes at offset {offset} of its "
                f"value; a sub-TLV needs at least {_TLV_HEADER_LENGTH}"
            )
        sub_type = value[offset]
        length = int.from_bytes(value[offset + 1 : offset + 3], "big")
        value_at = offset + _TLV_HEADER_LENGTH
        if value_at + length > len(value):
            raise ProxyProtocolError(
                f"{where} has a sub-TLV 0x{sub_type:02x} at offset {offset} of its value "
                f"that declares {length} bytes, but only {len(value) - value_at} remain"
            )
        subs.append((sub_type, value[value_at : value_at + length]))
        offset = value_at + length
    names: dict[int, str] = {}
    for sub_type, sub_value in subs:
        names.setdefault(sub_type, sub_value.decode("utf-8", "surrogateescape"))
    return SSLInfo(
        client=value[0],
        verify=int.from_bytes(value[1:5], "big"),
        version=names.get(PP2_SUBTYPE_SSL_VERSION),
        cn=names.get(PP2_SUBTYPE_SSL_CN),
        cipher=names.get(PP2_SUBTYPE_SSL_CIPHER),
        sig_alg=names.get(PP2_SUBTYPE_SSL_SIG_ALG),
        key_alg=names.get(PP2_SUBTYPE_SSL_KEY_ALG),
        tlvs=tuple(subs),
    )


def _check_crc(header: bytes, crc_at: int) -> None:
    # Spec 2.2.3: store the checksum aside, zero its 32 bits, checksum the whole header.
    field = slice(crc_at + _TLV_HEADER_LENGTH, crc_at + _TLV_HEADER_LENGTH + 4)
    stated = int.from_bytes(header[field], "big")
    computed = crc32c(header[: field.start] + b"\0\0\0\0" + header[field.stop :])
    if computed != stated:
        raise ProxyProtocolError(
            f"v2 CRC32C mismatch: the header states 0x{stated:08x}, its {len(header)} bytes "
            f"sum to 0x{computed:08x}"
        )


def _packed_ip(packed: bytes) -> str:
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed))
    return _ipv6_text(ipaddress.IPv6Address(packed))


def _unix_path(raw: bytes) -> str:
    # A path ends at its first NUL. A Linux abstract address starts with a NUL and may
    # hold more; only its trailing padding can be told apart and stripped.
    name = raw.rstrip(b"\0") if raw[:1] == b"\0" else raw.split(b"\0", 1)[0]
    return name.decode("utf-8", "surrogateescape")


# --- CRC-32C --------------------------------------------------------------------------

# CRC-32C (Castagnoli), as in RFC 4960 appendix B, which spec 2.2.3 names: reflected
# polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF. zlib.crc32 is the
# IEEE polynomial, a different checksum, and the stdlib has no other.
_CRC32C_POLYNOMIAL: Final = 0x82F63B78


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLYNOMIAL if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray) -> int:
    """The CRC-32C (Castagnoli) checksum of ``data``: crc32c(b"123456789") == 0xE3069283."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- Building -------------------------------------------------------------------------


def build_v1(
    transport: V1Transport,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
) -> bytes:
    """The v1 line HAProxy would send for these endpoints, CRLF included.

    TCP4 takes IPv4 addresses. TCP6 takes IPv6 addresses, and IPv4 ones too, written
    IPv4-mapped ("::ffff:192.0.2.1") as HAProxy does when the two families differ.
    UNKNOWN takes no addresses and gives the short form, "PROXY UNKNOWN\\r\\n".
    Raises ValueError for anything parse() would not read back.
    """
    if transport == "UNKNOWN":
        if source is not None or destination is not None:
            raise ValueError("a v1 UNKNOWN header carries no addresses; pass None for both")
        return b"PROXY UNKNOWN\r\n"
    if transport not in ("TCP4", "TCP6"):
        raise ValueError(f"v1 transport {transport!r} is not TCP4, TCP6 or UNKNOWN")
    parts = ["PROXY", transport]
    ports = []
    for role, endpoint in (("source", source), ("destination", destination)):
        address, port = _inet_endpoint(transport, role, endpoint)
        parts.append(_ipv6_text(address) if address.version == 6 else str(address))
        ports.append(str(port))
    line = " ".join(parts + ports).encode("ascii") + b"\r\n"
    # Cannot trigger with valid addresses (39 + 39 characters at most): kept as the
    # guarantee that parse() reads back what we build.
    if len(line) > V1_MAX_LENGTH:  # pragma: no cover
        raise ValueError(f"v1 line of {len(line)} bytes exceeds {V1_MAX_LENGTH}")
    return line


def build_v2(
    command: Command,
    transport: Transport,
    source: Address = None,
    destination: Address = None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    *,
    crc32c: bool = False,
) -> bytes:
    """A v2 header as HAProxy would send it.

    LOCAL takes transport "UNKNOWN" and no addresses (AF_UNSPEC, as HAProxy sends its
    health checks); PROXY with "UNKNOWN" also has an empty address block. TCP and UDP
    take ``(ip, port)`` pairs (IPv4 written IPv4-mapped for TCP6/UDP6); Unix transports
    take paths of at most 108 bytes once encoded as UTF-8 with surrogateescape (a
    leading NUL makes a Linux abstract address). ``tlvs`` are written in order after a
    CRC32C TLV, which ``crc32c=True`` adds first and fills in, as HAProxy does. Raises
    ValueError for anything parse() would not read back.
    """
    if command not in _V2_COMMANDS.values():
        raise ValueError(f"v2 command {command!r} is not PROXY or LOCAL")
    if transport not in _V2_FAMILY_BYTES:
        raise ValueError(f"v2 transport {transport!r} is not one of {', '.join(_V2_FAMILY_BYTES)}")
    if command == "LOCAL" and transport != "UNKNOWN":
        raise ValueError(f"a v2 LOCAL header has transport UNKNOWN, not {transport!r}")
    if transport == "UNKNOWN":
        if source is not None or destination is not None:
            raise ValueError(f"a v2 {command} UNKNOWN header carries no addresses")
        block = b""
    elif transport in ("UNIX_STREAM", "UNIX_DGRAM"):
        block = _unix_block("source", source) + _unix_block("destination", destination)
    else:
        source_ip, source_port = _inet_endpoint(transport, "source", source)
        destination_ip, destination_port = _inet_endpoint(transport, "destination", destination)
        block = (
            source_ip.packed
            + destination_ip.packed
            + struct.pack("!HH", source_port, destination_port)
        )
    body = bytearray(block)
    crc_at = 0
    if crc32c:
        crc_at = V2_HEADER_LENGTH + len(body)
        body += bytes((PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0))
    for tlv_type, value in tlvs:
        body += _checked_tlv(tlv_type, value)
    if len(body) > 0xFFFF:
        raise ValueError(
            f"v2 header needs {len(body)} bytes after the first 16, more than the 16-bit "
            f"length field holds ({0xFFFF})"
        )
    header = bytearray(V2_SIGNATURE)
    header += bytes((0x20 | (1 if command == "PROXY" else 0), _V2_FAMILY_BYTES[transport]))
    header += struct.pack("!H", len(body)) + body
    if crc32c:
        field = crc_at + _TLV_HEADER_LENGTH
        header[field : field + 4] = struct.pack("!I", _crc32c(header))
    return bytes(header)


def build_ssl_value(client: int, verify: int, tlvs: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """The value of a PP2_TYPE_SSL TLV: <client> bits, <verify>, then sub-TLVs in order
    (PP2_SUBTYPE_SSL_VERSION, _CN, _CIPHER, _SIG_ALG, _KEY_ALG, ...)."""
    if not 0 <= client <= 0xFF:
        raise ValueError(f"SSL client bits {client} do not fit one byte (0..255)")
    if not 0 <= verify <= 0xFFFFFFFF:
        raise ValueError(f"SSL verify result {verify} does not fit 32 bits")
    value = bytearray(struct.pack("!BI", client, verify))
    for sub_type, sub_value in tlvs:
        value += _tlv_bytes(sub_type, sub_value)
    return bytes(value)


_crc32c = crc32c  # build_v2's keyword argument shadows the function's name.


def _tlv_bytes(tlv_type: int, value: bytes) -> bytes:
    """A TLV, or an SSL sub-TLV: type byte, 16-bit length, value."""
    value = bytes(value)
    if not 0 <= tlv_type <= 0xFF:
        raise ValueError(f"TLV type {tlv_type} does not fit one byte (0..255)")
    if len(value) > 0xFFFF:
        raise ValueError(
            f"TLV 0x{tlv_type:02x} value is {len(value)} bytes, more than its 16-bit "
            f"length holds ({0xFFFF})"
        )
    return struct.pack("!BH", tlv_type, len(value)) + value


def _checked_tlv(tlv_type: int, value: bytes) -> bytes:
    """A header-level TLV, held to the rules parse() applies to its known types."""
    if tlv_type == PP2_TYPE_CRC32C:
        raise ValueError("pass crc32c=True rather than a CRC32C TLV: its value is computed")
    if tlv_type == PP2_TYPE_UNIQUE_ID and len(value) > UNIQUE_ID_MAX_LENGTH:
        raise ValueError(
            f"UNIQUE_ID TLV is {len(value)} bytes, more than the maximum of {UNIQUE_ID_MAX_LENGTH}"
        )
    if tlv_type == PP2_TYPE_SSL:
        try:
            _parse_ssl(bytes(value), "SSL TLV")
        except ProxyProtocolError as error:
            raise ValueError(str(error)) from None
    return _tlv_bytes(tlv_type, value)


def _inet_endpoint(
    transport: str, role: str, endpoint: object
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    if not (isinstance(endpoint, tuple) and len(endpoint) == 2):
        raise ValueError(f"{transport} {role} must be an (ip, port) pair, not {endpoint!r}")
    host, port = endpoint
    try:
        if not isinstance(host, str):
            raise ValueError
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{transport} {role} address {host!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(
            f"{transport} {role} address {host!r} has a scope id, which cannot be sent"
        )
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{transport} {role} port {port!r} is not an integer in 0..65535")
    if transport.endswith("4"):
        if not isinstance(address, ipaddress.IPv4Address):
            raise ValueError(f"{transport} {role} address {host!r} is not IPv4")
        return address, port
    if isinstance(address, ipaddress.IPv4Address):
        # HAProxy's v4tov6(): an IPv4 endpoint beside an IPv6 one is sent IPv4-mapped.
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed), port
    return address, port


def _unix_block(role: str, path: object) -> bytes:
    if not isinstance(path, str):
        raise ValueError(f"Unix {role} must be a path (str), not {path!r}")
    try:
        raw = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"Unix {role} path {path!r} cannot be encoded as UTF-8") from None
    if len(raw) > UNIX_ADDRESS_LENGTH:
        raise ValueError(
            f"Unix {role} path {path!r} is {len(raw)} bytes, more than {UNIX_ADDRESS_LENGTH}"
        )
    if raw[:1] == b"\0":
        if raw.endswith(b"\0"):
            raise ValueError(
                f"Unix {role} abstract address {path!r} ends with NUL, which cannot be told "
                "apart from padding"
            )
    elif b"\0" in raw:
        raise ValueError(f"Unix {role} path {path!r} holds a NUL, which would end it")
    return raw.ljust(UNIX_ADDRESS_LENGTH, b"\0")


# --- Helpers --------------------------------------------------------------------------


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogateescape")


def _quote(data: bytes) -> str:
    shown = repr(bytes(data[:_QUOTE_LIMIT]))
    return shown + ("..." if len(data) > _QUOTE_LIMIT else "")
