"""The PROXY protocol v1/v2 parser and builders: servekit.protocols.proxy_header.

A corpus of raw inputs beside expected results (tests/unit/data/proxy, with captures of
HAProxy 2.6.12), targeted specifications, and property-based tests.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from servekit.protocols import proxy_header as proxy
from servekit.protocols.proxy_header import (
    PP2_CLIENT_CERT_CONN,
    PP2_CLIENT_CERT_SESS,
    PP2_CLIENT_SSL,
    PP2_SUBTYPE_SSL_CIPHER,
    PP2_SUBTYPE_SSL_CN,
    PP2_SUBTYPE_SSL_VERSION,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NETNS,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_HEADER_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    NeedData,
    ProxyHeader,
    ProxyProtocolError,
    SSLInfo,
    build_ssl_value,
    build_v1,
    build_v2,
    crc32c,
    parse,
)

CORPUS = Path(__file__).parent / "data" / "proxy"
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_corpus() -> list[Any]:
    cases = []
    for spec_path in sorted(CORPUS.glob("*.json")):
        spec = json.loads(spec_path.read_text())
        data = spec_path.with_suffix(".bin").read_bytes()
        cases.append(pytest.param(data, spec, id=spec_path.stem))
    return cases


CASES = _load_corpus()
HEADER_CASES = [case for case in CASES if "header" in case.values[1]["expect"]]
ERROR_CASES = [case for case in CASES if "error" in case.values[1]["expect"]]


def _outcome(data: bytes, **options: Any) -> ProxyHeader | NeedData | ProxyProtocolError:
    try:
        return parse(data, **options)
    except ProxyProtocolError as error:
        return error


def _json_address(address: object) -> object:
    return list(address) if isinstance(address, tuple) else address


def _rebuild(header: ProxyHeader) -> bytes:
    """What our builders write for the fields of ``header``."""
    if header.version == 1:
        assert header.transport in ("TCP4", "TCP6", "UNKNOWN")
        assert not isinstance(header.source, str)
        assert not isinstance(header.destination, str)
        return build_v1(header.transport, header.source, header.destination)
    tlvs = [(t, v) for t, v in header.tlvs if t != PP2_TYPE_CRC32C]
    has_crc = len(tlvs) != len(header.tlvs)
    return build_v2(
        header.command,
        header.transport,
        header.source,
        header.destination,
        tlvs,
        crc32c=has_crc,
    )


# --- The corpus -----------------------------------------------------------------------


def test_corpus_is_present() -> None:
    """The corpus holds valid, incomplete and invalid cases of both versions."""
    names = {case.id for case in CASES}
    assert len(HEADER_CASES) >= 30 and len(ERROR_CASES) >= 40
    assert {n for n in names if n.endswith("-haproxy")} >= {
        "v1-tcp4-haproxy",
        "v2-ssl-haproxy",
        "v2-local-healthcheck-crc-haproxy",
    }


@pytest.mark.parametrize(("data", "spec"), CASES)
def test_corpus_case(data: bytes, spec: dict[str, Any]) -> None:
    """Each raw input parses to exactly the header, NeedData or error its .json expects."""
    expect = spec["expect"]
    result = _outcome(data, **spec.get("options", {}))
    if "error" in expect:
        assert isinstance(result, ProxyProtocolError), result
        assert re.search(expect["error"], str(result)), str(result)
    elif "need" in expect:
        assert result == NeedData(expect["need"])
    else:
        assert isinstance(result, ProxyHeader), result
        want = expect["header"]
        assert result.version == want["version"]
        assert result.command == want["command"]
        assert result.transport == want["transport"]
        assert _json_address(result.source) == want["source"]
        assert _json_address(result.destination) == want["destination"]
        assert [[t, v.hex()] for t, v in result.tlvs] == want["tlvs"]
        assert result.length == want["length"]


@pytest.mark.parametrize(("data", "spec"), HEADER_CASES)
def test_corpus_accessors(data: bytes, spec: dict[str, Any]) -> None:
    """The convenience accessors decode the TLVs each valid case carries, and are None
    for the ones it does not."""
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    want = spec.get("accessors", {})
    assert header.alpn == (want["alpn"].encode() if "alpn" in want else None)
    assert header.authority == want.get("authority")
    assert header.unique_id == (want["unique_id"].encode() if "unique_id" in want else None)
    assert header.netns == want.get("netns")
    if "ssl" in want:
        assert header.ssl is not None
        ssl = header.ssl
        got = {
            "client": ssl.client,
            "verify": ssl.verify,
            "version": ssl.version,
            "cn": ssl.cn,
            "cipher": ssl.cipher,
            "sig_alg": ssl.sig_alg,
            "key_alg": ssl.key_alg,
        }
        assert got == want["ssl"]
    else:
        assert header.ssl is None


@pytest.mark.parametrize(
    ("data", "spec"), [c for c in HEADER_CASES if c.values[1].get("canonical")]
)
def test_builders_reproduce_canonical_headers(data: bytes, spec: dict[str, Any]) -> None:
    """build_v1/build_v2 given a canonical header's fields write its bytes exactly, so
    they write what HAProxy 2.6 writes for every captured case."""
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert _rebuild(header) == data[: header.length]


@pytest.mark.parametrize(("data", "spec"), HEADER_CASES)
def test_corpus_every_truncation_needs_data(data: bytes, spec: dict[str, Any]) -> None:
    """Every prefix of a valid header gives NeedData whose minimum is more than the
    prefix and no more than the header (for v2 with 16 bytes seen: exactly the header)."""
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    for size in range(header.length):
        result = parse(data[:size])
        assert isinstance(result, NeedData), (size, result)
        assert size < result.minimum <= header.length, (size, result)
        if header.version == 2 and size:
            expected = V2_HEADER_LENGTH if size < V2_HEADER_LENGTH else header.length
            assert result.minimum == expected, size


@pytest.mark.parametrize(("data", "spec"), HEADER_CASES)
def test_corpus_bytes_after_the_header_are_not_read(data: bytes, spec: dict[str, Any]) -> None:
    """Whatever follows a header (payload, garbage, another header) leaves it unchanged."""
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    own = data[: header.length]
    for tail in (b"", b"\r\n", b"\x00" * 70000, V2_SIGNATURE, b"PROXY UNKNOWN\r\n"):
        assert parse(own + tail) == header


@pytest.mark.parametrize(("data", "spec"), ERROR_CASES)
def test_corpus_rejection_is_final(data: bytes, spec: dict[str, Any]) -> None:
    """Once an input is rejected, no bytes appended to it make it acceptable."""
    options = spec.get("options", {})
    for tail in (b"\r\n", b" 1 2\r\n", b"\x00" * 300, b"5.6.7.8 1 2\r\n"):
        assert isinstance(_outcome(data + tail, **options), ProxyProtocolError)


# --- Recognising a header -------------------------------------------------------------


@pytest.mark.parametrize("first", [b for b in range(256) if b not in b"P\r"])
def test_any_other_first_byte_is_rejected_at_once(first: int) -> None:
    """A first byte that is neither 'P' nor CR is rejected without waiting for more: a
    TLS ClientHello, an HTTP method or an SSH banner never hangs a PROXY port."""
    with pytest.raises(ProxyProtocolError, match=r"^not a PROXY protocol header"):
        parse(bytes([first]))


def test_signature_and_magic_prefixes_wait() -> None:
    """Every prefix of 'PROXY ' and of the v2 signature waits: 15 bytes for v1, 16 for v2."""
    assert parse(b"") == NeedData(15)
    assert parse(b"", accept_v1=False) == NeedData(16)
    for size in range(1, 7):
        assert parse(b"PROXY "[:size]) == NeedData(15)
    for size in range(1, 16):
        assert parse((V2_SIGNATURE + b"\x21\x11\x00")[:size]) == NeedData(16)


def test_version_switches() -> None:
    """accept_v1/accept_v2 refuse the other version by name; refusing both is the caller's
    ValueError, not the peer's ProxyProtocolError."""
    v1, v2 = build_v1("UNKNOWN", None, None), build_v2("LOCAL", "UNKNOWN")
    assert isinstance(parse(v1, accept_v2=False), ProxyHeader)
    assert isinstance(parse(v2, accept_v1=False), ProxyHeader)
    with pytest.raises(ProxyProtocolError, match=r"^v1 header refused"):
        parse(v1, accept_v1=False)
    with pytest.raises(ProxyProtocolError, match=r"^v2 header refused"):
        parse(v2, accept_v2=False)
    with pytest.raises(ProxyProtocolError, match=r"expected the v2 signature, got b'GET"):
        parse(b"GET", accept_v1=False)
    with pytest.raises(ValueError, match="accepts nothing") as caught:
        parse(v1, accept_v1=False, accept_v2=False)
    assert not isinstance(caught.value, ProxyProtocolError)


def test_max_v2_length() -> None:
    """max_v2_length rejects a larger declared length as soon as it is read, and must
    itself lie within 16..65551."""
    header = build_v2("PROXY", "TCP4", ("192.0.2.1", 1), ("192.0.2.2", 2))
    assert isinstance(parse(header, max_v2_length=28), ProxyHeader)
    with pytest.raises(ProxyProtocolError, match=r"declares 28 bytes \(16 \+ 12\).*limit of 27"):
        parse(header[:16], max_v2_length=27)
    for bad in (15, V2_MAX_LENGTH + 1):
        with pytest.raises(ValueError, match="max_v2_length"):
            parse(header, max_v2_length=bad)


def test_bytes_like_inputs() -> None:
    """bytes, bytearray and memoryview inputs give the same result."""
    data = build_v2("PROXY", "UDP6", ("2001:db8::1", 53), ("2001:db8::2", 53)) + b"payload"
    expected = parse(data)
    assert parse(bytearray(data)) == expected
    assert parse(memoryview(data)) == expected


# --- v1 specifics ---------------------------------------------------------------------


def test_v1_limit_is_107_bytes() -> None:
    """A line may end with its CRLF at byte 107 but not at byte 108, and 106 bytes
    without a CR are rejected without waiting for more."""
    assert V1_MAX_LENGTH == 107
    ok = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(ok) == 107 and isinstance(parse(ok), ProxyHeader)
    assert parse(ok[:-1]) == NeedData(107)
    assert parse(ok[:-2]) == NeedData(107)
    with pytest.raises(ProxyProtocolError, match="no CRLF within the first 107 bytes"):
        parse(b"PROXY UNKNOWN " + b"x" * 92)
    with pytest.raises(ProxyProtocolError, match="no CRLF within the first 107 bytes"):
        parse(b"PROXY UNKNOWN " + b"x" * 92 + b"\r")


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", ("1.2.3.4", 1), ("5.6.7.8", 2)),
        (b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", ("::ffff:1.2.3.4", 1), ("::1", 2)),
        (b"PROXY TCP6 ::1.2.3.4 :: 1 2\r\n", ("::102:304", 1), ("::", 2)),
        (b"PROXY TCP6 0:0:0:0:0:0:0:1 ABCD:: 1 2\r\n", ("::1", 1), ("abcd::", 2)),
        (
            b"PROXY TCP6 1:2:3:4:5:6:7:: ::1:2:3:4:5:6:7 0 65535\r\n",
            ("1:2:3:4:5:6:7:0", 0),
            ("0:1:2:3:4:5:6:7", 65535),
        ),
    ],
)
def test_v1_ipv6_forms(line: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
    """TCP6 takes what inet_pton takes (groups of 1 to 4 hex digits, one '::', a dotted
    tail) and reports addresses compressed, IPv4-mapped ones with a dotted tail."""
    header = parse(line)
    assert isinstance(header, ProxyHeader)
    assert (header.source, header.destination) == (source, destination)


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    """After 'PROXY UNKNOWN ' anything but CR or LF is ignored up to the CRLF."""
    for rest in (b"", b" ", b" TCP4 garbage", b" \x00\x7f\xff", b" " + b"z" * 90):
        header = parse(b"PROXY UNKNOWN" + rest + b"\r\npayload")
        assert isinstance(header, ProxyHeader)
        assert (header.transport, header.source, header.destination) == ("UNKNOWN", None, None)
        assert header.length == len(b"PROXY UNKNOWN" + rest) + 2


# --- v2 specifics ---------------------------------------------------------------------


def test_crc32c_known_vectors() -> None:
    """crc32c() is CRC-32C (Castagnoli): the check value and RFC 3720 appendix B.4 vectors."""
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc_covers_every_byte_of_the_header() -> None:
    """Flipping any bit of a CRC-protected header (outside the length field, which moves
    the header's end) is rejected: as a CRC mismatch, or earlier as malformed."""
    header = build_v2(
        "PROXY",
        "TCP6",
        ("2001:db8::1", 1),
        ("2001:db8::2", 2),
        [(PP2_TYPE_ALPN, b"h2")],
        crc32c=True,
    )
    for index in range(len(V2_SIGNATURE) + 2, len(header)):
        if index in (14, 15):
            continue
        for bit in range(8):
            mutated = bytearray(header)
            mutated[index] ^= 1 << bit
            result = _outcome(bytes(mutated))
            if isinstance(result, ProxyHeader):
                # Only possible when the CRC TLV's own type byte was hit: no CRC left.
                assert result.tlv(PP2_TYPE_CRC32C) is None, (index, bit)
            else:
                assert isinstance(result, ProxyProtocolError), (index, bit)


def test_local_ignores_addresses_of_every_family() -> None:
    """LOCAL reports no addresses and transport UNKNOWN whatever family it declares, and
    still reads the TLVs after the family's address block."""
    for family, size in ((0x00, 0), (0x11, 12), (0x12, 12), (0x21, 36), (0x22, 36), (0x31, 216)):
        body = b"\x07" * size + b"\x04\x00\x01\x00"
        data = V2_SIGNATURE + bytes((0x20, family)) + struct.pack("!H", len(body)) + body
        header = parse(data)
        assert isinstance(header, ProxyHeader), family
        assert (header.command, header.transport) == ("LOCAL", "UNKNOWN")
        assert (header.source, header.destination) == (None, None)
        assert header.tlvs == ((PP2_TYPE_NOOP, b"\x00"),)


def test_udp_datagram_payload_starts_at_length() -> None:
    """For a UDP datagram the header's length is where the payload starts."""
    payload = b"\x00\x01 a DNS query"
    datagram = build_v2("PROXY", "UDP4", ("198.51.100.9", 40000), ("192.0.2.53", 53)) + payload
    header = parse(datagram, accept_v1=False)
    assert isinstance(header, ProxyHeader)
    assert header.transport == "UDP4" and header.source == ("198.51.100.9", 40000)
    assert datagram[header.length :] == payload


def test_largest_header() -> None:
    """The 16-bit length field bounds a v2 header at 16 + 65535 = 65551 bytes; such a
    header parses, and waits for all of its bytes first."""
    assert V2_MAX_LENGTH == 65551
    noop = b"\x00" * (0xFFFF - 12 - 3)
    data = build_v2("PROXY", "TCP4", ("1.1.1.1", 1), ("2.2.2.2", 2), [(PP2_TYPE_NOOP, noop)])
    assert len(data) == V2_MAX_LENGTH
    assert parse(data[:-1]) == NeedData(V2_MAX_LENGTH)
    header = parse(data + b"x")
    assert isinstance(header, ProxyHeader) and header.length == V2_MAX_LENGTH


def test_tlv_accessors() -> None:
    """tlv() returns the first TLV of a type or None; accessors decode known types."""
    header = parse(
        build_v2(
            "PROXY",
            "TCP4",
            ("1.1.1.1", 1),
            ("2.2.2.2", 2),
            [
                (PP2_TYPE_AUTHORITY, "bücher.example".encode()),
                (PP2_TYPE_AUTHORITY, b"second"),
                (PP2_TYPE_NETNS, b"\xffns"),
                (PP2_TYPE_UNIQUE_ID, b"\x00id"),
            ],
        )
    )
    assert isinstance(header, ProxyHeader)
    assert header.authority == "bücher.example"
    assert header.tlv(PP2_TYPE_AUTHORITY) == "bücher.example".encode()
    assert header.netns == "\udcffns"
    assert header.unique_id == b"\x00id"
    assert header.tlv(0x99) is None and header.alpn is None and header.ssl is None


def test_ssl_info() -> None:
    """The SSL TLV gives the client bits, verify and the first sub-TLV of each kind;
    certificate_verified needs a presented certificate as well as verify == 0."""
    value = build_ssl_value(
        PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS,
        0,
        [
            (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.2"),
            (PP2_SUBTYPE_SSL_CN, "Zoë".encode()),
            (PP2_SUBTYPE_SSL_CIPHER, b"ECDHE-RSA-AES128-GCM-SHA256"),
            (PP2_SUBTYPE_SSL_CN, b"ignored second CN"),
            (0x2F, b"unknown sub-TLV"),
        ],
    )
    header = parse(
        build_v2("PROXY", "TCP4", ("1.1.1.1", 1), ("2.2.2.2", 2), [(PP2_TYPE_SSL, value)])
    )
    assert isinstance(header, ProxyHeader)
    ssl = header.ssl
    assert ssl is not None
    assert (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg) == (
        "TLSv1.2",
        "Zoë",
        "ECDHE-RSA-AES128-GCM-SHA256",
        None,
    )
    assert ssl.tlvs[-1] == (0x2F, b"unknown sub-TLV")
    assert ssl.used_ssl and ssl.certificate_verified
    assert not SSLInfo(client=PP2_CLIENT_SSL, verify=0).certificate_verified
    assert not SSLInfo(client=PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN, verify=1).certificate_verified


# --- Builders -------------------------------------------------------------------------


def test_build_v1_maps_ipv4_into_tcp6() -> None:
    """build_v1 writes an IPv4 endpoint of a TCP6 line IPv4-mapped, as HAProxy does when
    the client and listener families differ."""
    assert build_v1("TCP6", ("192.0.2.1", 1), ("2001:db8::1", 2)) == (
        b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::1 1 2\r\n"
    )
    assert build_v1("UNKNOWN", None, None) == b"PROXY UNKNOWN\r\n"


def test_build_v2_puts_the_crc_first() -> None:
    """build_v2(crc32c=True) writes the CRC32C TLV right after the addresses, as HAProxy
    does, and parse() verifies it."""
    data = build_v2("LOCAL", "UNKNOWN", tlvs=[(PP2_TYPE_NOOP, b"")], crc32c=True)
    assert data[16] == PP2_TYPE_CRC32C
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert [t for t, _ in header.tlvs] == [PP2_TYPE_CRC32C, PP2_TYPE_NOOP]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("TCP4", ("::1", 1), ("1.2.3.4", 2)), r"TCP4 source address '::1' is not IPv4"),
        (("TCP4", ("1.2.3.4", 70000), ("1.2.3.4", 2)), r"source port 70000 is not an integer"),
        (("TCP4", ("1.2.3.4", True), ("1.2.3.4", 2)), r"source port True"),
        (("TCP4", ("localhost", 1), ("1.2.3.4", 2)), r"'localhost' is not an IP address"),
        (("TCP4", None, ("1.2.3.4", 2)), r"must be an \(ip, port\) pair"),
        (("TCP6", ("fe80::1%eth0", 1), ("::1", 2)), r"has a scope id"),
        (("UNKNOWN", ("1.2.3.4", 1), ("1.2.3.4", 2)), r"carries no addresses"),
        (("UDP4", ("1.2.3.4", 1), ("1.2.3.4", 2)), r"v1 transport 'UDP4'"),
    ],
)
def test_build_v1_refuses(args: tuple[Any, ...], message: str) -> None:
    """build_v1 raises ValueError naming the argument for anything parse() would not
    read back."""
    with pytest.raises(ValueError, match=message):
        build_v1(*args)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (
            ("LOCAL", "TCP4", ("1.2.3.4", 1), ("1.2.3.4", 2)),
            {},
            r"LOCAL header has transport UNKNOWN",
        ),
        (("PROXY", "UNKNOWN", ("1.2.3.4", 1)), {}, r"carries no addresses"),
        (("STATS", "UNKNOWN"), {}, r"command 'STATS'"),
        (("PROXY", "SCTP4"), {}, r"transport 'SCTP4'"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(PP2_TYPE_CRC32C, bytes(4))]}, r"pass crc32c=True"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(PP2_TYPE_UNIQUE_ID, bytes(129))]}, r"129 bytes"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(PP2_TYPE_SSL, b"\x01")]}, r"SSL TLV is 1 bytes long"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(256, b"")]}, r"TLV type 256"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(0xE0, bytes(0x10000))]}, r"65536 bytes"),
        (("PROXY", "UNKNOWN"), {"tlvs": [(0xE0, bytes(0xFFF0))] * 2}, r"16-bit length field"),
        (("PROXY", "UNIX_STREAM", "/" * 109, ""), {}, r"109 bytes, more than 108"),
        (("PROXY", "UNIX_STREAM", "/a\0b", ""), {}, r"holds a NUL"),
        (("PROXY", "UNIX_STREAM", "\0abstract\0", ""), {}, r"ends with NUL"),
        (("PROXY", "UNIX_STREAM", ("1.2.3.4", 1), ""), {}, r"must be a path"),
        (("PROXY", "UNIX_STREAM", "\ud800", ""), {}, r"cannot be encoded"),
        (("PROXY", "UDP6", ("1.2.3.4", 1), ("::1", -1)), {}, r"destination port -1"),
    ],
)
def test_build_v2_refuses(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    """build_v2 raises ValueError naming the argument for anything parse() would not
    read back."""
    with pytest.raises(ValueError, match=message):
        build_v2(*args, **kwargs)


def test_build_ssl_value_refuses_out_of_range_fields() -> None:
    """build_ssl_value checks that client fits a byte and verify 32 bits."""
    with pytest.raises(ValueError, match="client bits 256"):
        build_ssl_value(256, 0)
    with pytest.raises(ValueError, match="verify result 4294967296"):
        build_ssl_value(0, 1 << 32)


def test_module_does_no_io() -> None:
    """The module imports none of socket, threading, time or selectors."""
    source = Path(proxy.__file__).read_text()
    for name in ("socket", "threading", "time", "selectors"):
        assert not re.search(rf"^\s*(import|from)\s+{name}\b", source, re.MULTILINE), name


# --- Properties -----------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
unix_paths = st.one_of(
    st.binary(max_size=108).filter(lambda b: b"\0" not in b),
    st.binary(min_size=1, max_size=107)
    .filter(lambda b: not b.endswith(b"\0"))
    .map(lambda b: b"\0" + b),
).map(lambda b: b.decode("utf-8", "surrogateescape"))
sub_tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
plain_tlvs = st.tuples(
    st.integers(0, 255).filter(
        lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID, PP2_TYPE_SSL)
    ),
    st.binary(max_size=60),
)
special_tlvs = st.one_of(
    st.tuples(st.just(PP2_TYPE_UNIQUE_ID), st.binary(max_size=128)),
    st.builds(
        lambda c, v, s: (PP2_TYPE_SSL, build_ssl_value(c, v, s)),
        st.integers(0, 255),
        st.integers(0, 0xFFFFFFFF),
        sub_tlvs,
    ),
)
tlv_lists = st.lists(st.one_of(plain_tlvs, special_tlvs), max_size=5)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    transport = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if transport == "UNKNOWN":
        return build_v1("UNKNOWN", None, None), {"transport": "UNKNOWN"}
    ips = ipv4 if transport == "TCP4" else st.one_of(ipv6, ipv4)
    source = (draw(ips), draw(ports))
    destination = (draw(ips), draw(ports))
    fields = {"transport": transport, "source": source, "destination": destination}
    return build_v1(transport, source, destination), fields  # type: ignore[arg-type]


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    transport = draw(
        st.sampled_from(["TCP4", "TCP6", "UDP4", "UDP6", "UNIX_STREAM", "UNIX_DGRAM", "UNKNOWN"])
    )
    command = "LOCAL" if transport == "UNKNOWN" and draw(st.booleans()) else "PROXY"
    source: Any = None
    destination: Any = None
    if transport in ("TCP4", "UDP4"):
        source, destination = (draw(ipv4), draw(ports)), (draw(ipv4), draw(ports))
    elif transport in ("TCP6", "UDP6"):
        source, destination = (draw(ipv6), draw(ports)), (draw(ipv6), draw(ports))
    elif transport.startswith("UNIX"):
        source, destination = draw(unix_paths), draw(unix_paths)
    tlvs = draw(tlv_lists)
    crc = draw(st.booleans())
    data = build_v2(command, transport, source, destination, tlvs, crc32c=crc)  # type: ignore[arg-type]
    fields = {
        "command": command,
        "transport": transport,
        "source": source,
        "destination": destination,
        "tlvs": tlvs,
        "crc": crc,
    }
    return data, fields


any_headers = st.one_of(v1_headers(), v2_headers())


def _same_address(got: object, want: object) -> bool:
    if isinstance(want, tuple):
        assert isinstance(got, tuple)
        g, w = ipaddress.ip_address(got[0]), ipaddress.ip_address(want[0])
        if w.version == 4 and g.version == 6:
            w = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + w.packed)
        return bool(g == w) and got[1] == want[1]
    return got == want


@FAST
@given(st.binary(max_size=200))
@example(b"PROXY TCP6 " + b":" * 40)
@example(V2_SIGNATURE + b"\x21\x20\x00\x05\x20\x00\x02\x00\x00")
def test_random_bytes_raise_nothing_but_proxy_protocol_error(data: bytes) -> None:
    """Arbitrary bytes give a header, NeedData or ProxyProtocolError, never another
    exception."""
    assert isinstance(_outcome(data), ProxyHeader | NeedData | ProxyProtocolError)


@FAST
@given(
    st.sampled_from(
        [
            b"PROXY ",
            b"PROXY TCP4 ",
            b"PROXY TCP6 ",
            b"PROXY TCP6 ::ffff:",
            b"PROXY UNKNOWN",
            V2_SIGNATURE + b"\x21",
            V2_SIGNATURE + b"\x21\x11",
            V2_SIGNATURE + b"\x20\x00",
            V2_SIGNATURE + b"\x21\x31",
        ]
    ),
    st.binary(max_size=300),
    st.sampled_from([b"", b"\r\n", b" 1 2\r\n"]),
)
def test_random_bytes_after_a_valid_start_raise_nothing_else(
    start: bytes, middle: bytes, end: bytes
) -> None:
    """Random bytes after 'PROXY ', a protocol, or the v2 signature and its fixed bytes
    reach the inner parsers and still raise nothing but ProxyProtocolError."""
    data = start + middle + end
    result = _outcome(data)
    assert isinstance(result, ProxyHeader | NeedData | ProxyProtocolError)
    if isinstance(result, NeedData):
        assert result.minimum > len(data)


@FAST
@given(v1_headers(), st.binary(max_size=20))
def test_v1_round_trip(built: tuple[bytes, dict[str, Any]], payload: bytes) -> None:
    """parse(build_v1(...)) gives back the transport and endpoints, and the header length."""
    data, fields = built
    header = parse(data + payload)
    assert isinstance(header, ProxyHeader)
    assert (header.version, header.command, header.transport) == (1, "PROXY", fields["transport"])
    assert header.length == len(data) <= V1_MAX_LENGTH
    assert _same_address(header.source, fields.get("source"))
    assert _same_address(header.destination, fields.get("destination"))


@FAST
@given(v2_headers(), st.binary(max_size=20))
def test_v2_round_trip(built: tuple[bytes, dict[str, Any]], payload: bytes) -> None:
    """parse(build_v2(...)) gives back the command, transport, endpoints and TLVs (after
    the CRC32C TLV when one was asked for), and the header length."""
    data, fields = built
    header = parse(data + payload)
    assert isinstance(header, ProxyHeader)
    assert (header.version, header.command, header.transport) == (
        2,
        fields["command"],
        fields["transport"],
    )
    assert header.length == len(data)
    assert _same_address(header.source, fields["source"])
    assert _same_address(header.destination, fields["destination"])
    tlvs = list(header.tlvs)
    if fields["crc"]:
        assert tlvs.pop(0)[0] == PP2_TYPE_CRC32C
    assert tlvs == [(t, bytes(v)) for t, v in fields["tlvs"]]
    assert _rebuild(header) == data


@FAST
@given(any_headers, st.data())
def test_mutations_are_parsed_consistently_or_rejected(
    built: tuple[bytes, dict[str, Any]], data: st.DataObject
) -> None:
    """A header with one byte changed, cut short or extended is parsed as a consistent
    header, waits for more, or raises ProxyProtocolError; never another exception, and a
    CRC-protected v2 header cannot be changed in place unnoticed."""
    original, fields = built
    kind = data.draw(st.sampled_from(["mutate", "truncate", "extend"]))
    if kind == "mutate":
        index = data.draw(st.integers(0, len(original) - 1))
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]))
        changed = original[:index] + bytes([byte]) + original[index + 1 :]
    elif kind == "truncate":
        changed = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        changed = original + data.draw(st.binary(min_size=1, max_size=50))
    result = _outcome(changed)
    assert isinstance(result, ProxyHeader | NeedData | ProxyProtocolError)
    if isinstance(result, NeedData):
        assert result.minimum > len(changed)
    if kind == "truncate":
        assert isinstance(result, NeedData)
    if kind == "extend":
        assert result == parse(original)
    if isinstance(result, ProxyHeader):
        # A header is self-contained: its own bytes parse to it, and so would a rebuild.
        assert result.length <= len(changed)
        assert parse(changed[: result.length]) == result
        assert parse(_rebuild(result)) == result or result.version == 1
        if kind == "mutate" and fields.get("crc") and result.length == len(original):
            assert result.tlv(PP2_TYPE_CRC32C) is None


@FAST
@given(any_headers, st.binary(max_size=10))
def test_prefixes_need_data_and_bytewise_feeding_reaches_the_header(
    built: tuple[bytes, dict[str, Any]], payload: bytes
) -> None:
    """Every proper prefix of a valid header gives NeedData with a minimum above the
    prefix and at most the header's length; adding one byte at a time reaches the header
    parse() gives for the whole input."""
    original, _fields = built
    full = parse(original + payload)
    assert isinstance(full, ProxyHeader)
    buffer = bytearray()
    for byte in original + payload:
        result = parse(buffer)
        if len(buffer) < full.length:
            assert isinstance(result, NeedData), (len(buffer), result)
            assert len(buffer) < result.minimum <= full.length
        else:
            assert result == full
        buffer.append(byte)
    assert parse(buffer) == full


@FAST
@given(any_headers, st.data())
def test_rejection_is_final_and_acceptance_stable(
    built: tuple[bytes, dict[str, Any]], data: st.DataObject
) -> None:
    """If some bytes are rejected, every extension of them is rejected too; if they give a
    header, every extension gives the same header."""
    original, _fields = built
    index = data.draw(st.integers(0, len(original) - 1))
    start = original[:index] + bytes([data.draw(st.integers(0, 255))])
    extension = data.draw(st.one_of(st.binary(max_size=60), st.just(original[index + 1 :])))
    before, after = _outcome(start), _outcome(start + extension)
    if isinstance(before, ProxyProtocolError):
        assert isinstance(after, ProxyProtocolError)
    elif isinstance(before, ProxyHeader):
        assert after == before
