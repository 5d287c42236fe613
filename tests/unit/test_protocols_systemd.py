"""The systemd protocols, sans-IO: activation and watchdog environments in, messages out."""

from __future__ import annotations

import ast
import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from servekit.protocols import sd_daemon as sd
from servekit.protocols.sd_daemon import (
    NOTIFY_MESSAGE_MAX,
    ListenFds,
    NotifyMessageError,
    SystemdEnvironmentError,
)

PID = 4711

# -- socket activation: raw environment beside the expected result ----------------------

LISTEN_CASES: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
    ("not activated", {}, ()),
    ("only LISTEN_FDS", {"LISTEN_FDS": "2"}, ()),
    ("LISTEN_PID without LISTEN_FDS", {"LISTEN_PID": str(PID)}, ()),
    ("meant for another process", {"LISTEN_PID": "1", "LISTEN_FDS": "2"}, ()),
    (
        "another process, even with broken count and names",
        {"LISTEN_PID": "1", "LISTEN_FDS": "x", "LISTEN_FDNAMES": "a:b:c"},
        (),
    ),
    ("one socket, no names", {"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, ("unknown",)),
    (
        "three sockets, no names",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "3"},
        ("unknown", "unknown", "unknown"),
    ),
    (
        "named in order",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:metrics"},
        ("web", "metrics"),
    ),
    (
        "the same name twice",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:web"},
        ("web", "web"),
    ),
    (
        "an empty name is kept, as libsystemd does",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a::b"},
        ("a", "", "b"),
    ),
    (
        "an empty LISTEN_FDNAMES is one empty name",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""},
        ("",),
    ),
    ("leading zeros", {"LISTEN_PID": f"000{PID}", "LISTEN_FDS": "01"}, ("unknown",)),
]


@pytest.mark.parametrize(
    ("environ", "names"),
    [case[1:] for case in LISTEN_CASES],
    ids=[case[0] for case in LISTEN_CASES],
)
def test_listen_environment(environ: dict[str, str], names: tuple[str, ...]) -> None:
    """Each activation environment yields exactly the expected descriptor names, from fd 3."""
    result = sd.parse_listen_fds(environ, PID)
    assert result.names == names
    assert list(result) == list(zip(range(3, 3 + len(names)), names, strict=True))
    assert len(result) == result.count == len(names)
    assert bool(result) is bool(names)


LISTEN_ERRORS: list[tuple[str, dict[str, str], str]] = [
    ("LISTEN_PID not a number", {"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me'"),
    ("LISTEN_PID zero", {"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID='0'"),
    ("LISTEN_PID negative", {"LISTEN_PID": "-5", "LISTEN_FDS": "1"}, "LISTEN_PID='-5'"),
    ("LISTEN_PID beyond pid_t", {"LISTEN_PID": str(2**31)}, "LISTEN_PID='2147483648'"),
    ("LISTEN_PID with spaces", {"LISTEN_PID": f" {PID}", "LISTEN_FDS": "1"}, "LISTEN_PID="),
    ("LISTEN_FDS empty", {"LISTEN_PID": str(PID), "LISTEN_FDS": ""}, "LISTEN_FDS=''"),
    ("LISTEN_FDS signed", {"LISTEN_PID": str(PID), "LISTEN_FDS": "+1"}, "LISTEN_FDS='+1'"),
    ("LISTEN_FDS with '_'", {"LISTEN_PID": str(PID), "LISTEN_FDS": "1_0"}, "LISTEN_FDS='1_0'"),
    ("LISTEN_FDS non-ASCII digit", {"LISTEN_PID": str(PID), "LISTEN_FDS": "\u0663"}, "LISTEN_FDS"),
    ("LISTEN_FDS zero", {"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, "LISTEN_FDS='0'"),
    (
        "LISTEN_FDS absurd",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2147483644"},
        "more than 1048576",
    ),
    (
        "more names than descriptors",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
        "LISTEN_FDNAMES='a:b' names 2 descriptor(s) but LISTEN_FDS=1",
    ),
    (
        "fewer names than descriptors",
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b"},
        "names 2 descriptor(s) but LISTEN_FDS=3",
    ),
]


@pytest.mark.parametrize(
    ("environ", "message"),
    [case[1:] for case in LISTEN_ERRORS],
    ids=[case[0] for case in LISTEN_ERRORS],
)
def test_listen_environment_errors(environ: dict[str, str], message: str) -> None:
    """A malformed activation environment meant for us raises an error naming the value."""
    with pytest.raises(SystemdEnvironmentError) as info:
        sd.parse_listen_fds(environ, PID)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_listen_fds_result_defaults_to_nothing() -> None:
    """An empty ListenFds has no descriptors and is false."""
    assert not ListenFds()
    assert list(ListenFds().fds) == []


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters=":"), max_size=8), min_size=1))
def test_any_names_without_colons_round_trip(names: list[str]) -> None:
    """Any list of names free of ':' comes back unchanged and in order."""
    environ = {
        "LISTEN_PID": str(PID),
        "LISTEN_FDS": str(len(names)),
        "LISTEN_FDNAMES": ":".join(names),
    }
    assert sd.parse_listen_fds(environ, PID).names == tuple(names)


# -- watchdog ---------------------------------------------------------------------------

WATCHDOG_CASES: list[tuple[str, dict[str, str], float | None]] = [
    ("no watchdog", {}, None),
    ("no watchdog, stray WATCHDOG_PID", {"WATCHDOG_PID": str(PID)}, None),
    ("thirty seconds", {"WATCHDOG_USEC": "30000000"}, 30.0),
    ("one microsecond", {"WATCHDOG_USEC": "1"}, 0.000001),
    ("for us by pid", {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": str(PID)}, 2.5),
    ("for another process", {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "1"}, None),
]


@pytest.mark.parametrize(
    ("environ", "interval"),
    [case[1:] for case in WATCHDOG_CASES],
    ids=[case[0] for case in WATCHDOG_CASES],
)
def test_watchdog_environment(environ: dict[str, str], interval: float | None) -> None:
    """WATCHDOG_USEC becomes the manager's timeout in seconds, or None when not for us."""
    assert sd.parse_watchdog(environ, PID) == interval


WATCHDOG_ERRORS: list[tuple[str, dict[str, str], str]] = [
    ("zero", {"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC='0'"),
    ("infinity", {"WATCHDOG_USEC": str(2**64 - 1)}, "WATCHDOG_USEC='18446744073709551615'"),
    ("not a number", {"WATCHDOG_USEC": "30s"}, "WATCHDOG_USEC='30s'"),
    ("fractional", {"WATCHDOG_USEC": "1.5"}, "WATCHDOG_USEC='1.5'"),
    ("bad pid", {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "self"}, "WATCHDOG_PID='self'"),
    (
        "bad value for another process is still an error, as in libsystemd",
        {"WATCHDOG_USEC": "0", "WATCHDOG_PID": "1"},
        "WATCHDOG_USEC='0'",
    ),
]


@pytest.mark.parametrize(
    ("environ", "message"),
    [case[1:] for case in WATCHDOG_ERRORS],
    ids=[case[0] for case in WATCHDOG_ERRORS],
)
def test_watchdog_environment_errors(environ: dict[str, str], message: str) -> None:
    """A malformed watchdog environment raises an error quoting the value."""
    with pytest.raises(SystemdEnvironmentError, match=message.replace("(", r"\(")):
        sd.parse_watchdog(environ, PID)


# -- NOTIFY_SOCKET ------------------------------------------------------------------------

NOTIFY_SOCKET_CASES: list[tuple[str, dict[str, str], str | None]] = [
    ("unset", {}, None),
    ("empty switches notification off", {"NOTIFY_SOCKET": ""}, None),
    ("filesystem path", {"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify"),
    ("abstract name", {"NOTIFY_SOCKET": "@/org/example/notify"}, "\0/org/example/notify"),
    ("longest path", {"NOTIFY_SOCKET": "/" + "a" * 107}, "/" + "a" * 107),
    ("longest abstract name", {"NOTIFY_SOCKET": "@" + "a" * 107}, "\0" + "a" * 107),
]


@pytest.mark.parametrize(
    ("environ", "address"),
    [case[1:] for case in NOTIFY_SOCKET_CASES],
    ids=[case[0] for case in NOTIFY_SOCKET_CASES],
)
def test_notify_socket(environ: dict[str, str], address: str | None) -> None:
    """NOTIFY_SOCKET becomes the AF_UNIX address Python connects to, or None."""
    assert sd.parse_notify_socket(environ) == address


NOTIFY_SOCKET_ERRORS: list[tuple[str, str, str]] = [
    ("relative path", "run/notify", "NOTIFY_SOCKET='run/notify': expected an absolute path"),
    ("bare '@'", "@", "NOTIFY_SOCKET='@'"),
    ("vsock", "vsock:2:1234", "AF_VSOCK notification is not supported"),
    ("path too long", "/" + "a" * 108, "109 bytes, longer than sun_path (108)"),
    ("abstract name too long", "@" + "a" * 108, "109 bytes, longer than sun_path (108)"),
    ("multi-byte path too long", "/" + "\u00e9" * 54, "109 bytes"),
]


@pytest.mark.parametrize(
    ("value", "message"),
    [case[1:] for case in NOTIFY_SOCKET_ERRORS],
    ids=[case[0] for case in NOTIFY_SOCKET_ERRORS],
)
def test_notify_socket_errors(value: str, message: str) -> None:
    """A NOTIFY_SOCKET we cannot send to raises an error quoting the value."""
    with pytest.raises(SystemdEnvironmentError) as info:
        sd.parse_notify_socket({"NOTIFY_SOCKET": value})
    assert message in str(info.value)


# -- messages: call beside the exact text -----------------------------------------------

MESSAGE_CASES: list[tuple[str, Any, str]] = [
    ("ready", sd.ready_message, "READY=1"),
    (
        "ready with status",
        lambda: sd.ready_message("serving 2 sockets"),
        "READY=1\nSTATUS=serving 2 sockets",
    ),
    ("stopping", sd.stopping_message, "STOPPING=1"),
    (
        "stopping with status",
        lambda: sd.stopping_message("draining"),
        "STOPPING=1\nSTATUS=draining",
    ),
    ("reloading", lambda: sd.reloading_message(123456789), "RELOADING=1\nMONOTONIC_USEC=123456789"),
    (
        "reloading with status",
        lambda: sd.reloading_message(0, "reading config"),
        "RELOADING=1\nMONOTONIC_USEC=0\nSTATUS=reading config",
    ),
    ("status", lambda: sd.status_message("42 connections"), "STATUS=42 connections"),
    ("empty status", lambda: sd.status_message(""), "STATUS="),
    ("watchdog", sd.watchdog_message, "WATCHDOG=1"),
    ("mainpid", lambda: sd.mainpid_message(4711), "MAINPID=4711"),
    ("extend timeout", lambda: sd.extend_timeout_message(90), "EXTEND_TIMEOUT_USEC=90000000"),
    ("extend timeout rounds up", lambda: sd.extend_timeout_message(1e-7), "EXTEND_TIMEOUT_USEC=1"),
    (
        "hand-built",
        lambda: sd.format_message([("READY", "1"), ("X_SERVEKIT_WORKERS", 4)]),
        "READY=1\nX_SERVEKIT_WORKERS=4",
    ),
]


@pytest.mark.parametrize(
    ("build", "text"),
    [case[1:] for case in MESSAGE_CASES],
    ids=[case[0] for case in MESSAGE_CASES],
)
def test_message_text(build: Any, text: str) -> None:
    """Each message builder produces exactly the text sd_notify(3) defines."""
    assert build() == text


STATUS_ESCAPES: list[tuple[str, str, str]] = [
    ("line feed", "bound\nREADY=1", "STATUS=bound\\nREADY=1"),
    ("carriage return", "a\rb", "STATUS=a\\rb"),
    ("CRLF", "a\r\nb", "STATUS=a\\r\\nb"),
    ("NUL", "a\0b", "STATUS=a\\0b"),
    ("backslashes pass unchanged", "C:\\dir\\n", "STATUS=C:\\dir\\n"),
    ("tabs and UTF-8 pass unchanged", "caf\u00e9\tok", "STATUS=caf\u00e9\tok"),
    ("lone surrogate is backslash-escaped", "file-\udcff", "STATUS=file-\\udcff"),
]


@pytest.mark.parametrize(
    ("status", "text"),
    [case[1:] for case in STATUS_ESCAPES],
    ids=[case[0] for case in STATUS_ESCAPES],
)
def test_status_escaping(status: str, text: str) -> None:
    """Line breaks and NUL in a status are escaped, so it can never forge another assignment."""
    message = sd.status_message(status)
    assert message == text
    fields = sd.parse_message(sd.encode_message(message))
    assert list(fields) == ["STATUS"]


def test_long_status_is_cut_to_fit_the_datagram() -> None:
    """A status too long for one datagram is cut at a character boundary and ends with '...'."""
    message = sd.ready_message("\u00e9" * 5000)
    data = sd.encode_message(message)
    assert len(data) <= NOTIFY_MESSAGE_MAX
    assert len(data) >= NOTIFY_MESSAGE_MAX - 4  # at most one two-byte character lost
    assert message.startswith("READY=1\nSTATUS=\u00e9")
    assert message.endswith("\u00e9...")


def test_status_that_just_fits_is_not_cut() -> None:
    """A status that fills the datagram exactly is sent whole."""
    status = "x" * (NOTIFY_MESSAGE_MAX - len("READY=1\nSTATUS="))
    assert len(sd.encode_message(sd.ready_message(status))) == NOTIFY_MESSAGE_MAX
    assert sd.ready_message(status).endswith("x" * 10)


MESSAGE_ERRORS: list[tuple[str, Any, str]] = [
    (
        "newline in a value",
        lambda: sd.format_message([("STATUS", "a\nb")]),
        "may not contain '\\n'",
    ),
    ("CR in a value", lambda: sd.format_message([("X_A", "a\rb")]), "may not contain '\\r'"),
    ("NUL in a value", lambda: sd.format_message([("X_A", "a\0b")]), "may not contain '\\x00'"),
    ("'=' in a name", lambda: sd.format_message([("A=B", "1")]), "name 'A=B'"),
    ("empty name", lambda: sd.format_message([("", "1")]), "name ''"),
    ("no assignments", lambda: sd.format_message([]), "at least one assignment"),
    ("bool value", lambda: sd.format_message([("READY", True)]), "READY=True"),
    ("float value", lambda: sd.format_message([("X_A", 1.5)]), "X_A=1.5"),
    ("mainpid zero", lambda: sd.mainpid_message(0), "MAINPID=0"),
    ("mainpid beyond pid_t", lambda: sd.mainpid_message(2**31), "MAINPID=2147483648"),
    ("extend by zero", lambda: sd.extend_timeout_message(0), "from 0 s"),
    ("extend by NaN", lambda: sd.extend_timeout_message(float("nan")), "from nan s"),
    ("extend by infinity", lambda: sd.extend_timeout_message(float("inf")), "from inf s"),
    ("extend beyond usec range", lambda: sd.extend_timeout_message(2.0**64 / 1e6), "out of range"),
    ("negative clock", lambda: sd.reloading_message(-1), "MONOTONIC_USEC=-1"),
    ("float clock", lambda: sd.reloading_message(1.5), "MONOTONIC_USEC=1.5"),  # type: ignore[arg-type]
    ("empty datagram", lambda: sd.encode_message(""), "empty notification message"),
    ("NUL in datagram", lambda: sd.encode_message("READY=1\0"), "holds a NUL byte"),
    ("unencodable datagram", lambda: sd.encode_message("X_A=\udcff"), "not valid UTF-8"),
    (
        "oversized datagram",
        lambda: sd.encode_message("X_A=" + "a" * NOTIFY_MESSAGE_MAX),
        "message of 4100 bytes is longer than 4096",
    ),
]


@pytest.mark.parametrize(
    ("build", "message"),
    [case[1:] for case in MESSAGE_ERRORS],
    ids=[case[0] for case in MESSAGE_ERRORS],
)
def test_message_errors(build: Any, message: str) -> None:
    """A message the manager would misread or drop raises NotifyMessageError naming the value."""
    with pytest.raises(NotifyMessageError) as info:
        build()
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


PARSE_CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("one", b"READY=1", {"READY": "1"}),
    ("several", b"READY=1\nSTATUS=up", {"READY": "1", "STATUS": "up"}),
    ("CR separates too", b"READY=1\rSTATUS=up", {"READY": "1", "STATUS": "up"}),
    ("trailing newline", b"WATCHDOG=1\n", {"WATCHDOG": "1"}),
    ("first wins", b"STATUS=a\nSTATUS=b", {"STATUS": "a"}),
    ("value with '='", b"STATUS=a=b", {"STATUS": "a=b"}),
    ("lines without '=' skipped", b"junk\nREADY=1\n=x", {"READY": "1"}),
    ("invalid UTF-8 replaced", b"STATUS=\xff", {"STATUS": "\ufffd"}),
]


@pytest.mark.parametrize(
    ("data", "fields"),
    [case[1:] for case in PARSE_CASES],
    ids=[case[0] for case in PARSE_CASES],
)
def test_parse_message(data: bytes, fields: dict[str, str]) -> None:
    """A datagram is read into its assignments the way the manager reads it."""
    assert sd.parse_message(data) == fields


@given(st.text(max_size=6000))
def test_any_status_stays_one_assignment_that_fits(status: str) -> None:
    """Whatever the status text, the message is one READY and one STATUS within 4096 bytes."""
    data = sd.encode_message(sd.ready_message(status))
    assert len(data) <= NOTIFY_MESSAGE_MAX
    fields = sd.parse_message(data)
    assert list(fields) == ["READY", "STATUS"]
    assert fields["READY"] == "1"


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True),
            st.text(alphabet=st.characters(blacklist_characters="\n\r\0"), max_size=20),
        ),
        min_size=1,
        max_size=5,
        unique_by=lambda pair: pair[0],
    )
)
def test_hand_built_messages_round_trip(pairs: list[tuple[str, str]]) -> None:
    """Any assignments with valid names and safe values read back as they were written."""
    try:
        data = sd.encode_message(sd.format_message(pairs))
    except NotifyMessageError:
        return  # lone surrogates cannot be sent; encode_message says so
    assert sd.parse_message(data) == dict(pairs)


def test_module_is_sans_io() -> None:
    """The protocol module imports nothing that does I/O or reads clocks."""
    tree = ast.parse(inspect.getsource(sd))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"os", "socket", "threading", "time", "selectors", "select"}
