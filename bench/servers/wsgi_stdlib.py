# Contender: the standard library's WSGI server, wsgiref.simple_server, made concurrent
# the way the stdlib offers (socketserver.ThreadingMixIn: a thread per connection,
# daemon threads), serving wsgi_hello.app. Its handler speaks HTTP/1.0 and closes the
# connection after every response, and logs every request to stderr, as shipped.
# The baseline of the WSGI table; same READY contract as every contender (common.py).
from __future__ import annotations

import socketserver
from wsgiref.simple_server import WSGIServer, make_server

from common import parse_args, serve_until_signal
from wsgi_hello import app


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def main() -> None:
    args = parse_args("wsgiref.simple_server with ThreadingMixIn")
    server = make_server(args.host, args.port, app, server_class=ThreadingWSGIServer)
    serve_until_signal(server)


if __name__ == "__main__":
    main()
