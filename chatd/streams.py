"""asyncio.start_server, with less memory held by each idle connection.

The connections are asyncio's own StreamReader and StreamWriter; only the protocol
between them and the transport is a subclass, which keeps the writers waiting in
``drain()`` in a list instead of a deque. asyncio makes that deque for every
connection up front, and a deque allocates a block of 64 slots: 760 bytes per
connection (tracemalloc, Python 3.11), 13% of an idle connection's cost, for a
queue that holds a waiter only while a client is not reading. An empty list is
56 bytes and does all the base class asks of it: append, remove, iterate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# asyncio's default: a StreamReader pauses its transport past twice this many bytes.
STREAM_LIMIT = 64 * 1024

Accept = Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]


class LeanStreamProtocol(asyncio.StreamReaderProtocol):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        accept: Accept,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(reader, accept, loop=loop)
        # FlowControlMixin's (3.11-3.13): appended to, removed from and iterated only.
        self._drain_waiters: list[asyncio.Future[None]] = []


async def start_server(
    accept: Accept, host: str | None = None, port: int | None = None, **kwargs: Any
) -> asyncio.Server:
    """asyncio.start_server(accept, host, port, **kwargs), each connection on a
    LeanStreamProtocol; kwargs go to loop.create_server (sock, ssl, backlog...)."""
    loop = asyncio.get_running_loop()

    def protocol() -> LeanStreamProtocol:
        return LeanStreamProtocol(asyncio.StreamReader(STREAM_LIMIT, loop), accept, loop)

    create: Callable[..., Awaitable[asyncio.Server]] = loop.create_server
    return await create(protocol, host, port, **kwargs)
