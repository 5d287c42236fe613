# Contender: asyncio_server.py's code, unchanged, on uvloop's event loop.
from __future__ import annotations

import asyncio

import asyncio_server
import uvloop

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio_server.main("asyncio streams on uvloop")
