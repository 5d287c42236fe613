"""Run this interpreter's own http.server, xmlrpc and wsgiref suites with servekit installed.

Usage: python run_cpython_stdlib_servers.py [unittest args...]

servekit.install() comes before the suites import http.server, xmlrpc.server and
wsgiref.simple_server, so their servers are servekit's. The run checks that each of
those modules really bound servekit and that servers were constructed through it. Exit
status 0 only if every test passed (the suites' own platform skips are reported, not
failed: they skip on the standard library too).

Standalone, like run_cpython_socketserver.py: every pyenv Python can run it.
"""

from __future__ import annotations

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")
SUITES = ("test.test_httpservers", "test.test_xmlrpc", "test.test_wsgiref")


def main(argv: list[str]) -> int:
    sys.path.insert(0, os.environ.get("SERVEKIT_SRC", SRC))
    import servekit

    servekit.install()
    import importlib

    import test.support

    test.support.verbose = "-v" in argv
    constructed = {"n": 0}
    original_init = servekit.BaseServer.__init__

    def counting_init(self: object, *args: object, **kwargs: object) -> None:
        constructed["n"] += 1
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]

    servekit.BaseServer.__init__ = counting_init  # type: ignore[method-assign]

    modules = [importlib.import_module(name) for name in SUITES]
    import http.server
    import wsgiref.simple_server
    import xmlrpc.server

    for server_class in (
        http.server.HTTPServer,
        xmlrpc.server.SimpleXMLRPCServer,
        wsgiref.simple_server.WSGIServer,
    ):
        if not issubclass(server_class, servekit.TCPServer):
            print(f"conformance: {server_class.__name__} is not on servekit", file=sys.stderr)
            return 3
    # Run module by module, with each module's own setUpModule()/tearDownModule().
    result = unittest.TestResult()
    for module in modules:
        module_suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        setup = getattr(module, "setUpModule", None)
        teardown = getattr(module, "tearDownModule", None)
        if setup is not None:
            setup()
        try:
            module_suite.run(result)
        finally:
            if teardown is not None:
                teardown()
    summary = {
        "python": sys.version.split()[0],
        "run": result.testsRun,
        "failures": [t.id() for t, _ in result.failures],
        "errors": [t.id() for t, _ in result.errors],
        "skipped": len(result.skipped),
        "servers_constructed": constructed["n"],
    }
    for test_case, trace in result.failures + result.errors:
        print(f"== {test_case.id()}\n{trace}", file=sys.stderr)
    print("CONFORMANCE " + json.dumps(summary), flush=True)
    ok = result.wasSuccessful() and result.testsRun > 0 and constructed["n"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
