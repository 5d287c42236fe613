"""ListenersMixIn and bind_listeners(): several addresses, Unix socket files, inherited sockets, socket options."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import servekit
from servekit.features.addresses import AddressError
from servekit.features.listeners import (
    ListenerError,
    ListenerOptions,
    ListenersMixIn,
    bind_listener,
    bind_listeners,
    effective_backlog,
)
from servekit.features.pool import ThreadPoolMixIn
from servekit.knobs import SettingError
from servekit.testing import LOCALHOST, LOCALHOST_V6, connect, has_ipv6_loopback, serving

pytestmark = pytest.mark.timeout(20)


class LineEcho(servekit.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class DatagramEcho(servekit.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


class PoolServer(ListenersMixIn, ThreadPoolMixIn, servekit.TCPServer):
    """The production composition: several listeners, a bounded pool."""


class PlainServer(ListenersMixIn, servekit.TCPServer):
    """No concurrency mix-in: accept_batch is 1, so the listeners stay blocking."""


class DatagramServer(ListenersMixIn, ThreadPoolMixIn, servekit.UDPServer):
    """Datagram listeners on a pool."""


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for socket files (sun_path holds 107 bytes; tmp_path can be long)."""
    path = tempfile.mkdtemp(prefix="sk-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def new_sockets(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """Every socket.socket created from now on, to check that none was made or leaked."""
    created: list[socket.socket] = []
    real_init = socket.socket.__init__

    def spy(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(socket.socket, "__init__", spy)
    return created


def echo(address: Any, line: bytes = b"ping\n") -> bytes:
    with connect(address) as sock, sock.makefile("rb") as reader:
        sock.sendall(line)
        return reader.readline()


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def stale_socket_file(path: str) -> None:
    """Leave a socket file with nothing behind it, as a crashed server does."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.close()


# -- several addresses ---------------------------------------------------------------------


@needs_ipv6
def test_ipv4_ipv6_and_unix_listeners_all_answer(sockdir: str) -> None:
    """One pool server listens on IPv4, IPv6, a Unix path and an abstract name, and each answers."""
    path = os.path.join(sockdir, "app.sock")
    addresses = ["tcp://127.0.0.1:0", "[::1]:0", f"unix:{path}", f"unix:@sk-test-{os.getpid()}"]
    with PoolServer(addresses, LineEcho) as server, serving(server):
        assert len(server.sockets) == 4
        assert server.socket is server.sockets[0]
        assert server.fileno() == server.sockets[0].fileno()
        v4, v6, unix, abstract = server.server_addresses
        assert v4[0] == LOCALHOST and v4[1] != 0
        assert v6[0] == LOCALHOST_V6 and v6[1] != 0
        assert (unix, abstract) == (path, f"\0sk-test-{os.getpid()}")
        assert server.server_address == v4
        # The pool takes connections in batches, which needs non-blocking listeners.
        assert not any(sock.getblocking() for sock in server.sockets)
        for address in server.server_addresses:
            assert echo(address) == b"ping\n"


def test_a_single_address_string_works() -> None:
    """A plain string is one address; server_address has the real port."""
    with PoolServer("127.0.0.1:0", LineEcho) as server, serving(server):
        assert len(server.sockets) == 1
        assert server.server_address[1] != 0
        assert echo(server.server_address) == b"ping\n"


def test_handle_request_serves_whichever_listener_is_ready() -> None:
    """handle_request() without a loop takes the connection from the listener it arrived on."""
    abstract = f"unix:@sk-handle-request-{os.getpid()}"
    with PlainServer(["127.0.0.1:0", abstract], LineEcho) as server:
        assert all(sock.getblocking() for sock in server.sockets)
        second = server.server_addresses[1]
        with connect(second) as client, client.makefile("rb") as reader:
            client.sendall(b"second\n")
            server.handle_request()
            assert reader.readline() == b"second\n"


def test_socket_made_by_the_constructor_becomes_the_first_listener() -> None:
    """With bind_and_activate=False, options set on server.socket before server_bind() are kept: that socket becomes the first listener."""
    addresses = ["127.0.0.1:0", f"unix:@sk-late-bind-{os.getpid()}"]
    server = PlainServer(addresses, LineEcho, bind_and_activate=False)
    early = server.socket
    early.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    with server:
        server.server_bind()
        server.server_activate()
        assert server.socket is early
        assert early.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert early.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


@needs_ipv6
def test_dual_stack_ipv6_listener_accepts_ipv4_clients() -> None:
    """[::]:PORT sets IPV6_V6ONLY=0, so a client on 127.0.0.1 reaches it."""
    with PoolServer("[::]:0", LineEcho) as server, serving(server):
        assert server.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = server.server_address[1]
        assert echo((LOCALHOST, port)) == b"ping\n"
        assert echo((LOCALHOST_V6, port)) == b"ping\n"


@needs_ipv6
def test_ipv6_only_refuses_ipv4_clients() -> None:
    """ipv6_only=True sets IPV6_V6ONLY=1: IPv4 clients are refused, IPv6 ones served."""
    with PoolServer("[::]:0", LineEcho, ipv6_only=True) as server, serving(server):
        port = server.server_address[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOCALHOST, port), timeout=5)
        assert echo((LOCALHOST_V6, port)) == b"ping\n"


def test_udp_and_unix_datagram_listeners_answer(sockdir: str) -> None:
    """A datagram server on UDP and a Unix datagram path replies on the socket each datagram came in on."""
    path = os.path.join(sockdir, "dgram.sock")
    with DatagramServer(["udp://127.0.0.1:0", f"unix-dgram:{path}"], DatagramEcho) as server:
        with serving(server):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"over udp", server.server_addresses[0])
                assert client.recvfrom(100)[0] == b"over udp"
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.bind("")  # Linux autobind: an abstract name to reply to
                client.sendto(b"over unix", path)
                assert client.recvfrom(100)[0] == b"over unix"
        assert not os.path.exists(path)


def test_stream_and_datagram_addresses_cannot_be_mixed(new_sockets: list[socket.socket]) -> None:
    """Mixing stream and datagram listeners, or giving a server the other kind, is refused before any socket exists."""
    with pytest.raises(AddressError, match="cannot share a server") as mixed:
        PoolServer(["tcp://127.0.0.1:0", "udp://127.0.0.1:0"], LineEcho)
    assert "'udp://127.0.0.1:0'" in str(mixed.value)
    with pytest.raises(AddressError, match="datagram addresses given to a stream server"):
        PoolServer("udp://127.0.0.1:0", LineEcho)
    with pytest.raises(AddressError, match="stream addresses given to a datagram server"):
        DatagramServer("unix:@sk-not-dgram", DatagramEcho)
    assert new_sockets == []


def test_every_bad_address_is_reported_before_anything_binds(
    sockdir: str, new_sockets: list[socket.socket]
) -> None:
    """Two bad addresses among good ones are both named, and no socket (nor socket file) was created."""
    path = os.path.join(sockdir, "good.sock")
    with pytest.raises(AddressError) as info:
        PoolServer(["127.0.0.1:0", "bogus://x", f"unix:{path}", "127.0.0.1:99999"], LineEcho)
    assert "bogus" in str(info.value) and "99999" in str(info.value)
    assert new_sockets == []
    assert os.listdir(sockdir) == []


def test_failed_bind_of_a_later_address_closes_the_earlier_ones(
    sockdir: str, new_sockets: list[socket.socket]
) -> None:
    """When the third address is taken, the first two listeners are closed (and the socket file removed) and the error names the address."""
    path = os.path.join(sockdir, "first.sock")
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ListenerError) as info:
            PoolServer(["127.0.0.1:0", f"unix:{path}", busy], LineEcho)
    assert info.value.errno == errno.EADDRINUSE
    assert repr(busy) in str(info.value)
    assert new_sockets and all(sock.fileno() == -1 for sock in new_sockets)
    assert os.listdir(sockdir) == []


# -- Unix socket files ---------------------------------------------------------------------


def test_unix_socket_file_gets_its_mode_before_it_appears(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even under umask 0 the socket file appears at its path already with unix_socket_mode, and no temporary name is left behind."""
    path = os.path.join(sockdir, "app.sock")
    seen_at_publish: list[int] = []
    real_link = os.link

    def spy(src: str, dst: str, *args: Any, **kwargs: Any) -> None:
        # link() makes the path appear: the inode's mode at that instant is what any
        # client could ever see at the final path.
        seen_at_publish.append(mode_of(src))
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", spy)
    old_umask = os.umask(0)
    try:
        server = PoolServer(f"unix:{path}", LineEcho)
    finally:
        os.umask(old_umask)
    with server:
        assert seen_at_publish == [0o660]
        assert mode_of(path) == 0o660
        assert os.listdir(sockdir) == ["app.sock"]
    with PoolServer(f"unix:{path}", LineEcho, unix_socket_mode=0o600) as server:
        assert mode_of(path) == 0o600


@needs_root
def test_unix_socket_file_owner_and_group_are_set(sockdir: str) -> None:
    """unix_socket_owner and unix_socket_group take names or ids and are set before the file appears."""
    path = os.path.join(sockdir, "app.sock")
    with (
        PoolServer(
            f"unix:{path}", LineEcho, unix_socket_owner="nobody", unix_socket_group=1
        ) as server,
        serving(server),
    ):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid) == (pwd.getpwnam("nobody").pw_uid, 1)
        assert echo(path) == b"ping\n"  # root connects regardless of the owner
    with pytest.raises(SettingError, match="no such user"):
        PoolServer(f"unix:{path}", LineEcho, unix_socket_owner="no-such-user-sk")
    assert os.listdir(sockdir) == []


def test_bad_unix_socket_settings_are_refused() -> None:
    """A mode outside 0o000..0o777, or an owner that is neither a name nor an id, is a SettingError."""
    with pytest.raises(SettingError, match="0o777"):
        ListenerOptions(unix_socket_mode=0o4660)
    with pytest.raises(SettingError, match="name, a numeric id"):
        ListenerOptions(unix_socket_owner=-1)


def test_stale_socket_file_is_replaced(sockdir: str) -> None:
    """A socket file nobody listens on (a crashed server's) is replaced."""
    path = os.path.join(sockdir, "app.sock")
    stale_socket_file(path)
    with PoolServer(f"unix:{path}", LineEcho) as server, serving(server):
        assert echo(path) == b"ping\n"


def test_stale_socket_file_is_replaced_without_hard_links(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where link() is not permitted, the socket is published with rename() over the stale file."""
    path = os.path.join(sockdir, "app.sock")
    stale_socket_file(path)

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with PoolServer(f"unix:{path}", LineEcho) as server, serving(server):
        assert mode_of(path) == 0o660
        assert os.listdir(sockdir) == ["app.sock"]
        assert echo(path) == b"ping\n"


@pytest.mark.parametrize("other_kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_live_socket_is_never_stolen(
    sockdir: str, other_kind: int, new_sockets: list[socket.socket]
) -> None:
    """A path another server is bound to (stream or datagram) is refused with its name; the other server keeps working."""
    path = os.path.join(sockdir, "app.sock")
    with socket.socket(socket.AF_UNIX, other_kind) as other:
        other.bind(path)
        if other_kind == socket.SOCK_STREAM:
            other.listen()
        before = os.lstat(path).st_ino
        with pytest.raises(ListenerError) as info:
            PoolServer(["127.0.0.1:0", f"unix:{path}"], LineEcho)
        assert info.value.errno == errno.EADDRINUSE
        assert path in str(info.value) and "another server" in str(info.value)
        assert os.lstat(path).st_ino == before
        ours = [sock for sock in new_sockets if sock is not other]
        assert ours and all(sock.fileno() == -1 for sock in ours)
        if other_kind == socket.SOCK_STREAM:
            # The liveness check was one connection, closed at once: the other server
            # sees it as a client that said nothing.
            probe, _ = other.accept()
            with probe:
                assert probe.recv(10) == b""
            with connect(path) as client:
                peer, _ = other.accept()
                with peer:
                    client.sendall(b"still mine")
                    assert peer.recv(100) == b"still mine"


def test_path_that_is_not_a_socket_is_refused_and_untouched(sockdir: str) -> None:
    """A regular file at the path is refused with a clear error and left as it was."""
    path = os.path.join(sockdir, "app.sock")
    with open(path, "w") as fh:
        fh.write("precious")
    with pytest.raises(ListenerError, match="is a regular file, not a socket; not removing it"):
        PoolServer(f"unix:{path}", LineEcho)
    with open(path) as fh:
        assert fh.read() == "precious"
    assert os.listdir(sockdir) == ["app.sock"]


def test_socket_file_is_removed_on_close(sockdir: str) -> None:
    """server_close() removes the socket file the server created."""
    path = os.path.join(sockdir, "app.sock")
    with PoolServer(f"unix:{path}", LineEcho):
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert not os.path.exists(path)


def test_a_successors_socket_file_is_not_removed(sockdir: str) -> None:
    """If another server has replaced the socket file meanwhile, server_close() leaves the new one alone."""
    path = os.path.join(sockdir, "app.sock")
    old = PoolServer(f"unix:{path}", LineEcho)
    os.unlink(path)  # as a successor's deployment script would, before it starts
    with PoolServer(f"unix:{path}", LineEcho) as successor, serving(successor):
        old.server_close()
        assert echo(path) == b"ping\n"
    assert not os.path.exists(path)


@needs_fork
def test_forked_child_does_not_remove_the_socket_file(sockdir: str) -> None:
    """server_close() in a forked child (a pre-fork worker, a ForkingMixIn child) leaves the parent's socket file."""
    path = os.path.join(sockdir, "app.sock")
    with PlainServer(f"unix:{path}", LineEcho) as server:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit only
            status = 1
            try:
                server.server_close()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert echo_blocking(server, path) == b"ping\n"
    assert not os.path.exists(path)


def echo_blocking(server: PlainServer, address: Any) -> bytes:
    with connect(address) as client, client.makefile("rb") as reader:
        client.sendall(b"ping\n")
        server.handle_request()
        return reader.readline()


def test_abstract_socket_has_no_file() -> None:
    """unix:@name binds in the abstract namespace: it answers and there is no file to manage."""
    name = f"sk-abstract-{os.getpid()}"
    with PoolServer(f"unix:@{name}", LineEcho) as server, serving(server):
        assert server.server_address == "\0" + name
        assert echo("\0" + name) == b"ping\n"
    with socket.socket(socket.AF_UNIX) as again:
        again.bind("\0" + name)  # free again: closing released the name


# -- inherited sockets ---------------------------------------------------------------------


def test_fd_number_is_adopted_and_closed_with_the_server() -> None:
    """fd://N serves on the listening socket at descriptor N, without re-binding it."""
    with socket.socket() as original:
        original.bind((LOCALHOST, 0))
        original.listen()
        fd = os.dup(original.fileno())
        with PoolServer(f"fd://{fd}", LineEcho) as server, serving(server):
            assert server.socket.fileno() == fd
            assert server.server_address == original.getsockname()
            assert not os.get_inheritable(fd)
            assert echo(original.getsockname()) == b"ping\n"
        with pytest.raises(OSError):
            os.fstat(fd)


def test_inherited_unix_socket_file_is_never_removed(sockdir: str) -> None:
    """An inherited Unix socket's file belongs to whoever bound it: closing the server leaves it."""
    path = os.path.join(sockdir, "inherited.sock")
    with socket.socket(socket.AF_UNIX) as original:
        original.bind(path)
        original.listen()
        with PoolServer(f"fd://{os.dup(original.fileno())}", LineEcho) as server, serving(server):
            assert server.server_address == path
            assert echo(path) == b"ping\n"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_fd_that_cannot_serve_is_refused_and_left_open() -> None:
    """A pipe, a connected socket, a datagram socket for a stream server, or a closed descriptor: each a clear error, the descriptor as it was."""
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ListenerError, match="is a FIFO, not a socket") as info:
            PoolServer(f"fd://{read_end}", LineEcho)
        assert info.value.errno == errno.ENOTSOCK
        os.fstat(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    with socket.socket() as unbound:
        fd = os.dup(unbound.fileno())
        os.set_inheritable(fd, True)
        with pytest.raises(ListenerError, match="stream socket that is not listening"):
            PoolServer(f"fd://{fd}", LineEcho)
        assert os.get_inheritable(fd)  # given back exactly as found
        os.close(fd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram:
        fd = os.dup(datagram.fileno())
        with pytest.raises(AddressError, match="datagram addresses given to a stream server"):
            PoolServer(f"fd://{fd}", LineEcho)
        os.fstat(fd)
        os.close(fd)
    with pytest.raises(ListenerError, match="is not open") as info:
        PoolServer(f"fd://{fd}", LineEcho)
    assert info.value.errno == errno.EBADF


SYSTEMD_CHILD = textwrap.dedent(
    """
    import fcntl, os, sys
    import servekit
    from servekit.features.listeners import ListenerError, ListenersMixIn

    # As systemd does: the passed sockets at 3, 4, ..., and the variables set for this
    # very process (LISTEN_PID is the pid after exec).
    high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:]]
    for number, fd in enumerate(high, start=3):
        os.dup2(fd, number)
        os.close(fd)
    os.environ.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(high)), LISTEN_FDNAMES="web:web"
    )

    class Echo(servekit.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline())

    class Server(ListenersMixIn, servekit.TCPServer):
        pass

    try:
        Server("fd://api", Echo)
    except ListenerError as exc:
        print("refused:", exc, flush=True)
    with Server("fd://web", Echo) as server:
        print("listening on", len(server.sockets), "sockets", flush=True)
        print("environment cleared:", "LISTEN_FDS" not in os.environ, flush=True)
        server.handle_request()
        server.handle_request()
    """
)


@needs_ipv6
def test_fd_name_takes_every_socket_systemd_passed_under_that_name() -> None:
    """fd://NAME adopts the sockets named NAME in LISTEN_FDNAMES (both, when two share it); an unknown name lists those available."""
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6:
        for sock, host in ((v4, LOCALHOST), (v6, LOCALHOST_V6)):
            sock.bind((host, 0))
            sock.listen()
        fds = [v4.fileno(), v6.fileno()]
        child = subprocess.Popen(
            [sys.executable, "-c", SYSTEMD_CHILD, *map(str, fds)],
            pass_fds=fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The kernel queues these in the backlog until the child accepts them.
            replies = [echo(sock.getsockname()[:2], b"%d\n" % i) for i, sock in enumerate((v4, v6))]
            out, err = child.communicate(timeout=15)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 0, err
    assert replies == [b"0\n", b"1\n"]
    assert out.splitlines() == [
        "refused: 'fd://api': no inherited socket is named 'api'; the service manager "
        "passed 'web' (fd 3), 'web' (fd 4)",
        "listening on 2 sockets",
        "environment cleared: True",
    ]


# -- socket options ------------------------------------------------------------------------


class OptionsSeen:
    """A handler that records the options of the connection it was given."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.done = threading.Event()

    def handler(self) -> type[servekit.BaseRequestHandler]:
        record = self

        class Inspect(servekit.StreamRequestHandler):
            def handle(self) -> None:
                sock = self.connection
                for name, level, option in (
                    ("nodelay", socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    ("keepalive", socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    ("keepidle", socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    ("keepintvl", socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    ("keepcnt", socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                ):
                    record.seen[name] = sock.getsockopt(level, option)
                record.done.set()
                self.wfile.write(self.rfile.readline())

        return Inspect


def test_accepted_connections_get_nodelay_and_no_keepalive_by_default() -> None:
    """By default every accepted TCP connection has TCP_NODELAY on and keep-alive off."""
    record = OptionsSeen()
    with PoolServer("127.0.0.1:0", record.handler()) as server, serving(server):
        assert echo(server.server_address) == b"ping\n"
    assert record.done.is_set()
    assert record.seen["nodelay"] == 1 and record.seen["keepalive"] == 0


def test_keepalive_settings_reach_accepted_connections() -> None:
    """tcp_keepalive with tcp_keepidle/intvl/cnt are in force on the accepted connection; tcp_nodelay=False leaves Nagle on."""
    record = OptionsSeen()
    with (
        PoolServer(
            "127.0.0.1:0",
            record.handler(),
            tcp_nodelay=False,
            tcp_keepalive=True,
            tcp_keepidle=33,
            tcp_keepintvl=7,
            tcp_keepcnt=4,
        ) as server,
        serving(server),
    ):
        assert echo(server.server_address) == b"ping\n"
    assert record.seen == {
        "nodelay": 0,
        "keepalive": 1,
        "keepidle": 33,
        "keepintvl": 7,
        "keepcnt": 4,
    }


def listen_backlog(port: int) -> int:
    """The backlog of the TCP listener on port, as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_backlog_reaches_listen_and_is_clamped_to_somaxconn() -> None:
    """backlog=77 is the kernel's queue length for the listener; a huge backlog is clamped to net.core.somaxconn."""
    with PoolServer("127.0.0.1:0", LineEcho, backlog=77) as server:
        assert listen_backlog(server.server_address[1]) == 77
        assert server.request_queue_size == 77
    with PoolServer("127.0.0.1:0", LineEcho, backlog=10**6) as server:
        limit = effective_backlog(10**6)
        with open("/proc/sys/net/core/somaxconn") as fh:
            assert limit == min(int(fh.read()), 65535)
        assert listen_backlog(server.server_address[1]) == limit
        assert server.request_queue_size == limit


def test_reuse_address_lets_a_restart_bind_over_time_wait() -> None:
    """SO_REUSEADDR is on for TCP listeners by default, so a restarted server rebinds its port while the old connection is in TIME_WAIT."""
    with PoolServer("127.0.0.1:0", LineEcho) as server, serving(server):
        address = server.server_address
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        with connect(address) as client, client.makefile("rb") as reader:
            client.sendall(b"ping\n")
            assert reader.readline() == b"ping\n"
            # EOF before we close: the server closed first, so the old connection
            # (FIN_WAIT_2, then TIME_WAIT) holds the server's port.
            assert reader.read() == b""
    with socket.socket() as plain, pytest.raises(OSError) as info:
        plain.bind(address)
    assert info.value.errno == errno.EADDRINUSE
    with PoolServer(f"127.0.0.1:{address[1]}", LineEcho) as again, serving(again):
        assert echo(address) == b"ping\n"


def test_so_reuseport_lets_two_servers_share_an_address() -> None:
    """so_reuseport=True lets a second listener bind the same TCP port."""
    with PoolServer("127.0.0.1:0", LineEcho, so_reuseport=True) as first:
        port = first.server_address[1]
        with PoolServer(f"127.0.0.1:{port}", LineEcho, so_reuseport=True) as second:
            assert second.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


# -- the helpers ---------------------------------------------------------------------------


def test_bind_listeners_gives_listeners_whose_close_removes_the_file(sockdir: str) -> None:
    """bind_listeners() returns listening sockets with their addresses; closing a Listener removes its socket file."""
    path = os.path.join(sockdir, "helper.sock")
    listeners = bind_listeners(["127.0.0.1:0", f"unix:{path}"], ListenerOptions(backlog=8))
    try:
        tcp, unix = listeners
        assert tcp.name[1] != 0 and unix.name == path
        with connect(tcp.name), connect(path):
            pass  # both are listening already
    finally:
        for listener in listeners:
            listener.close()
    assert os.listdir(sockdir) == []


def test_bind_listener_returns_a_listening_socket() -> None:
    """bind_listener(address) is one listening socket, for the CLI and the pre-fork supervisor."""
    with bind_listener("127.0.0.1:0") as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        with connect(sock.getsockname()):
            conn, _ = sock.accept()
            conn.close()
