# Contender: asyncio streams (asyncio.start_server, defaults: backlog 100) with the
# line echo written on StreamReader.readline(); UDP through a DatagramProtocol.
# uvloop_server.py runs this same code on uvloop's event loop.
from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import cast

from common import announce, parse_args


async def echo_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass  # the churn client resets; see handlers.LineEchoHandler
    except asyncio.CancelledError:
        # Only asyncio.run() cancels a handler, on the way out after SIGTERM. Ending
        # quietly spares stderr a traceback per open connection: CPython 3.11's
        # StreamReaderProtocol calls task.exception() on the cancelled task, which
        # raises (fixed in 3.13.0; 3.12.1 still has it).
        writer.close()
        return
    writer.close()
    # wait_closed() retrieves the connection's final error (a reset) from the future
    # that holds it; left alone, asyncio may log it at garbage collection as "Future
    # exception was never retrieved" (seen once in a full run, with uvloop).
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        await writer.wait_closed()


class DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not a subclass of asyncio.DatagramTransport, so
        # no isinstance() check; both have sendto().
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(host: str, port: int, udp: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if udp:
        transport, _ = await loop.create_datagram_endpoint(DatagramEcho, local_addr=(host, port))
        announce(transport.get_extra_info("sockname")[1])
        try:
            await stop.wait()
        finally:
            transport.close()
        return
    server = await asyncio.start_server(echo_lines, host, port)
    announce(server.sockets[0].getsockname()[1])
    try:
        await stop.wait()
    finally:
        # Close the listener without wait_closed(): from Python 3.12 on it also waits
        # for every open connection, and a client that never closes would hold the
        # shutdown. asyncio.run() cancels the remaining handlers on the way out.
        server.close()


def main(description: str = "asyncio streams") -> None:
    args = parse_args(description)
    asyncio.run(serve(args.host, args.port, args.udp))


if __name__ == "__main__":
    main()
