"""servekit.install(): the standard library's servers run on servekit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import servekit

SRC = str(Path(servekit.__file__).resolve().parent.parent)

# Each scenario runs in a fresh interpreter: install() is about import order.
PRELUDE = textwrap.dedent(
    """
    import threading, urllib.request, sys
    import servekit
    servekit.install()
    import socketserver
    assert socketserver is servekit, socketserver

    def serve(server):
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        assert server.wait_serving(10)
        return thread

    def stop(server, thread):
        server.shutdown()
        thread.join(10)
        server.server_close()
    """
)


def run(body: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_http_server_runs_on_servekit() -> None:
    """http.server.ThreadingHTTPServer built after install() is a servekit server and answers GET."""
    out = run(
        """
        import http.server
        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"hello from " + type(self.server).__mro__[-3].__module__.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        assert isinstance(server, servekit.ThreadingMixIn)
        assert isinstance(server, servekit.TCPServer)
        thread = serve(server)
        url = "http://127.0.0.1:%d/" % server.server_address[1]
        with urllib.request.urlopen(url, timeout=10) as response:
            print(response.status, response.read().decode())
        stop(server, thread)
        """
    )
    assert out.strip() == "200 hello from socketserver"


def test_xmlrpc_round_trip_on_servekit() -> None:
    """An XML-RPC call reaches a SimpleXMLRPCServer that runs on servekit."""
    out = run(
        """
        import xmlrpc.server, xmlrpc.client
        server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        assert isinstance(server, servekit.TCPServer)
        server.register_function(lambda a, b: a + b, "add")
        thread = serve(server)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/" % server.server_address[1])
        print(proxy.add(2, 40))
        stop(server, thread)
        """
    )
    assert out.strip() == "42"


def test_wsgiref_app_on_servekit() -> None:
    """A WSGI app served by wsgiref.simple_server answers through servekit."""
    out = run(
        """
        import wsgiref.simple_server
        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ["PATH_INFO"].encode()]
        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass
        server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
        assert isinstance(server, servekit.TCPServer)
        thread = serve(server)
        url = "http://127.0.0.1:%d/wsgi-path" % server.server_address[1]
        with urllib.request.urlopen(url, timeout=10) as response:
            print(response.read().decode())
        stop(server, thread)
        """
    )
    assert out.strip() == "/wsgi-path"


def test_install_after_import_names_the_modules() -> None:
    """install() after http.server was imported raises InstallError naming http.server."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import http.server, servekit\n"
            "try:\n"
            "    servekit.install()\n"
            "except servekit.InstallError as e:\n"
            "    print(e)\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    assert "http.server" in proc.stdout
    assert "before these modules are imported" in proc.stdout


def test_uninstall_restores_the_standard_library() -> None:
    """After uninstall(), import socketserver gives the stdlib again and class modules are restored."""
    out = run(
        """
        assert servekit.TCPServer.__module__ == "socketserver"
        servekit.uninstall()
        import importlib
        sys.modules.pop("socketserver", None)
        stdlib = importlib.import_module("socketserver")
        print(stdlib is servekit, servekit.TCPServer.__module__, servekit.installed())
        """
    )
    assert out.split() == ["False", "servekit.core.sockets", "False"]


def test_install_is_idempotent_and_plain_import_unaffected() -> None:
    """install() twice is harmless, and importing servekit alone does not touch socketserver."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, servekit\n"
            "assert 'socketserver' not in sys.modules\n"
            "servekit.install(); servekit.install()\n"
            "import socketserver; print(socketserver is servekit)\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_install_blames_only_modules_that_hold_socketserver() -> None:
    """install() after `import logging.config` names logging.config alone, not io or selectors, whose classes socketserver merely imported."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging.config, servekit\n"
            "try:\n"
            "    servekit.install()\n"
            "except servekit.InstallError as e:\n"
            "    print(str(e).rsplit(': ', 1)[1])\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(", ") == ["logging.config\n"]


def test_install_still_names_a_module_holding_a_stdlib_class() -> None:
    """A module that imported one class from the stdlib socketserver is named, since it would keep running on the stdlib."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, types\n"
            "mod = types.ModuleType('holder'); sys.modules['holder'] = mod\n"
            "exec('from socketserver import ThreadingTCPServer', mod.__dict__)\n"
            "import servekit\n"
            "try:\n"
            "    servekit.install()\n"
            "except servekit.InstallError as e:\n"
            "    print(str(e).rsplit(': ', 1)[1])\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "holder"
