"""asyncio.start_server, with less memory held by each idle connection.

The connections get asyncio's StreamReader and StreamWriter, through subclasses
that drop what a chatd connection never uses, measured with tracemalloc (Python
3.11, bytes per idle subscribed connection, out of 5,577 before):

- the protocol's writers waiting in ``drain()`` are a list, not a deque: asyncio
  makes the deque for every connection up front and a deque allocates a block of
  64 slots (760 B), for a queue that holds a waiter only while a client does not
  read; an empty list (56 B) does all the base class asks of it (append, remove,
  iterate);
- a connection waits for data on the reader's future itself (``read_now``), not in
  ``read()`` with a second coroutine (``_wait_for_data``) suspended under it: 216 B,
  then ~250 B more for ``read()``'s own frame;
- the protocol's close waiter and the writer's ``_complete_fut`` are one future,
  made done once per listener: two futures per connection (288 B) that nobody
  awaits (chatd does not call ``wait_closed()`` on a served connection; should
  anyone, a waiter of its own is made then);
- the protocol holds its reader directly, not through a weak reference (80 B).

And with fewer Python calls per read, the paced path's (one frame per read,
docs/benchmarks.md): ``data_received``, ``feed_data`` and ``read()`` do their
work themselves instead of through the base class's helpers (its property for the
reader, ``_wakeup_waiter``, a second ``read()`` coroutine, ``_maybe_resume_transport``),
with the same effect.

All three lean on attributes of asyncio's stream classes that Python 3.11 to 3.13
share; tests/test_streams.py checks them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, SupportsIndex, cast

# asyncio's default: a StreamReader pauses its transport past twice this many bytes.
STREAM_LIMIT = 64 * 1024

# What a peer can make a served connection's reads and writes raise: a reset or a
# broken pipe, or, on a TLS port, bytes that are no valid TLS record after the
# handshake (ssl.SSLError: an OSError, but no ConnectionError). The peer's doing, not
# a bug: the connection ends, and no traceback is logged.
PEER_ERRORS: Final = (ConnectionError, ssl.SSLError)


class LeanStreamReader(asyncio.StreamReader):
    # StreamReader's own attributes (asyncio/streams.py), which read() below uses.
    _buffer: bytearray
    _eof: bool
    _exception: BaseException | None
    _waiter: asyncio.Future[None] | None
    _paused: bool
    _transport: asyncio.ReadTransport | None
    _loop: asyncio.AbstractEventLoop
    _limit: int

    async def read(self, n: int = -1) -> bytes:
        """StreamReader.read, with the wait for data written out here (see above)."""
        if n <= 0:
            return await super().read(n)  # nothing, or everything up to the end: rare
        got = self.read_now(n)
        while not isinstance(got, bytes):
            await got  # feed_data, feed_eof and set_exception wake it
            got = self.read_now(n)
        return got

    def read_now(self, n: int) -> bytes | asyncio.Future[None]:
        """read(n) without a coroutine: up to ``n`` bytes (b"" at the end; the stream's
        error raised), or, with nothing buffered yet, a future that the next data, the
        end or an error settles; await it, then call again.

        A connection awaits the future itself (Connection._run): no read() coroutine
        suspended under every idle connection (~250 B each) nor made per read. A wait
        cancelled meanwhile (Connection.interrupt_read) leaves its future cancelled,
        which the next call replaces.
        """
        buffer = self._buffer
        if not buffer and not self._eof and self._exception is None:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                raise RuntimeError("read() called while another coroutine waits for data")
            if self._paused:
                self._paused = False
                self._transport.resume_reading()  # type: ignore[union-attr]
            waiter = self._waiter = self._loop.create_future()
            return waiter
        # StreamReader.read from here on, which does not wait: there is data, an end or
        # an error.
        self._waiter = None  # a cancelled wait's, if any
        if self._exception is not None:
            raise self._exception
        if len(buffer) <= n:
            data = bytes(buffer)  # the whole buffer: one copy, not a slice's two
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        if self._paused and len(buffer) <= self._limit:  # _maybe_resume_transport
            self._paused = False
            self._transport.resume_reading()  # type: ignore[union-attr]
        return data

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        """StreamReader.feed_data, waking the reader itself (not in _wakeup_waiter)."""
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return
        buffer = self._buffer
        buffer.extend(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)
        if self._transport is not None and not self._paused and len(buffer) > 2 * self._limit:
            try:
                self._transport.pause_reading()
            except NotImplementedError:
                self._transport = None  # it cannot pause: everything is buffered
            else:
                self._paused = True


Accept = Callable[[LeanStreamReader, asyncio.StreamWriter], None]


class LeanStreamProtocol(asyncio.StreamReaderProtocol):
    # StreamReaderProtocol's and FlowControlMixin's own attributes, used below.
    _stream_writer: asyncio.StreamWriter | None
    _connection_lost: bool
    _loop: asyncio.AbstractEventLoop

    def __init__(
        self,
        reader: asyncio.StreamReader,
        accept: Accept,
        loop: asyncio.AbstractEventLoop,
        closed: asyncio.Future[None],
    ) -> None:
        # accept takes the LeanStreamReader this protocol is made with (the base class
        # types it as taking any StreamReader).
        super().__init__(reader, cast(Any, accept), loop=loop)
        # FlowControlMixin's: appended to, removed from and iterated only.
        self._drain_waiters: list[asyncio.Future[None]] = []
        # The base class's close waiter, made for every connection: a done one shared
        # instead (connection_lost leaves it as it is), and a waiter of this connection's
        # own made only if someone waits for the close (_get_close_waiter).
        self._closed = closed
        self._close_waiter: asyncio.Future[None] | None = None
        # The base class reaches its reader through a weak reference (80 B): this one
        # is strong, and dropped when the connection is lost, as the weak one is.
        self._stream_reader_wr = None
        self._reader: asyncio.StreamReader | None = reader

    @property
    def _stream_reader(self) -> asyncio.StreamReader | None:
        return self._reader

    def data_received(self, data: bytes) -> None:
        reader = self._reader  # not through the property: it runs for every read
        if reader is not None:
            reader.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._reader = None
        waiter = self._close_waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _get_close_waiter(self, stream: object) -> asyncio.Future[None]:
        """What StreamWriter.wait_closed() awaits."""
        if self._connection_lost:
            return self._closed
        if self._close_waiter is None:
            self._close_waiter = self._loop.create_future()
        return self._close_waiter

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # makes the StreamWriter, calls accept
        writer = self._stream_writer
        if writer is not None:
            # Made done in StreamWriter.__init__ and never read again (3.11-3.13).
            cast(Any, writer)._complete_fut = self._closed


async def start_server(
    accept: Accept, host: str | None = None, port: int | None = None, **kwargs: Any
) -> asyncio.Server:
    """asyncio.start_server(accept, host, port, **kwargs), each connection on a
    LeanStreamProtocol; kwargs go to loop.create_server (sock, ssl, backlog...)."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    closed.set_result(None)

    def protocol() -> LeanStreamProtocol:
        return LeanStreamProtocol(LeanStreamReader(STREAM_LIMIT, loop), accept, loop, closed)

    create: Callable[..., Awaitable[asyncio.Server]] = loop.create_server
    return await create(protocol, host, port, **kwargs)
