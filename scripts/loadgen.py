"""A load generator that is not the bottleneck of what it measures.

scripts/bench.py's ``--peers`` mode drives chatd (its msgpack protocol) and the IRC
servers it is compared with (miniircd, ngircd; later chatd's own IRC port) with this
module, so that every server gets the very same client code.  What keeps it cheap:

- ``asyncio.Protocol`` connections (no StreamReader, no task per connection, no
  coroutine per message) on uvloop when it is installed;
- every request or line is encoded before the clock starts, in one ``bytes`` per sender,
  and written as a slice of it (one ``write`` per window refill, never per message);
- while the clock runs, a receiver only keeps the chunks it read and counts the
  messages in them: frames by walking their 4-byte length prefixes (msgpack), lines by
  ``bytes.count(b"\\n")`` (IRC).  Nothing is decoded then, except in ``latency``, whose
  receivers must stamp each arrival;
- once the clock has stopped, everything kept is decoded and checked: every message's
  text, order and sender, and every id (chatd's replies and pushes) -- more than the
  "sample plus every id" that would suffice, but off the clock.

Flow control is end to end and the same for every server: a sender may be at most
``window`` messages ahead of what its receivers have counted (IRC has no replies to a
PRIVMSG, so replies cannot pace it).  The same rule for chatd and the peers is what
makes their figures comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from chatd.codec import FrameDecoder, encode_frame

HEADER = struct.Struct(">I")
SETUP_TIMEOUT = 60.0  # one setup step (a login, a join, a barrier)
PASSWORD = "bench password 1234"
T = TypeVar("T")


class LoadError(Exception):
    """The load could not be applied (a setup step failed, a connection was lost)."""


class CheckLike(Protocol):
    """What the scenarios report failed checks to (scripts/bench.py's ``Check``)."""

    details: dict[str, Any]

    def fail(self, message: str) -> None: ...

    def expect(self, condition: bool, message: str) -> bool: ...

    def equal(self, what: str, got: object, want: object) -> bool: ...


class ProbeLike(Protocol):
    """Starts and stops the CPU measurement around the measured phase."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def make_text(seq: int, size: int) -> str:
    """A message text: its sequence number, then padding up to ``size`` characters."""
    head = f"{seq} "
    return head + "x" * max(1, size - len(head))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


# Connections.


class Conn(asyncio.Protocol):
    """One client connection in one of two modes.

    Setup mode parses everything it reads (``_parse``), for the few requests that log in,
    join and synchronise.  Counting mode (``count_from_now``) keeps the chunks and
    counts the messages in them, and calls ``on_progress`` after each read.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.counting = False
        self.count = 0
        self.chunks: list[bytes] = []
        self.on_progress: Callable[[Conn], None] | None = None
        self.done_at = 0.0  # perf_counter when ``count`` reached ``_target``
        self._target = 0
        self._reached: asyncio.Future[None] | None = None
        self._progress_at = 0.0  # time.monotonic() of the last message counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self._reached is not None and not self._reached.done():
            self._reached.set_exception(LoadError(
                f"connection lost after {self.count} of {self._target} messages"))
            self._reached.exception()  # reported by reached(), if anyone still waits

    def data_received(self, data: bytes) -> None:
        if not self.counting:
            self._parse(data)
            return
        self.chunks.append(data)
        counted = self._count(data)
        if counted:
            self.count += counted
            self._progress_at = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(self)
        reached = self._reached
        if (self.count >= self._target and reached is not None and not reached.done()
                and self._at_boundary()):
            self.done_at = time.perf_counter()
            reached.set_result(None)

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            raise LoadError("write on a closed connection")
        self.transport.write(data)

    def count_from_now(self, target: int) -> None:
        """Switch to counting mode; ``reached()`` resolves once ``target`` messages came."""
        self.counting, self.count, self.chunks, self._target = True, 0, [], target
        self._progress_at = time.monotonic()
        self._reached = asyncio.get_running_loop().create_future()
        if target == 0:
            self._reached.set_result(None)

    async def reached(self, silence: float) -> None:
        """Wait for ``target`` messages; LoadError once ``silence`` seconds pass with no
        new one.  A bound on silence, not on the whole run: a long run that is still
        delivering is not a stall."""
        assert self._reached is not None
        while True:
            left = self._progress_at + silence - time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(self._reached), max(left, 0.0))
                return
            except TimeoutError:
                if time.monotonic() - self._progress_at >= silence:
                    raise LoadError(f"got {self.count} of {self._target} messages, then "
                                    f"nothing for {silence:.0f} s") from None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @abstractmethod
    def _parse(self, data: bytes) -> None: ...

    @abstractmethod
    def _count(self, data: bytes) -> int: ...

    def _at_boundary(self) -> bool:
        return True


class FrameConn(Conn):
    """chatd's protocol: 4-byte big-endian length, then a msgpack body."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = FrameDecoder(1 << 24)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.events: list[dict[str, Any]] = []
        self._skip = 0  # counting: bytes of the current frame still to come
        self._head = b""  # counting: a length prefix cut by the end of a read

    async def call(self, op: str, params: dict[str, Any] | None = None,
                   token: str | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"op": op, "id": next(self._ids)}
        if params is not None:
            request["params"] = params
        if token is not None:
            request["token"] = token
        future = asyncio.get_running_loop().create_future()
        self._pending[request["id"]] = future
        self.write(encode_frame(request))
        try:
            return await asyncio.wait_for(future, SETUP_TIMEOUT)
        finally:
            self._pending.pop(request["id"], None)

    async def call_ok(self, op: str, params: dict[str, Any] | None = None,
                      token: str | None = None) -> dict[str, Any]:
        reply = await self.call(op, params, token)
        if reply.get("code") != 0:
            raise LoadError(f"{op}: code {reply.get('code')}: {reply.get('msg')}")
        return reply

    def _parse(self, data: bytes) -> None:
        for body in self._decoder.feed(data):
            if not isinstance(body, dict):
                continue
            if "event" in body:
                if self.on_event is not None:
                    self.on_event(body)
                else:
                    self.events.append(body)
                continue
            future = self._pending.get(body.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(body)

    def _count(self, data: bytes) -> int:
        # Walks the length prefixes: the bodies are not looked at while the clock runs.
        size = len(data)
        pos, count = self._skip, 0
        if self._head:
            head = self._head + data[: 4 - len(self._head)]
            if len(head) < 4:
                self._head = head
                return 0
            pos = 4 - len(self._head) + HEADER.unpack(head)[0]
            self._head = b""
            count = 1
        unpack_from = HEADER.unpack_from
        while pos + 4 <= size:
            pos += 4 + unpack_from(data, pos)[0]
            count += 1
        if pos < size:
            self._head, self._skip = data[pos:], 0
        else:
            self._skip = pos - size
        return count

    def _at_boundary(self) -> bool:
        return self._skip == 0 and not self._head

    def bodies(self) -> list[Any]:
        """Every frame kept while counting, decoded (after the clock has stopped)."""
        decoder = FrameDecoder(1 << 24)
        out: list[Any] = []
        for chunk in self.chunks:
            out.extend(decoder.feed(chunk))
        return out


class LineConn(Conn):
    """IRC: CRLF-terminated lines."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = b""
        self._tail = b""  # counting: the unfinished last line of the previous read
        self._waiters: list[tuple[Callable[[bytes], bool], asyncio.Future[bytes]]] = []
        self.on_line: Callable[[bytes], None] | None = None

    def _parse(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"PING "):
                self.write(b"PONG " + line[5:] + b"\r\n")
                continue
            if self.on_line is not None:
                self.on_line(line)
            for waiter in list(self._waiters):
                matches, future = waiter
                if not future.done() and matches(line):
                    future.set_result(line)
                    self._waiters.remove(waiter)

    def _count(self, data: bytes) -> int:
        # The server's PINGs must be answered even now (chatd's IRC front-end also uses
        # them to learn what a client has read) and are not messages. "PING" cannot
        # occur in the benchmark's own lines, so a substring search finds every one,
        # also one cut by the previous read (its start is in ``_tail``).
        lines = data.count(b"\n")
        if b"PING" in data or b"PING" in self._tail + data[:8]:
            lines -= self._answer_pings(self._tail + data)
        cut = data.rfind(b"\n")
        self._tail = data[cut + 1:] if cut >= 0 else self._tail + data
        return lines

    def _answer_pings(self, text: bytes) -> int:
        answered = 0
        for raw in text.split(b"\n")[:-1]:
            line = raw.rstrip(b"\r")
            if command_of(line) == b"PING":
                self.write(b"PONG " + line.split(b"PING ", 1)[1] + b"\r\n")
                answered += 1
        return answered

    def _at_boundary(self) -> bool:
        return self.chunks[-1].endswith(b"\n") if self.chunks else True

    async def expect(self, matches: Callable[[bytes], bool], what: str) -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters.append((matches, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), SETUP_TIMEOUT)
        except TimeoutError:
            raise LoadError(f"IRC: no {what} within {SETUP_TIMEOUT:.0f} s") from None

    def lines(self) -> list[bytes]:
        """Every line kept while counting, without its CRLF (after the clock has stopped)."""
        text = b"".join(self.chunks)
        return [line.rstrip(b"\r") for line in text.split(b"\n")[:-1]]


def command_of(line: bytes) -> bytes:
    """The command (or numeric) of an IRC line: its first word after any prefix."""
    words = line.split(b" ", 2)
    if line.startswith(b":") and len(words) > 1:
        return words[1]
    return words[0]


# Wires: how each protocol logs in, joins, sends and is checked.


@dataclass
class Received:
    """One message as the checks see it."""

    sender: str
    text: str
    id: int | None  # chatd's message id; None where the server has none (IRC peers)


class Wire(ABC):
    """One protocol against one server; the scenarios are written against this."""

    name: str

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    async def _open(self, factory: Callable[[], Conn]) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(factory, self.host, self.port), SETUP_TIMEOUT)
        return conn

    @abstractmethod
    async def user(self, name: str) -> Conn:
        """A new connection, identified as user ``name`` (registered first if need be)."""

    @abstractmethod
    async def listen(self, conns: Sequence[Conn]) -> None:
        """Make these connections receive private messages as they are sent."""

    @abstractmethod
    async def join(self, conns: Sequence[Conn], channel: str) -> None:
        """Make these connections members of ``channel`` receiving its messages."""

    @abstractmethod
    async def barrier(self, conns: Sequence[Conn]) -> None:
        """Return once everything the server sent them before now has been read."""

    @abstractmethod
    def private(self, to: str, text: str, seq: int) -> bytes:
        """The bytes that send ``text`` to user ``to``."""

    @abstractmethod
    def channel_message(self, channel: str, text: str, seq: int) -> bytes: ...

    @abstractmethod
    def replies_per_send(self) -> int:
        """Frames the sending connection gets back per message it sends (0 or 1)."""

    @abstractmethod
    def decode(self, conn: Conn, check: CheckLike, what: str
               ) -> tuple[list[Received], list[int]]:
        """After the run: messages pushed to ``conn``, and the ids its sends were given."""

    @abstractmethod
    def on_message(self, conn: Conn, handler: Callable[[Received], None]) -> None:
        """Call ``handler`` for each message as it arrives (setup mode; for latency)."""

    @abstractmethod
    async def idle_connection(self, index: int, tokens: Sequence[str]) -> Conn:
        """One more connection that does nothing, as a logged-in user would (idle)."""

    async def idle_tokens(self, users: int, prefix: str) -> list[str]:
        return []

    @abstractmethod
    async def alive(self, conn: Conn) -> bool:
        """It answers a ping."""


class FrameWire(Wire):
    """chatd's msgpack protocol."""

    name = "chatd"

    async def connect(self) -> FrameConn:
        return cast(FrameConn, await self._open(FrameConn))

    async def user(self, name: str) -> Conn:
        conn = await self.connect()
        await conn.call_ok("/register", {"name": name, "password": PASSWORD,
                                         "password_repete": PASSWORD})
        await conn.call_ok("/login", {"name": name, "password": PASSWORD})
        return conn

    async def listen(self, conns: Sequence[Conn]) -> None:
        await asyncio.gather(*(cast(FrameConn, c).call_ok("/subscribe") for c in conns))
        await self.settle(conns[0])

    async def join(self, conns: Sequence[Conn], channel: str) -> None:
        frames = [cast(FrameConn, c) for c in conns]
        await gather_limited(32, (c.call_ok("/channel/join", {"name": channel}) for c in frames))
        # A position before subscribing: nothing sent after the subscription can slip by
        # (protocol.md section 9, and scripts/bench.py's fanout).
        await gather_limited(32, (c.call_ok("/ack", {"channel": channel, "id": 0})
                                  for c in frames))
        await self.listen(conns)

    async def settle(self, conn: Conn) -> None:
        """Until no subscription is still catching up (/stats)."""
        frame = cast(FrameConn, conn)
        async with asyncio.timeout(SETUP_TIMEOUT):
            while True:
                reply = await frame.call_ok("/stats")
                if (reply.get("data") or {}).get("catching_up", 0) == 0:
                    return
                await asyncio.sleep(0.05)

    async def barrier(self, conns: Sequence[Conn]) -> None:
        await asyncio.gather(*(cast(FrameConn, c).call_ok("/ping") for c in conns))

    def private(self, to: str, text: str, seq: int) -> bytes:
        return encode_frame({"op": "/send", "id": seq, "params": {"name": to, "msg": text}})

    def channel_message(self, channel: str, text: str, seq: int) -> bytes:
        return encode_frame({"op": "/channel/send", "id": seq,
                             "params": {"name": channel, "message": text}})

    def replies_per_send(self) -> int:
        return 1

    def decode(self, conn: Conn, check: CheckLike, what: str
               ) -> tuple[list[Received], list[int]]:
        received: list[Received] = []
        replied: list[int] = []
        for body in cast(FrameConn, conn).bodies():
            if not isinstance(body, dict):
                check.fail(f"{what}: undecodable frame {body!r}"[:200])
                continue
            if "event" not in body:
                data = body.get("data") or {}
                if body.get("code") != 0 or "id" not in data:
                    check.fail(f"{what}: failed reply {body!r}"[:200])
                    continue
                replied.append(data["id"])
                continue
            data = body.get("data") or {}
            if body["event"] not in ("message", "channel_message"):
                check.fail(f"{what}: unexpected event {body['event']!r}")
                continue
            received.append(Received(str(data.get("name")), str(data.get("msg")),
                                     data.get("id")))
        return received, replied

    def on_message(self, conn: Conn, handler: Callable[[Received], None]) -> None:
        def event(body: dict[str, Any]) -> None:
            data = body.get("data") or {}
            handler(Received(str(data.get("name")), str(data.get("msg")), data.get("id")))

        cast(FrameConn, conn).on_event = event

    async def idle_tokens(self, users: int, prefix: str) -> list[str]:
        tokens = []
        for index in range(users):
            conn = cast(FrameConn, await self.user(f"{prefix}{index}"))
            tokens.append((await conn.call_ok("/login", {
                "name": f"{prefix}{index}", "password": PASSWORD}))["data"]["token"])
            conn.close()
        return tokens

    async def idle_connection(self, index: int, tokens: Sequence[str]) -> Conn:
        conn = await self.connect()
        # The token binds the connection on its first request (protocol.md section 5).
        await conn.call_ok("/subscribe", token=tokens[index % len(tokens)])
        return conn

    async def alive(self, conn: Conn) -> bool:
        reply = await cast(FrameConn, conn).call("/ping")
        return reply.get("code") == 0


class IrcWire(Wire):
    """Plain IRC (RFC 1459/2812 registration, PRIVMSG, JOIN), as miniircd and ngircd speak it.

    ``account_wire``: a server whose IRC nicks are accounts (chatd's IRC front-end,
    ``chatd --irc-port``) -- each user is registered through that msgpack wire first and
    identifies with ``PASS name:password``.
    """

    def __init__(self, host: str, port: int, name: str,
                 account_wire: FrameWire | None = None) -> None:
        super().__init__(host, port)
        self.name = name
        self.account_wire = account_wire

    async def connect(self) -> LineConn:
        return cast(LineConn, await self._open(LineConn))

    async def user(self, name: str) -> Conn:
        if self.account_wire is not None:
            (await self.account_wire.user(name)).close()
        conn = await self.connect()
        lines = [f"NICK {name}", f"USER {name} 0 * :{name}"]
        if self.account_wire is not None:
            lines.insert(0, f"PASS :{name}:{PASSWORD}")  # the password has spaces
        conn.write("".join(f"{line}\r\n" for line in lines).encode())
        await conn.expect(lambda line: command_of(line) in (b"376", b"422"),
                          f"end of the welcome for {name}")
        return conn

    async def listen(self, conns: Sequence[Conn]) -> None:
        return None  # IRC delivers private messages to every registered connection

    async def join(self, conns: Sequence[Conn], channel: str) -> None:
        async def one(conn: LineConn) -> None:
            conn.write(f"JOIN #{channel}\r\n".encode())
            await conn.expect(lambda line: command_of(line) == b"366", f"366 for #{channel}")

        await gather_limited(32, (one(cast(LineConn, c)) for c in conns))

    async def barrier(self, conns: Sequence[Conn]) -> None:
        async def one(conn: LineConn, token: str) -> None:
            conn.write(f"PING :{token}\r\n".encode())
            await conn.expect(lambda line: command_of(line) == b"PONG"
                              and line.endswith(token.encode()), "PONG")

        await asyncio.gather(*(one(cast(LineConn, c), f"sync{i}") for i, c in enumerate(conns)))

    def private(self, to: str, text: str, seq: int) -> bytes:
        return f"PRIVMSG {to} :{text}\r\n".encode()

    def channel_message(self, channel: str, text: str, seq: int) -> bytes:
        return f"PRIVMSG #{channel} :{text}\r\n".encode()

    def replies_per_send(self) -> int:
        return 0

    @staticmethod
    def parse_privmsg(line: bytes) -> Received | None:
        """``:nick!user@host PRIVMSG target :text`` (tags, if any, are skipped)."""
        if line.startswith(b"@"):
            line = line.split(b" ", 1)[1]
        prefix, command, rest = ([*line.split(b" ", 2), b"", b""])[:3]
        if command != b"PRIVMSG" or not prefix.startswith(b":"):
            return None
        text = rest.split(b" :", 1)[1] if b" :" in rest else b""
        sender = prefix[1:].split(b"!", 1)[0]
        return Received(sender.decode(), text.decode(errors="replace"), None)

    def decode(self, conn: Conn, check: CheckLike, what: str
               ) -> tuple[list[Received], list[int]]:
        received = []
        for line in cast(LineConn, conn).lines():
            if command_of(line) == b"PING":
                continue  # answered as it came
            message = self.parse_privmsg(line)
            if message is None:
                check.fail(f"{what}: unexpected line {line[:120]!r}")
                continue
            received.append(message)
        return received, []

    def on_message(self, conn: Conn, handler: Callable[[Received], None]) -> None:
        def line(raw: bytes) -> None:
            message = self.parse_privmsg(raw)
            if message is not None:
                handler(message)

        cast(LineConn, conn).on_line = line

    async def idle_connection(self, index: int, tokens: Sequence[str]) -> Conn:
        return await self.user(f"{tokens[0]}{index}" if tokens else f"idle{index}")

    async def idle_tokens(self, users: int, prefix: str) -> list[str]:
        return [prefix]  # IRC nicks: one per connection, made from this prefix

    async def alive(self, conn: Conn) -> bool:
        line_conn = cast(LineConn, conn)
        line_conn.write(b"PING :alive\r\n")
        try:
            await line_conn.expect(lambda line: command_of(line) == b"PONG", "PONG")
        except LoadError:
            return False
        return True


async def gather_limited(limit: int, coros: Iterable[Awaitable[T]]) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def users(wire: Wire, sizes: LoadSizes, names: Sequence[str]) -> list[Conn]:
    return await gather_limited(sizes.connect_concurrency, (wire.user(name) for name in names))


# Senders: pre-encoded, written a window at a time.


class Stream:
    """All the messages of one sender, encoded before the clock starts, as one ``bytes``."""

    def __init__(self, conn: Conn, messages: Sequence[bytes]) -> None:
        self.conn = conn
        self.data = memoryview(b"".join(messages))
        self.ends = array("q", itertools.accumulate(len(m) for m in messages))
        self.total = len(messages)
        self.sent = 0

    def send_up_to(self, allowed: int) -> None:
        allowed = min(allowed, self.total)
        if allowed <= self.sent:
            return
        start = self.ends[self.sent - 1] if self.sent else 0
        self.conn.write(self.data[start:self.ends[allowed - 1]])
        self.sent = allowed


# Scenarios.  Each returns its metrics and records its checks; ``probe`` brackets the
# measured phase (the bench's CPU figures).


@dataclass
class LoadSizes:
    pairs: int = 20
    messages: int = 20_000  # per dm sender
    window: int = 64  # messages a sender may be ahead of its receivers
    refill: int = 0  # write once this many may be sent (0: half the window)
    members: int = 100
    senders: int = 5
    channel_messages: int = 2_000  # per fanout sender
    latency_rate: float = 2_000.0
    latency_seconds: float = 10.0
    latency_pairs: int = 20
    idle_connections: int = 1_000
    idle_users: int = 100
    connect_concurrency: int = 32  # logins/registrations at once (miniircd: listen backlog 5)
    idle_concurrency: int = 200  # idle connections being opened at once
    message_size: int = 64
    timeout: float = 120.0  # silence while messages are still expected
    prefix: str = "b"


def check_in_order(check: CheckLike, what: str, received: Sequence[Received], sender: str,
                   count: int, size: int) -> None:
    """Exactly messages 0..count-1 from ``sender``, in order, each with its exact text."""
    wrong = [i for i, m in enumerate(received)
             if m.sender != sender or m.text != make_text(i, size)]
    check.equal(f"{what}: messages", len(received), count)
    if wrong:
        first = received[wrong[0]]
        check.fail(f"{what}: {len(wrong)} messages wrong (sender, text or order), first at "
                   f"{wrong[0]}: {first.sender!r} {first.text[:40]!r}")


def check_ids(check: CheckLike, what: str, pushed: Sequence[int | None],
              replied: Sequence[int]) -> None:
    """Ids strictly increase and are those the sends were given (servers that have ids)."""
    if not replied and all(i is None for i in pushed):
        return
    check.expect(all(isinstance(b, int) and isinstance(a, int) and b > a
                     for a, b in itertools.pairwise(pushed)),
                 f"{what}: pushed ids do not strictly increase")
    check.expect(list(pushed) == list(replied),
                 f"{what}: pushed ids differ from the ids the sends were given")


async def scenario_dm(wire: Wire, sizes: LoadSizes, probe: ProbeLike, check: CheckLike
                      ) -> dict[str, Any]:
    pairs, count, window, prefix = sizes.pairs, sizes.messages, sizes.window, sizes.prefix
    refill_at = sizes.refill or max(1, window // 2)
    senders = await users(wire, sizes, [f"{prefix}s{i}" for i in range(pairs)])
    receivers = await users(wire, sizes, [f"{prefix}r{i}" for i in range(pairs)])
    await wire.listen(receivers)
    await wire.barrier([*senders, *receivers])
    streams = [Stream(senders[i], [wire.private(f"{prefix}r{i}", make_text(seq, sizes.message_size),
                                                seq) for seq in range(count)])
               for i in range(pairs)]
    for i, receiver in enumerate(receivers):
        stream = streams[i]

        def progress(conn: Conn, stream: Stream = stream) -> None:
            if conn.count + window - stream.sent >= refill_at:
                stream.send_up_to(conn.count + window)

        receiver.on_progress = progress
        receiver.count_from_now(count)
    for sender in senders:
        sender.count_from_now(count * wire.replies_per_send())
    probe.start()
    started = time.perf_counter()
    for stream in streams:
        stream.send_up_to(window)
    try:
        await asyncio.gather(*(c.reached(sizes.timeout) for c in [*receivers, *senders]))
    finally:
        probe.stop()
    finished = max(c.done_at for c in receivers)
    for i in range(pairs):
        pushed, _ = wire.decode(receivers[i], check, f"pair {i} receiver")
        _, replied = wire.decode(senders[i], check, f"pair {i} sender")
        check_in_order(check, f"pair {i}", pushed, f"{prefix}s{i}", count, sizes.message_size)
        check_ids(check, f"pair {i}", [m.id for m in pushed], replied)
    delivered = sum(c.count for c in receivers)
    check.details = {"delivered": delivered, "expected": pairs * count}
    close_all([*senders, *receivers])
    elapsed = finished - started
    return {"pairs": pairs, "messages_per_sender": count, "window": window,
            "delivered": delivered, "duration_s": round(elapsed, 3),
            "delivered_per_s": round(delivered / elapsed)}


async def scenario_fanout(wire: Wire, sizes: LoadSizes, probe: ProbeLike, check: CheckLike
                          ) -> dict[str, Any]:
    prefix, count, window = sizes.prefix, sizes.channel_messages, sizes.window
    refill_at = sizes.refill or max(1, window // 2)
    sender_count = sizes.senders
    names = [f"{prefix}m{i}" for i in range(sizes.members)]
    members = await users(wire, sizes, names)
    channel = f"{prefix}fan"
    await wire.join(members, channel)
    await wire.barrier(members)
    streams = [Stream(members[i], [wire.channel_message(channel, make_text(seq, sizes.message_size),
                                                        seq) for seq in range(count)])
               for i in range(sender_count)]
    # A member gets every message but those it sent itself, plus one reply per send.
    expected = [sender_count * count - count + count * wire.replies_per_send()
                if i < sender_count else sender_count * count for i in range(len(members))]
    pacers = members[sender_count:] or members
    scheduled = [False]
    loop = asyncio.get_running_loop()

    def refill() -> None:
        # Once per loop turn: each sender may be ``window`` ahead of the slowest member.
        scheduled[0] = False
        slowest = min(c.count for c in pacers) // sender_count
        for stream in streams:
            if slowest + window - stream.sent >= refill_at:
                stream.send_up_to(slowest + window)

    def progress(conn: Conn) -> None:
        if not scheduled[0]:
            scheduled[0] = True
            loop.call_soon(refill)

    for member, want in zip(members, expected, strict=True):
        member.on_progress = progress
        member.count_from_now(want)
    probe.start()
    started = time.perf_counter()
    for stream in streams:
        stream.send_up_to(window)
    try:
        await asyncio.gather(*(c.reached(sizes.timeout) for c in members))
    finally:
        probe.stop()
    finished = max(c.done_at for c in members)
    replied_by: list[list[int]] = []
    pushed_by: list[list[Received]] = []
    for m, member in enumerate(members):
        pushed, replied = wire.decode(member, check, f"member {m}")
        pushed_by.append(pushed)
        replied_by.append(replied)
    all_ids = sorted(itertools.chain.from_iterable(replied_by))
    deliveries = 0
    for m, pushed in enumerate(pushed_by):
        deliveries += len(pushed)
        what = f"member {m}"
        check.equal(f"{what}: messages", len(pushed), sender_count * count
                    - (count if m < sender_count else 0))
        for j in range(sender_count):
            from_j = [p for p in pushed if p.sender == names[j]]
            check_in_order(check, f"{what} from sender {j}", from_j, names[j],
                           0 if j == m else count, sizes.message_size)
        own = set(replied_by[m])
        check_ids(check, what, [p.id for p in pushed],
                  [i for i in all_ids if i not in own] if all_ids else [])
    close_all(members)
    elapsed = finished - started
    check.details = {"deliveries": deliveries,
                     "expected": sender_count * count * (len(members) - 1)}
    return {"members": len(members), "senders": sender_count, "messages_per_sender": count,
            "window": window, "deliveries": deliveries, "duration_s": round(elapsed, 3),
            "deliveries_per_s": round(deliveries / elapsed),
            "messages_per_s": round(sender_count * count / elapsed)}


async def scenario_latency(wire: Wire, sizes: LoadSizes, probe: ProbeLike, check: CheckLike
                           ) -> dict[str, Any]:
    """Open loop: a clock decides when each message goes; the receiver stamps arrivals."""
    prefix, pairs, rate = sizes.prefix, sizes.latency_pairs, sizes.latency_rate
    total = int(rate * sizes.latency_seconds)
    senders = await users(wire, sizes, [f"{prefix}ls{i}" for i in range(pairs)])
    receivers = await users(wire, sizes, [f"{prefix}lr{i}" for i in range(pairs)])
    await wire.listen(receivers)
    await wire.barrier([*senders, *receivers])
    latencies: list[int] = []
    stamps: list[int] = []  # each arrival's send time, for LOADGEN_LATENCY_DUMP
    got: list[list[int]] = [[] for _ in range(pairs)]
    all_in = asyncio.get_running_loop().create_future()

    for p, receiver in enumerate(receivers):
        def arrived(message: Received, p: int = p) -> None:
            now = time.perf_counter_ns()
            seq, _, stamp = message.text.partition(" ")
            if message.sender != f"{prefix}ls{p}" or not stamp.isdigit():
                check.fail(f"pair {p}: unexpected message {message}")
                return
            got[p].append(int(seq))
            stamps.append(int(stamp))
            latencies.append(now - int(stamp))
            if len(latencies) == total and not all_in.done():
                all_in.set_result(None)

        wire.on_message(receiver, arrived)
    probe.start()
    started = time.perf_counter()
    sent, max_lag = 0, 0.0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - started) * rate) + 1)
        while sent < due:
            max_lag = max(max_lag, now - (started + sent / rate))
            pair = sent % pairs
            text = f"{sent // pairs} {time.perf_counter_ns()}"
            senders[pair].write(wire.private(f"{prefix}lr{pair}", text, sent // pairs))
            sent += 1
        if sent < total:
            await asyncio.sleep(max(0.001, started + sent / rate - time.perf_counter()))
    try:
        await asyncio.wait_for(all_in, sizes.timeout)
    except TimeoutError:
        check.fail(f"{len(latencies)} of {total} messages arrived")
    finally:
        probe.stop()
    for p in range(pairs):
        want = list(range(len(range(p, total, pairs))))
        check.expect(got[p] == want, f"pair {p}: {len(got[p])} messages, expected "
                                     f"{len(want)}, in order")
    check.details = {"delivered": len(latencies), "expected": total}
    close_all([*senders, *receivers])
    dump_latencies(stamps, latencies)
    ms = sorted(n / 1e6 for n in latencies)
    return {"pairs": pairs, "offered_per_s": rate, "messages": total,
            "max_send_lag_ms": round(max_lag * 1000, 3),
            **{f"p{name}_ms": round(percentile(ms, p), 3)
               for name, p in (("50", 50), ("90", 90), ("99", 99), ("999", 99.9))},
            "max_ms": round(ms[-1], 3) if ms else None}


def dump_latencies(stamps: Sequence[int], latencies: Sequence[int]) -> None:
    """Append each message's send time and latency (ns, perf_counter_ns: CLOCK_MONOTONIC,
    the clock of chatd's CHATD_TRACE_FILE) to the file LOADGEN_LATENCY_DUMP names, if
    any: scripts/tail_trace.py lines the slowest up with what the server was doing."""
    path = os.environ.get("LOADGEN_LATENCY_DUMP")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        pairs = zip(stamps, latencies, strict=True)
        out.writelines(f"{sent} {latency}\n" for sent, latency in pairs)


async def scenario_idle(wire: Wire, sizes: LoadSizes, probe: ProbeLike, check: CheckLike,
                        rss_kib: Callable[[], int | None]) -> dict[str, Any]:
    total = sizes.idle_connections
    tokens = await wire.idle_tokens(sizes.idle_users, f"{sizes.prefix}i")
    await asyncio.sleep(0.5)
    before = rss_kib()
    probe.start()
    started = time.perf_counter()
    conns = await gather_limited(sizes.idle_concurrency,
                                 (wire.idle_connection(i, tokens) for i in range(total)))
    opened = time.perf_counter() - started
    await asyncio.sleep(1.0)
    after = rss_kib()
    probe.stop()
    alive = await gather_limited(500, (wire.alive(c) for c in conns))
    check.equal("connections alive at the end", sum(alive), total)
    check.details = {"connections": total, "alive": sum(alive)}
    close_all(conns)
    per_conn = None if before is None or after is None else round((after - before) * 1024 / total)
    return {"connections": total, "connect_s": round(opened, 3),
            "server_rss_before_kib": before, "server_rss_after_kib": after,
            "bytes_per_connection": per_conn}


def close_all(conns: Iterable[Conn]) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()


SCENARIOS = ("dm", "fanout", "latency", "idle")
