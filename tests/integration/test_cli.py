"""The servekit command: the echo server, settings, signals, systemd notifications."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from servekit.config.schema import command_settings
from tests.integration.procs import ROOT, ServerProcess

pytestmark = pytest.mark.timeout(60)


def run_cli(
    *args: str, env: dict[str, str] | None = None, path: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion; path is prepended to PYTHONPATH (for handler modules)."""
    pythonpath = f"{path + ':' if path else ''}{ROOT / 'src'}:{ROOT}"
    return subprocess.run(
        [sys.executable, "-m", "servekit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**_clean_environ(), "PYTHONPATH": pythonpath, **(env or {})},
    )


def _clean_environ() -> dict[str, str]:
    # A SERVEKIT_* variable in the developer's shell must not change what these test.
    return {k: v for k, v in os.environ.items() if not k.startswith("SERVEKIT_")}


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *parts: str) -> None:
    """Exit status 2, exactly one line on stderr, no traceback, every part in it."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("servekit: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_echo_serves_and_stops_on_sigint() -> None:
    """`servekit echo` prints one ready line, echoes lines, and Ctrl-C stops it with status 0."""
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0") as server:
        server.wait_ready()
        assert server.request(b"hello\n") == b"hello\n"
        server.send(signal.SIGINT)
        assert server.wait() == 0
        assert server.count("servekit: stopped") == 1
        assert server.count("servekit: ready: echo on tcp://127.0.0.1:") == 1


def test_echo_with_workers_and_threads() -> None:
    """`--workers 2 --threads 4` runs two workers and announces it; SIGTERM stops them."""
    with ServerProcess.cli(
        "echo", "--bind", "127.0.0.1:0", "--workers", "2", "--threads", "4"
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 4 threads") == 1
        assert len(server.workers()) == 2
        for _ in range(10):
            assert server.request(b"w\n") == b"w\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


def test_echo_refuses_an_overlong_line() -> None:
    """A client that never sends a newline gets an error line and is closed, not buffered forever."""
    with ServerProcess.cli("echo", "--bind", "127.0.0.1:0", "--wait-for-request", "none") as server:
        server.wait_ready()
        with server.connect() as sock, sock.makefile("rb") as reader:
            sock.sendall(b"x" * 70000)
            assert reader.readline() == b"error: line longer than 65536 bytes\n"
            assert reader.read() == b""
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_udp_echo() -> None:
    """`--bind udp://...` serves datagrams."""
    with ServerProcess.cli("echo", "--bind", "udp://127.0.0.1:0") as server:
        server.wait_ready()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"dgram", ("127.0.0.1", server.port))
            assert client.recvfrom(100)[0] == b"dgram"
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_serve_a_handler_class() -> None:
    """`servekit serve module:Class` runs a user's handler."""
    with ServerProcess.cli(
        "serve", "tests.integration.apps:PidEcho", "--bind", "127.0.0.1:0"
    ) as server:
        server.wait_ready()
        reply = server.request(b"hi\n")
        assert reply == b"%d hi\n" % server.pid
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_settings_precedence_flag_env_file(tmp_path: Path) -> None:
    """Flags beat environment variables, which beat the config file."""
    config = tmp_path / "servekit.toml"
    config.write_text(
        '[server]\nbind = "127.0.0.1:0"\n[pool]\nmax_threads = 3\n[prefork]\nworkers = 2\n'
    )
    with ServerProcess.cli("echo", "--config", str(config)) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 3 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    with ServerProcess.cli(
        "echo", "--config", str(config), env={"SERVEKIT_THREADS": "5"}
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 5 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    with ServerProcess.cli(
        "echo", "--config", str(config), "--threads", "7", env={"SERVEKIT_THREADS": "5"}
    ) as server:
        server.wait_ready()
        assert server.count(r"2 workers x 7 threads") == 1
        server.send(signal.SIGTERM)
        assert server.wait() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--bind", "localhost"], "command line: --bind: missing ':PORT'"),
        (["echo", "--bind", "127.0.0.1:99999"], "out of range"),
        (["echo", "--threads", "0"], "command line: --threads '0': must be greater than 0"),
        (["echo", "--threads", "many"], "command line: --threads 'many': expected an integer"),
        (["echo", "--threads", "4.5"], "--threads '4.5': expected an integer"),
        (["echo", "--log-level", "verbose"], "expected one of debug, info, warning, error"),
        (["echo", "--proxy-protocol", "v3"], "expected one of off, v1, v2, any"),
        (["echo", "--max-requests", "5"], "--max-requests: needs --workers 2 or more"),
        (["echo", "--tls-handshake-timeout", "3"], "needs --certfile"),
        (["echo", "--user", "no-such-user-here"], "--user 'no-such-user-here': no such user"),
        (["echo", "--pid", "/no/such/directory/servekit.pid"], "does not exist"),
        (["echo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["serve"], "servekit serve needs a handler class"),
        (["serve", "no_such_module:Handler"], "cannot import 'no_such_module'"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str) -> None:
    """Bad command-line input exits with status 2 and one line naming the problem."""
    assert_one_line_error(run_cli(*args), message)


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    """A misspelt key in the config file is an error, not silently ignored."""
    config = tmp_path / "bad.toml"
    config.write_text("[pool]\nmax_thread = 3\n")
    assert_one_line_error(
        run_cli("echo", "--config", str(config)), "unknown setting pool.max_thread"
    )


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[pool]\nmax_threads = 4.5\n", "pool.max_threads = 4.5", "expected an integer"),
        ("[pool]\nmax_threads = -4\n", "pool.max_threads = -4", "expected an integer"),
        ('[prefork]\nworkers = "2"\n', 'prefork.workers = "2"', "expected an integer"),
        ("[server]\nbind = 8000\n", "server.bind = 8000", "expected an address"),
        ('[server]\nlog_level = "verbose"\n', "server.log_level", "expected one of debug, info"),
        ("[pool]\nmax_thread = 3\n", "pool.max_thread", "did you mean max_threads?"),
        ('[limits]\nrequest_timeout = "soon"\n', "limits.request_timeout", "number of seconds"),
        ("[pool]\ndaemon_threads = true\n", "pool.daemon_threads", "only be set from Python"),
    ],
)
def test_wrong_config_files_stop_before_binding(
    tmp_path: Path, toml: str, key: str, expected: str
) -> None:
    """A wrong config file is exit status 2 and one line naming the file, the key and the expected type; nothing was bound."""
    socket_file = tmp_path / "never.sock"
    config = tmp_path / "servekit.toml"
    config.write_text(f"{toml}\n[listeners]\nbacklog = 8\n")
    proc = run_cli("echo", "--config", str(config), "--bind", f"unix:{socket_file}")
    assert_one_line_error(proc, str(config), key, expected)
    assert not socket_file.exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVEKIT_THREADS": "4.5"}, "environment: SERVEKIT_THREADS='4.5': expected an integer"),
        ({"SERVEKIT_WORKERS": "-1"}, "environment: SERVEKIT_WORKERS='-1': must be greater than 0"),
        ({"SERVEKIT_LOG_LEVEL": "loud"}, "SERVEKIT_LOG_LEVEL='loud': expected one of debug"),
        ({"SERVEKIT_BIND": "8000"}, "SERVEKIT_BIND='8000': missing ':PORT'"),
        ({"SERVEKIT_MAX_THREADS": "4"}, "the variable for --threads is SERVEKIT_THREADS"),
        ({"SERVEKIT_DAEMON_THREADS": "1"}, "daemon_threads can only be set from Python"),
        # Read, not ignored: without a certificate it is refused as a TLS setting.
        (
            {"SERVEKIT_TLS_HANDSHAKE_TIMEOUT": "3"},
            "SERVEKIT_TLS_HANDSHAKE_TIMEOUT: needs --certfile",
        ),
    ],
)
def test_wrong_environment_is_one_line(env: dict[str, str], message: str) -> None:
    """A SERVEKIT_* variable of the wrong type, or under an old name, is exit status 2 and one line naming the variable."""
    assert_one_line_error(run_cli("echo", env=env), message)


def test_variables_are_named_after_the_flags() -> None:
    """SERVEKIT_THREADS, SERVEKIT_BIND and SERVEKIT_LOG_LEVEL are read."""
    with ServerProcess.cli(
        "echo",
        env={
            "SERVEKIT_THREADS": "5",
            "SERVEKIT_BIND": "127.0.0.1:0",
            "SERVEKIT_LOG_LEVEL": "warning",
        },
    ) as server:
        server.wait_ready()
        assert server.count(r"\(5 threads, pid") == 1
        assert server.request(b"env\n") == b"env\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        assert server.count(" INFO ") == 0  # warning level: no info lines


def test_config_print_shows_each_value_and_its_origin(tmp_path: Path) -> None:
    """`servekit config --print` prints the effective settings as TOML with the origin of each."""
    config = tmp_path / "servekit.toml"
    config.write_text(
        '[server]\nbind = "127.0.0.1:9999"\n[prefork]\nworkers = 3\n[pool]\nmax_threads = 9\n'
    )
    proc = run_cli(
        "config",
        "--print",
        "--config",
        str(config),
        "--threads",
        "11",
        env={"SERVEKIT_GRACEFUL_TIMEOUT": "12"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = {
        line.split("#")[0].strip(): line.split("#")[-1].strip()
        for line in proc.stdout.splitlines()
        if "=" in line
    }
    assert lines['bind = ["127.0.0.1:9999"]'] == f"file {config}"
    assert lines["workers = 3"] == f"file {config}"
    assert lines["max_threads = 11"] == "flag --threads"
    assert lines["graceful_timeout = 12.0"] == "environment SERVEKIT_GRACEFUL_TIMEOUT"
    assert lines["backlog = 1024"] == "default"
    assert lines['proxy_protocol = "off"'] == "default"


def test_config_print_refuses_what_the_server_would_refuse(tmp_path: Path) -> None:
    """`servekit config` checks like a real start: a bad value is the same one-line error."""
    config = tmp_path / "servekit.toml"
    config.write_text("[pool]\nmax_threads = 4.5\n")
    assert_one_line_error(run_cli("config", "--print", "-c", str(config)), "pool.max_threads = 4.5")
    proc = run_cli("config", "--threads", "4")
    assert proc.returncode == 0 and "valid" in proc.stdout


def test_serve_takes_its_target_from_the_config_file(tmp_path: Path) -> None:
    """`[server] target` in the config file names the handler when `servekit serve` is given none."""
    config = tmp_path / "servekit.toml"
    config.write_text('[server]\ntarget = "tests.integration.apps:PidEcho"\nbind = "127.0.0.1:0"\n')
    with ServerProcess.cli("serve", "--config", str(config)) as server:
        server.wait_ready()
        assert server.request(b"t\n") == b"%d t\n" % server.pid
        server.send(signal.SIGTERM)
        assert server.wait() == 0


def test_echo_refuses_a_target_in_the_config_file(tmp_path: Path) -> None:
    """`servekit echo` with `[server] target` in its config file is an error, not a silent swap of handler."""
    config = tmp_path / "servekit.toml"
    config.write_text('[server]\ntarget = "tests.integration.apps:PidEcho"\n')
    proc = run_cli("echo", "--config", str(config))
    assert_one_line_error(
        proc, str(config), "server.target", "servekit echo runs its built-in handler"
    )


MODULES = {
    "syntax_error_mod": "def broken(:\n",
    "raising_mod": "raise RuntimeError('database is down')\n",
    "exiting_mod": "import sys\nsys.exit(4)\n",
    "handlers_mod": (
        "import socketserver\n"
        "class Upper(socketserver.StreamRequestHandler):\n"
        "    def handle(self):\n"
        "        self.wfile.write(self.rfile.readline().upper())\n"
        "class NotAHandler:\n"
        "    pass\n"
        "class Duck:\n"
        "    def __init__(self, request, client_address, server):\n"
        "        request.sendall(b'duck\\n')\n"
        "    def handle(self):\n"
        "        pass\n"
        "def app(environ, start_response):\n"
        "    return []\n"
        "import servekit\n"
        "class Server(servekit.TCPServer):\n"
        "    pass\n"
        "import functools, http.server\n"
        "Files = functools.partial(http.server.SimpleHTTPRequestHandler, directory='/srv')\n"
        "NotOne = functools.partial(print, 'x')\n"
    ),
}


@pytest.fixture
def handler_modules(tmp_path: Path) -> str:
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    return str(tmp_path)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("syntax_error_mod:H", "cannot import 'syntax_error_mod'"),
        ("syntax_error_mod:H", "syntax error in"),
        ("raising_mod:H", "RuntimeError: database is down"),
        ("exiting_mod:H", "SystemExit: 4"),
        ("missing_mod:H", "cannot import 'missing_mod' for 'missing_mod:H': no such module"),
        ("handlers_mod:Lower", "module 'handlers_mod' has no attribute 'Lower'"),
        ("handlers_mod:Lower", "handler classes there: Duck, Upper"),
        (
            "handlers_mod:NotAHandler",
            "'handlers_mod:NotAHandler' is a class without a handle() method",
        ),
        ("handlers_mod:app", "is a function, not a request handler class"),
        ("handlers_mod:Server", "is a server class"),
        ("handlers_mod", "must be written module:Name"),
    ],
)
def test_bad_targets_are_one_line(handler_modules: str, target: str, message: str) -> None:
    """A handler module that cannot be imported, a missing attribute, or an object that is not a handler class: exit 2, one line naming the target."""
    proc = run_cli("serve", target, "--bind", "127.0.0.1:0", path=handler_modules)
    assert_one_line_error(proc, message)


def test_a_partial_of_a_handler_class_is_a_target(
    handler_modules: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """functools.partial(SimpleHTTPRequestHandler, directory=...) is what socketserver
    takes as a handler: the command takes it too, keeping its arguments; a partial of
    anything else is refused as before."""
    import functools

    from servekit.cli.targets import TargetError, load_handler

    monkeypatch.syspath_prepend(handler_modules)
    files = load_handler("handlers_mod:Files")
    assert isinstance(files, functools.partial)
    assert files.keywords == {"directory": "/srv"}
    assert issubclass(files.func, http.server.SimpleHTTPRequestHandler)
    with pytest.raises(TargetError, match="is a partial object, not a request handler"):
        load_handler("handlers_mod:NotOne")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("handlers_mod:Upper", "is a request handler class, not a WSGI application"),
        ("handlers_mod:nope", "module 'handlers_mod' has no attribute 'nope'"),
        ("raising_mod:app", "RuntimeError: database is down"),
        ("syntax_error_mod:app", "syntax error in"),
    ],
)
def test_bad_wsgi_targets_are_one_line(handler_modules: str, target: str, message: str) -> None:
    """`servekit wsgi` with an application that cannot be loaded: exit 2, one line naming the target."""
    proc = run_cli("wsgi", target, "--bind", "127.0.0.1:0", path=handler_modules)
    assert_one_line_error(proc, target, message)


def test_a_duck_typed_handler_class_is_served(handler_modules: str) -> None:
    """A class with handle() that is created as Class(request, client_address, server) is a handler, as socketserver sees it."""
    with ServerProcess.cli(
        "serve",
        "handlers_mod:Duck",
        "--bind",
        "127.0.0.1:0",
        "--wait-for-request",
        "none",
        env={"PYTHONPATH": f"{handler_modules}:{ROOT / 'src'}:{ROOT}"},
    ) as server:
        server.wait_ready()
        with server.connect() as sock, sock.makefile("rb") as reader:
            assert reader.readline() == b"duck\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0


RELOADABLE = (
    "import socketserver\n"
    "class H(socketserver.StreamRequestHandler):\n"
    "    def handle(self):\n"
    "        self.rfile.readline()\n"
    "        self.wfile.write({reply!r})\n"
)


def test_sighup_reloads_the_handler_in_a_single_process(tmp_path: Path) -> None:
    """SIGHUP on one process re-imports the handler's module: later connections run the edited code; an edit that does not import is one log line, and the previous handler goes on serving."""
    module = tmp_path / "reload_mod.py"
    module.write_text(RELOADABLE.format(reply=b"first\n"))
    env = {
        "PYTHONPATH": f"{tmp_path}:{ROOT / 'src'}:{ROOT}",
        # The edits below may land within the second the first .pyc was written.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    with ServerProcess.cli(
        "serve", "reload_mod:H", "--bind", "127.0.0.1:0", "--threads", "2", env=env
    ) as server:
        server.wait_ready()
        assert server.request(b"x\n") == b"first\n"
        module.write_text(RELOADABLE.format(reply=b"second version\n"))
        mark = len(server.lines)
        server.send(signal.SIGHUP)
        server.wait_for(r"\breloaded$", start=mark)
        assert server.request(b"x\n") == b"second version\n"

        module.write_text("class H(:\n")
        mark = len(server.lines)
        server.send(signal.SIGHUP)
        server.wait_for(
            r"reload failed; still serving with the previous setup: .*syntax error", start=mark
        )
        assert server.request(b"x\n") == b"second version\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        assert not any("Traceback" in line for line in server.lines), server.lines


def test_supervisor_log_lines_name_the_target() -> None:
    """With --workers 2, the supervisor's lines name what it runs (the command's target), not an internal class."""
    with ServerProcess.cli(
        "serve", "tests.integration.apps:PidEcho", "--bind", "127.0.0.1:0", "--workers", "2"
    ) as server:
        server.wait_ready()
        server.wait_for(r"tests\.integration\.apps:PidEcho: worker 1 started, pid \d+")
        server.send(signal.SIGTERM)
        assert server.wait() == 0
    assert not any("ServekitServer" in line for line in server.lines), server.lines


def test_help_shows_real_metavars_choices_and_defaults() -> None:
    """--help shows metavars that say what to type, the choices of enumerations, octal modes and the defaults the command applies."""
    text = run_cli("serve", "--help").stdout
    flat = " ".join(text.split())
    for bad in (
        "PARSE_OPTIONAL",
        "STR ",
        "INT ",
        "FLOAT ",
        "COMMA_LIST",
        "default 432",
        "(default 2)",
    ):
        assert bad not in text, bad
    assert "--graceful-timeout SECONDS" in text
    assert "--workers N" in text and "number of worker processes (default: 1)" in flat
    assert "--proxy-protocol {off,v1,v2,any}" in text
    assert "off serves clients directly (default: off)" in flat
    assert "--wait-for-request {none,data,line,head,auto}" in text
    assert "--unix-socket-mode MODE" in text and "(default: 0o660)" in flat
    assert "--certfile PATH" in text and "--pid FILE" in text
    echo = " ".join(run_cli("echo", "--help").stdout.split())
    # One default for every command: the handler says what to wait for (echo: a line).
    assert "what the handler class declares" in echo and "(default: auto)" in echo


def test_wsgi_command_is_listed_with_its_help() -> None:
    """`servekit wsgi --help` describes an optional MODULE:APP and takes every setting."""
    proc = run_cli("wsgi", "--help")
    assert proc.returncode == 0
    assert "[MODULE:APP]" in proc.stdout and "--threads N" in proc.stdout
    assert "wsgi" in run_cli("--help").stdout


def test_pid_file_is_written_after_binding_and_removed_on_exit(tmp_path: Path) -> None:
    """--pid FILE holds the supervisor's pid while it serves and is gone after SIGTERM."""
    pid_file = tmp_path / "run" / "servekit.pid"
    pid_file.parent.mkdir()
    with ServerProcess.cli(
        "echo", "--bind", "127.0.0.1:0", "--workers", "2", "--pid", str(pid_file)
    ) as server:
        server.wait_ready()
        assert pid_file.read_text() == f"{server.pid}\n"
        assert server.request(b"p\n") == b"p\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()
    assert not pid_file.exists()
    assert list(pid_file.parent.iterdir()) == []  # no temporary file either


def _ids(pid: int) -> tuple[list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return [int(u) for u in uid], [int(g) for g in gid]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_user_and_group_are_switched_after_binding() -> None:
    """As root, --user nobody: the supervisor and its workers run as nobody (real, effective, saved ids) and still serve."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    with ServerProcess.cli(
        "echo", "--bind", "127.0.0.1:0", "--workers", "2", "--user", "nobody"
    ) as server:
        server.wait_ready()
        for pid in [server.pid, *server.workers()]:
            uids, gids = _ids(pid)
            assert uids == [nobody.pw_uid] * 4, (pid, uids)
            assert gids == [nobody.pw_gid] * 4, (pid, gids)
        assert server.request(b"as nobody\n") == b"as nobody\n"
        server.send(signal.SIGTERM)
        assert server.wait() == 0
        server.assert_no_leftovers()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_pid_directory_must_be_writable_by_the_new_user(tmp_path: Path) -> None:
    """With --user, a pid file directory that user cannot write is refused before binding."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    proc = run_cli("echo", "--user", "nobody", "--pid", str(locked / "s.pid"))
    assert_one_line_error(proc, "--pid", "is not writable by uid")


def test_address_in_use_is_reported() -> None:
    """A port already taken gives a one-line error and status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run_cli("echo", "--bind", f"127.0.0.1:{taken.getsockname()[1]}")
    assert proc.returncode == 1
    assert "cannot listen on" in proc.stderr
    assert "Address already in use" in proc.stderr


def test_every_knob_has_a_flag_in_help() -> None:
    """The command line's flags are generated from the knob declarations."""
    text = run_cli("serve", "--help").stdout
    for setting in command_settings().values():
        assert setting.flag in text, setting.name


def _notify_socket(directory: str) -> tuple[socket.socket, str]:
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    return sock, path


@pytest.mark.parametrize("workers", ["1", "2"])
def test_systemd_ready_watchdog_stopping(workers: str) -> None:
    """Under systemd (NOTIFY_SOCKET, WATCHDOG_USEC) the server sends READY=1, watchdog pings, and STOPPING=1 on SIGTERM."""
    with tempfile.TemporaryDirectory() as directory:
        notify, path = _notify_socket(directory)
        with (
            notify,
            ServerProcess.cli(
                "echo",
                "--bind",
                "127.0.0.1:0",
                "--workers",
                workers,
                env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
            ) as server,
        ):
            messages = [notify.recv(4096).decode()]
            while not any("READY=1" in m for m in messages):
                messages.append(notify.recv(4096).decode())
            pings = 0
            while pings < 3:  # 0.4 s interval: a ping at least every 0.2 s
                if "WATCHDOG=1" in notify.recv(4096).decode():
                    pings += 1
            server.wait_ready()
            server.send(signal.SIGTERM)
            seen = ""
            while "STOPPING=1" not in seen:
                seen = notify.recv(4096).decode()
            assert server.wait() == 0
