# Contender: http.server.ThreadingHTTPServer (a thread per connection, daemon threads,
# listen backlog 5) running http_handler.Handler, in three variants of one script:
#
#   python bench/servers/http_stdlib.py --port 0             the standard library as shipped
#   python bench/servers/http_stdlib.py --port 0 --nodelay   TCP_NODELAY set by hand in setup()
#   python bench/servers/http_stdlib.py --port 0 --install   servekit.install() first
#
# --install is "the same script with servekit.install() first": install() must run
# before anything imports socketserver (it raises InstallError otherwise), so this
# script parses its arguments with argparse alone and imports common.py, http.server
# and the handler only afterwards. Same READY contract as every contender (common.py).
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description="http.server.ThreadingHTTPServer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--nodelay", action="store_true", help="TCP_NODELAY in setup()")
    parser.add_argument("--install", action="store_true", help="servekit.install() first")
    args = parser.parse_args()
    if args.install:
        # After PYTHONPATH and any installed servekit: the drivers choose which one.
        sys.path.append(str(Path(__file__).resolve().parents[2] / "src"))
        import servekit

        servekit.install()

    import http.server

    from common import serve_until_signal
    from http_handler import Handler, NoDelayHandler

    handler = NoDelayHandler if args.nodelay else Handler
    server = http.server.ThreadingHTTPServer((args.host, args.port), handler)
    serve_until_signal(server)


if __name__ == "__main__":
    main()
