"""Run this interpreter's own test.test_socketserver against servekit.

Usage: python run_cpython_socketserver.py [unittest args...]

servekit.install() puts servekit in sys.modules["socketserver"] before the test module is
imported; the run then checks that the module under test really was servekit and that
its classes were the ones exercised. Exit status 0 only if every test passed and none was
skipped (each skip would hide a behaviour the stdlib passes on this platform).

Standalone on purpose: it needs nothing but the interpreter and servekit's source, so
every pyenv Python can run it without installing anything.
"""

from __future__ import annotations

import json
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "src")


def main(argv: list[str]) -> int:
    sys.path.insert(0, os.environ.get("SERVEKIT_SRC", SRC))
    import servekit

    servekit.install()
    import test.support

    test.support.verbose = "-v" in argv  # the suite prints per-server chatter otherwise
    import test.test_socketserver as suite_module

    # The suite must have bound servekit, not the stdlib module.
    if suite_module.socketserver is not servekit:
        print("conformance: test_socketserver did not import servekit", file=sys.stderr)
        return 3
    if servekit.TCPServer.__module__ != "socketserver":
        print("conformance: install() did not take effect", file=sys.stderr)
        return 3

    # Count server constructions so that "servekit was used" is a measured fact.
    constructed = {"n": 0}
    original_init = servekit.BaseServer.__init__

    def counting_init(self: object, *args: object, **kwargs: object) -> None:
        constructed["n"] += 1
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]

    servekit.BaseServer.__init__ = counting_init  # type: ignore[method-assign]

    program = unittest.main(module=suite_module, argv=["test_socketserver", *argv], exit=False)
    result = program.result
    summary = {
        "python": sys.version.split()[0],
        "servekit": servekit.__file__,
        "run": result.testsRun,
        "failures": len(result.failures),
        "errors": len(result.errors),
        "skipped": [f"{test.id()}: {reason}" for test, reason in result.skipped],
        "servers_constructed": constructed["n"],
    }
    print("CONFORMANCE " + json.dumps(summary), flush=True)
    ok = (
        result.wasSuccessful()
        and not result.skipped
        and result.testsRun > 0
        and constructed["n"] > 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
