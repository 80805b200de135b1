"""An asyncio client for chatd, for programs, tests, benchmarks and ``chatcat``.

    async with await Client.connect("127.0.0.1", 7777) as client:
        await client.request("/login", {"name": "alice", "password": "..."})
        await client.request("/send", {"name": "bob", "msg": "hi"})
        async for event in client.events():
            print(event)

``request`` returns the reply's ``data`` or raises the :mod:`chatd.errors`
class for its code (``NotFound``, ``BadCredentials``...); ``call`` returns the
whole reply map whatever its code.  Requests may be issued concurrently: replies
are matched to them by ``id``.  Server-initiated frames (``{"event": ...}``)
come out of :meth:`events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl as ssl_module
from collections import deque
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from chatd.codec import FrameDecoder, Malformed, Oversize, encode_frame
from chatd.errors import NotAuthenticated, RateLimited, error_for

Reply = dict[str, Any]
DEFAULT_TIMEOUT = 30.0
# Replies are not bound by the server's request limit: a full /receive page of long
# messages in a four-byte script is about 16 MiB (protocol.md, "Names and limits").
MAX_REPLY_SIZE = 32 * 1024 * 1024
_END = object()  # marks the end of the event stream


class RequestIdInUse(ValueError):
    """A request given an ``id`` that another request is still waiting on."""


class Client:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame_size: int = MAX_REPLY_SIZE,
        unpack: Callable[[bytes], Any] | None = None,
    ) -> None:
        self.token: str | None = None
        self.subscribed = False
        self.timeout = timeout
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        # Kept: asyncio.get_running_loop() makes a getpid() system call (Python 3.11).
        self._loop = asyncio.get_running_loop()
        self._events = _EventQueue(self._loop)
        self._decoder = FrameDecoder(max_frame_size, unpack)
        self._reader_task = self._loop.create_task(self._read_loop())
        self._address: tuple[str, int, ssl_module.SSLContext | None] | None = None

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 7777,
        *,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        unpack: Callable[[bytes], Any] | None = None,
    ) -> Client:
        """Connect; ``unpack`` replaces the msgpack decoding of each frame body (see
        FrameDecoder: a load generator may memoize it)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
        client = cls(reader, writer, timeout=timeout, unpack=unpack)
        client.token = token
        client._address = (host, port, ssl)
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(
        self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Reply:
        """Send one request and wait for its reply, whatever its code."""
        body: dict[str, Any] = {"op": op}
        if params is not None:
            body["params"] = params
        return await self.exchange(body, timeout=timeout)

    async def exchange(self, body: dict[str, Any], *, timeout: float | None = None) -> Reply:
        """Send a request map as given and wait for its reply, whatever its code.

        An integer ``id`` in ``body`` is kept (one still waiting for its reply raises
        ``RequestIdInUse``); otherwise a free one is assigned.  The client's token is
        added unless ``body`` carries one.  The token of a successful ``/login`` is kept,
        and a successful ``/subscribe`` remembered, for later requests and :meth:`reconnect`.
        """
        if self._reader_task.done():
            raise ConnectionError("connection closed")
        body = dict(body)
        request_id = body.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            request_id = body["id"] = self._free_id()
        elif request_id in self._pending:
            raise RequestIdInUse(f"request id {request_id} is already waiting for its reply")
        if self.token is not None:
            body.setdefault("token", self.token)
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(encode_frame(body))
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                await self._writer.drain()
                reply = await future
        finally:
            self._pending.pop(request_id, None)
        self._remember(body.get("op"), reply)
        return reply

    def _free_id(self) -> int:
        # Skips the ids a caller chose that are still waiting: their replies are theirs.
        while (request_id := next(self._ids)) in self._pending:
            pass
        return request_id

    def _remember(self, op: object, reply: Reply) -> None:
        if reply.get("code") != 0:
            return
        if op == "/login":
            self.token = reply["data"]["token"]
        elif op == "/logout":
            self.token = None
            self.subscribed = False
        elif op in ("/subscribe", "/unsubscribe"):
            self.subscribed = op == "/subscribe"

    async def request(
        self, op: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request; return its ``data`` (None if absent) or raise its error."""
        reply = await self.call(op, params, timeout=timeout)
        if reply.get("code") != 0:
            error = error_for(int(reply.get("code", 9)), str(reply.get("msg", "")))
            if isinstance(error, RateLimited):
                error.retry_after = float(reply.get("retry_after", error.retry_after))
            raise error
        return reply.get("data")

    async def login(self, name: str, password: str) -> str:
        """Log in and keep the token for every later request (and :meth:`reconnect`)."""
        await self.request("/login", {"name": name, "password": password})
        assert self.token is not None
        return self.token

    @property
    def connected(self) -> bool:
        """False once the connection has closed (the server went away, or :meth:`close`)."""
        return not self._reader_task.done()

    async def reconnect(self) -> None:
        """Open a fresh connection to the same address and pick up where this one was.

        The token binds the new connection, and a subscription is renewed, so the
        server replays whatever was not acknowledged (protocol.md, "Live delivery").
        Raises OSError or TimeoutError if the server cannot be reached (call again
        later), ConnectionError if it goes away meanwhile, and the error of a refused
        token (``NotAuthenticated``: expired or revoked), after forgetting the token and
        the subscription, so the connection stays open, unbound, for a new ``/login``.
        An :meth:`events` iteration of the old connection ends; iterate again.
        """
        if self._address is None:
            raise RuntimeError("reconnect needs a client made by Client.connect")
        await self.close()
        host, port, ssl = self._address
        async with asyncio.timeout(self.timeout):
            self._reader, self._writer = await asyncio.open_connection(host, port, ssl=ssl)
        self._decoder = FrameDecoder(self._decoder.max_frame_size, self._decoder.unpack)
        self._events = _EventQueue(self._loop)
        self._reader_task = self._loop.create_task(self._read_loop())
        if self.token is not None:
            await self._bind_again()
        if self.subscribed:
            await self.request("/subscribe")

    async def _bind_again(self) -> None:
        try:
            await self.request("/ping")
        except NotAuthenticated:
            self.token, self.subscribed = None, False
            raise

    @property
    def local_address(self) -> tuple[str, int]:
        """This end of the connection (host, port): how a server's log names it."""
        host, port = self._writer.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next server-initiated frame; raises TimeoutError or ConnectionError."""
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            item = await self._events.get()
        if item is _END:
            raise ConnectionError("connection closed")
        event: dict[str, Any] = item
        return event

    def waiting_events(self) -> list[dict[str, Any]]:
        """The events already received and not yet taken, without waiting."""
        return self._events.take_all()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Server-initiated frames as they arrive, until the connection closes."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            yield item

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, ssl_module.SSLError):
            await self._writer.wait_closed()
        self._reader_task.cancel()
        await asyncio.gather(self._reader_task, return_exceptions=True)

    async def _read_loop(self) -> None:
        try:
            while data := await self._reader.read(65536):
                for body in self._decoder.feed(data):
                    self._dispatch(body)
        except (ConnectionError, OSError):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection closed"))
            self._events.put(_END)

    def _dispatch(self, body: Any) -> None:
        if type(body) is dict and "id" not in body:  # the common case first: a push
            if body.get("event") == "ping":
                self._answer_ping()
            else:
                self._events.put(body)
            return
        if isinstance(body, Malformed | Oversize):
            raise ConnectionError(f"server sent a bad frame: {body.reason}")
        request_id = body.get("id") if isinstance(body, dict) else None
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is not None:
            if not future.done():
                future.set_result(body)
        else:
            self._events.put(body)  # replies the client cannot match

    def _answer_ping(self) -> None:
        # Any frame answers a keepalive ping; its reply is matched and dropped.
        request_id = self._free_id()
        self._pending[request_id] = self._loop.create_future()
        self._writer.write(encode_frame({"op": "/ping", "id": request_id}))

        def forget(done: asyncio.Future[Reply]) -> None:
            self._pending.pop(request_id, None)
            # Never cancelled: only its reply or the end of the connection completes it.
            done.exception()  # retrieved: a ping lost with the connection is no error

        self._pending[request_id].add_done_callback(forget)


class _EventQueue:
    """Pushed frames waiting to be taken; after _END, every get() returns _END.

    Not asyncio.Queue: a busy channel delivers hundreds of thousands of events a
    second, and a deque with one wake-up future costs a fraction of its bookkeeping.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._ready: asyncio.Future[None] | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            if self._ready is None or self._ready.done():
                self._ready = self._loop.create_future()
            # wait() rather than await: a consumer that times out must not cancel the
            # future another consumer is waiting on.
            await asyncio.wait([self._ready])
        item = self._items[0]
        if item is not _END:
            self._items.popleft()
        return item

    def take_all(self) -> list[Any]:
        """Every item waiting, without waiting (and without _END, which stays)."""
        found = list(self._items)
        self._items.clear()
        if found and found[-1] is _END:
            self._items.append(found.pop())
        return found
