"""Several nodes: Redis pub/sub carries notices between them; the store is the truth.

Three parts, each usable alone (the server wires them together, README "Running
several nodes"):

- ``RedisBus``: after COMMIT a node publishes a ``Notice`` (stream, seq, id and the
  message's fields) on a Redis channel of its own (``node_channel``: the bus channel,
  a colon, 16 hex digits of the node name's SHA-1); every node subscribes to the
  others' channels and not to its own (``others_patterns``: 16 glob patterns, one
  PSUBSCRIBE), so every node receives every other node's notices and none of its own,
  which it delivered when it published them (reading its own batches back only to
  drop them was, at 1-2 notices per batch, a sending node's largest cost beyond a
  single node's).  Revokes go the same way.  Redis pub/sub is at-most-once: a notice
  published while a node is disconnected is gone.
  Publishing never blocks a send: notices wait for the end of the loop turn (a group
  commit's together; bounded while the connection is down: beyond, and when it cannot
  be made, they are dropped, counted), then go out as one Redis message, the encodings
  back to back (``decode_all``): one PUBLISH, and one message for each other node to
  read, per batch instead of per notice (redis-py's work per message was most of a
  node's CPU at 2,000 notices/s).  The PUBLISH is written straight to a connection of
  its own on which Redis answers nothing (CLIENT REPLY OFF): no reply to read, parse
  and wait for, per group commit, on the sending node; its loss shows on the socket
  (closed, or writes stuck for ``liveness`` seconds) and it is replaced.
  The bus channel itself (``chatd:bus``), which every node subscribes to, carries what
  is not one node's: presence changes (published by Redis scripts, heard by every
  node, the changing one included: each node announces them to its sessions when
  they come back, in the one order Redis gives them) and ``chatd admin``'s revokes.
  The subscriber connection is read by a protocol of its own with hiredis's
  parser (redis-py's pub/sub reading cost more than the rest of the bus on a
  receiving node), pinged every ``liveness / 3`` seconds and torn down when nothing
  at all has arrived for ``liveness`` seconds (a black-holed link keeps its socket
  open); every (re)subscription, the first excepted, calls ``on_resync``.  redis-py
  still makes the presence calls and reads the URL.
- ``StreamOrder``: per stream a node follows, the highest seq pushed to its local
  sessions (and that message's id).  The next seq is pushed; a seq already pushed is
  dropped (a link that came back, a read that overlapped); a seq beyond the next makes
  the node read the stream from the store past its position and push what it finds,
  in order.  ``check_positions`` (every ``bus_position_check`` seconds, and at once on
  ``on_resync``) does that read for every followed stream that the store's heads (all
  read in one statement) show behind: the only guard against a lost *last* notice and
  against a node killed between COMMIT and publish.
- ``RedisPresence``: per user a sorted set of the nodes with a session for them,
  scored by expiry time; each node refreshes its own entries every ``ttl / 3``
  seconds, so a killed node's users read as offline at most ``ttl`` seconds later.
  Node clocks are assumed to agree within a second (NTP).

Stream names: ``c:<channel id>`` for a channel, ``u:<user id>`` for a user's inbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import msgpack

from chatd.urls import redact

log = logging.getLogger(__name__)

BUS_CHANNEL = "chatd:bus"
PAYLOAD_LIMIT = 256 * 1024  # bytes of queued messages sent as one Redis message
PRESENCE_PREFIX = "chatd:online:"
NODES_KEY = "chatd:nodes"  # node -> time its heartbeat lapses
NODE_USERS_PREFIX = "chatd:node-users:"  # per node: user id -> their offline notice
WIRE_VERSION = 1
_NOTICE, _REVOKE, _PRESENCE = "n", "r", "p"


# One packer for every encoding (the event loop's thread only): building one per call
# was about half of the cost of packing a notice.
_PACKER = msgpack.Packer(use_bin_type=True)


class BusFormatError(ValueError):
    """Bytes on the bus that are not a notice of this version (logged and dropped)."""


def channel_stream(channel_id: int) -> str:
    return f"c:{channel_id}"


def inbox_stream(user_id: int) -> str:
    return f"u:{user_id}"


@dataclass(frozen=True, slots=True)
class Notice:
    """One committed message: its stream, its seq in the stream, its id, its fields."""

    stream: str
    seq: int
    id: int
    fields: dict[str, Any] = field(default_factory=dict)
    # The publishing node ("" when read from the store): provenance, not identity.
    node: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Revoke:
    """End these tokens (all of the user's when ``digests`` is empty) on every node."""

    user_id: int
    digests: tuple[bytes, ...] = ()
    node: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """A user's first session on any node began (``online``) or their last one ended;
    ``channels``: the user's channels, whose followers hear of it (protocol.md)."""

    user_id: int
    name: str
    online: bool
    channels: tuple[int, ...] = ()
    node: str = field(default="", compare=False)


BusMessage = Notice | Revoke | PresenceChange


def encode(message: BusMessage) -> bytes:
    body: list[Any]
    if isinstance(message, Notice):
        body = [WIRE_VERSION, _NOTICE, message.node, message.stream, message.seq, message.id,
                message.fields]
    elif isinstance(message, Revoke):
        body = [WIRE_VERSION, _REVOKE, message.node, message.user_id, list(message.digests)]
    else:
        body = [WIRE_VERSION, _PRESENCE, message.node, message.user_id, message.name,
                message.online, list(message.channels)]
    packed: bytes = _PACKER.pack(body)
    return packed


def decode(data: bytes) -> BusMessage:
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BusFormatError(f"not msgpack: {exc}") from None
    return _message(body)


def _message(body: object) -> BusMessage:
    if not isinstance(body, list) or len(body) < 3 or body[0] != WIRE_VERSION:
        raise BusFormatError("not a chatd bus message of this version")
    kind, node = body[1], body[2]
    if kind == _NOTICE and len(body) == 7:
        _, _, _, stream, seq, message_id, fields = body
        if (isinstance(stream, str) and _is_int(seq) and _is_int(message_id)
                and isinstance(fields, dict) and isinstance(node, str)):
            return Notice(stream, seq, message_id, fields, node)
    elif kind == _REVOKE and len(body) == 5:
        _, _, _, user_id, digests = body
        if (_is_int(user_id) and isinstance(digests, list) and isinstance(node, str)
                and all(isinstance(d, bytes) for d in digests)):
            return Revoke(user_id, tuple(digests), node)
    elif kind == _PRESENCE and len(body) == 7:
        _, _, _, user_id, name, online, channels = body
        if (_is_int(user_id) and isinstance(name, str) and isinstance(online, bool)
                and isinstance(channels, list) and all(_is_int(c) for c in channels)
                and isinstance(node, str)):
            return PresenceChange(user_id, name, online, tuple(channels), node)
    raise BusFormatError(f"malformed bus message of kind {kind!r}")


def decode_all(data: bytes) -> list[BusMessage]:
    """The messages of one payload, in order (a payload is one or more encodings back
    to back); BusFormatError if any of it is not a message.  Each byte is parsed once,
    and a payload of one message (the usual at low rates) without an Unpacker, whose
    making cost more than the parse."""
    try:
        bodies = [msgpack.unpackb(data, raw=False)]
    except msgpack.ExtraData:
        bodies = _unpack_several(data)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BusFormatError(f"not msgpack: {exc}") from None
    return [_message(body) for body in bodies]


def _unpack_several(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data))
    unpacker.feed(data)
    bodies, end = [], 0
    try:
        for body in unpacker:
            bodies.append(body)
            end = unpacker.tell()  # after a whole message (a cut one moves it too)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BusFormatError(f"not msgpack: {exc}") from None
    if end != len(data):
        raise BusFormatError("a message cut short")
    return bodies


def node_channel(channel: str, node: str) -> str:
    """The Redis channel a node publishes its notices and revokes on: ``channel``, a
    colon, and 16 hex digits of the node name's SHA-1 (all such channels one length
    and alphabet, so that ``others_patterns`` can leave one out)."""
    return f"{channel}:{_node_digest(node)}"


def others_patterns(channel: str, node: str) -> list[str]:
    """Glob patterns (PSUBSCRIBE) that match every node's channel but ``node``'s own:
    the i-th matches the channels that agree with it on the first i digits and differ
    on the next, so each other channel matches exactly one (Redis delivers a message
    once per matching pattern)."""
    digest, prefix = _node_digest(node), re.sub(r"([*?\[\]\\])", r"\\\1", channel)
    return [f"{prefix}:{digest[:i]}[^{digest[i]}]{'?' * (len(digest) - i - 1)}"
            for i in range(len(digest))]


def _node_digest(node: str) -> str:
    return hashlib.sha1(node.encode(), usedforsecurity=False).hexdigest()[:16]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Stream order on one node.


class Sequenced(Protocol):
    """A stored message as StreamOrder sees it: its seq in its stream, and its id
    (within one stream ids grow with seq: both are taken under the stream's lock)."""

    @property
    def seq(self) -> int: ...

    @property
    def id(self) -> int: ...


M = TypeVar("M", bound=Sequenced)


class StreamLog(Protocol[M]):
    """What StreamOrder reads from the store (the truth)."""

    async def read(self, stream: str, after_id: int, limit: int) -> list[M]:
        """Up to ``limit`` messages of ``stream`` with an id above ``after_id``, by id."""


@dataclass(slots=True)
class _Position:
    seq: int | None  # the highest seq pushed; None while only the id is known
    id: int  # the id of that message (or a position: everything up to it is not news)


@dataclass(slots=True)
class StreamCounts:
    pushed: int = 0
    duplicates: int = 0  # notices dropped as already pushed
    repaired: int = 0  # messages read from the store to fill a gap


class StreamOrder(Generic[M]):
    """Pushes each message of each followed stream once, in seq order (module doc)."""

    def __init__(
        self, log_: StreamLog[M], push: Callable[[str, M], None], page_size: int = 500
    ) -> None:
        self._log = log_
        self._push = push
        self._page_size = page_size
        self._high: dict[str, _Position] = {}
        self._repairs: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # streams to read once more when their repair ends
        self.counts = StreamCounts()

    def follow(self, stream: str, seq: int | None, message_id: int) -> None:
        """Follow ``stream`` from a position: its newest message when read (``seq`` and
        its id), or only an id (``seq`` None: the next message is checked in the store)."""
        if stream not in self._high:
            self._high[stream] = _Position(seq, message_id)

    def unfollow(self, stream: str) -> None:
        self._high.pop(stream, None)
        self._again.discard(stream)
        task = self._repairs.pop(stream, None)
        if task is not None:
            task.cancel()

    def following(self, stream: str) -> bool:
        return stream in self._high

    def position(self, stream: str) -> tuple[int | None, int] | None:
        high = self._high.get(stream)
        return None if high is None else (high.seq, high.id)

    @property
    def streams(self) -> list[str]:
        return list(self._high)

    def offer(self, stream: str, message: M) -> None:
        high = self._high.get(stream)
        if high is None:
            return  # no local interest
        if message.id <= high.id or (high.seq is not None and message.seq <= high.seq):
            self.counts.duplicates += 1
        elif high.seq is not None and message.seq == high.seq + 1:
            # Even while a read of the stream runs (a position check): the read skips
            # what was pushed meanwhile, comparing ids with the position as it moves.
            self._deliver(stream, high, message)
        else:
            self.repair(stream)

    def repair(self, stream: str, head: int | None = None) -> None:
        """Read ``stream`` from the store past its position and push what is there;
        ``head``: its newest seq, read from the store before this call."""
        if stream not in self._high:
            return
        if stream in self._repairs:
            self._again.add(stream)  # it may have read before this message committed
            return
        task = asyncio.create_task(self._repair(stream, head))
        self._repairs[stream] = task
        task.add_done_callback(lambda done: self._repaired(stream, done))

    def check_positions(self, heads: Mapping[str, int] | None = None) -> None:
        """The guard against a lost *last* notice: repair every followed stream or,
        given the streams' newest seqs (read from the store just before), only those
        behind them.  A stream absent from ``heads`` (gone from the store) is left."""
        for stream, high in list(self._high.items()):
            if heads is None:
                self.repair(stream)
                continue
            head = heads.get(stream)
            if head is not None and (high.seq is None or head > high.seq):
                self.repair(stream, head)

    async def idle(self) -> None:
        """Wait until no repair is running (tests and shutdown)."""
        while self._repairs:
            await asyncio.gather(*self._repairs.values(), return_exceptions=True)

    def close(self) -> None:
        for task in self._repairs.values():
            task.cancel()
        self._repairs.clear()

    def _deliver(self, stream: str, high: _Position, message: M) -> None:
        high.seq, high.id = message.seq, message.id
        self.counts.pushed += 1
        try:
            self._push(stream, message)
        except Exception:  # one bad push must not stop the stream
            log.exception("push of %s seq %d failed", stream, message.seq)

    def _repaired(self, stream: str, task: asyncio.Task[None]) -> None:
        if self._repairs.get(stream) is task:
            del self._repairs[stream]
        if task.cancelled():
            return
        if task.exception() is not None:
            # The store failed (PostgreSQL restarting): the next position check retries.
            self._again.discard(stream)
            log.warning("reading %s from the store failed: %s", stream, task.exception())
        elif stream in self._again:
            self._again.discard(stream)
            self.repair(stream)

    async def _repair(self, stream: str, head: int | None) -> None:
        high = self._high[stream]  # repair() starts this task for a followed stream only
        while True:
            page = await self._log.read(stream, high.id, self._page_size)
            # unfollow() cancels this task: the read ends with CancelledError, so only a
            # store that swallowed the cancellation could come back unfollowed.
            if self._high.get(stream) is not high:  # pragma: no cover
                return
            for message in page:
                # Pushed meanwhile (a notice while the read ran) or a hole: skipped.
                if message.id > high.id:
                    self.counts.repaired += 1
                    self._deliver(stream, high, message)
            if len(page) < self._page_size:
                break  # the store has no more
        if head is not None and (high.seq is None or high.seq < head):
            # Everything up to ``head`` committed before this read began, so it has all
            # been pushed: the next seq is head + 1 (a stream followed from an id, or one
            # whose newest rows were deleted, learns its seq here).
            high.seq = head


# The Redis connections.


@dataclass(slots=True)
class BusCounts:
    published: int = 0
    received: int = 0
    dropped: int = 0  # notices not published: queue full or Redis unreachable
    malformed: int = 0
    reconnects: int = 0
    payloads: int = 0  # Redis messages read (one per PUBLISH of another node)


class RedisBus:
    """Publishes and receives bus messages over Redis pub/sub (module doc)."""

    def __init__(
        self,
        url: str,
        node: str,
        receive: Callable[[BusMessage], None],
        on_resync: Callable[[], None],
        *,
        liveness: float = 3.0,
        reconnect_delay: float = 0.2,
        queue_limit: int = 100_000,
        channel: str = BUS_CHANNEL,
    ) -> None:
        self.url, self.node, self.channel = url, node, channel
        self._receive = receive
        self._on_resync = on_resync
        self._liveness = liveness
        self._reconnect_delay = reconnect_delay
        # Encodings waiting for the next flush (a loop turn: a group commit's notices
        # together) or, while not connected, for the connection (at most queue_limit).
        self._unsent: list[bytes] = []
        self._queue_limit = queue_limit
        self._flush_due = False
        self._out: asyncio.Transport | None = None  # the publishing connection
        self._publish_command = _publish_prefix(node_channel(channel, node))
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()
        # Why the last subscription attempt failed: what start() says when none succeeds
        # (a wrong path, certificate or password would otherwise show in the log only).
        self._failure: Exception | None = None
        self.counts = BusCounts()
        self.node_channel = node_channel(channel, node)

    async def start(self, timeout: float = 10.0) -> None:
        """Start both loops; wait (bounded) for the first subscription, raise if none."""
        self._tasks = [
            asyncio.create_task(self._subscriber(), name="bus-subscriber"),
            asyncio.create_task(self._publisher(), name="bus-publisher"),
        ]
        try:
            async with asyncio.timeout(timeout):
                await self.subscribed.wait()
        except TimeoutError:
            await self.close()
            why = "" if self._failure is None else f": {_describe(self._failure)}"
            shown = redact(self.url)
            raise ConnectionError(f"cannot subscribe on the bus at {shown}{why}") from None

    def publish(self, message: BusMessage) -> None:
        """Send a message on the bus at the end of this loop turn, without waiting;
        dropped when queue_limit of them already wait for a connection."""
        if isinstance(message, Notice) and not message.node:
            message = Notice(message.stream, message.seq, message.id, message.fields, self.node)
        elif isinstance(message, Revoke) and not message.node:
            message = Revoke(message.user_id, message.digests, self.node)
        if len(self._unsent) >= self._queue_limit:
            self.counts.dropped += 1
            return
        self._unsent.append(encode(message))
        if not self._flush_due and self._out is not None:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write what waits as PUBLISH commands (one per PAYLOAD_LIMIT bytes: module
        doc), in order, in one write; the connection asks for no replies."""
        self._flush_due = False
        out = self._out
        if out is None or not self._unsent:
            return  # the connection's task sends them once it is back
        if out.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            # Redis is not reading (a black-holed link): drop rather than hoard; the
            # connection's task replaces the link (module doc).
            self.counts.dropped += len(self._unsent)
            self._unsent = []
            return
        commands: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for encoded in self._unsent:
            batch.append(encoded)
            size += len(encoded)
            if size >= PAYLOAD_LIMIT:
                commands.append(self._publish(batch, size))
                batch, size = [], 0
        if batch:
            commands.append(self._publish(batch, size))
        self.counts.published += len(self._unsent)
        self._unsent = []
        out.write(b"".join(commands))

    def _publish(self, encodings: list[bytes], size: int) -> bytes:
        """One PUBLISH of these encodings back to back, in Redis's wire format."""
        return b"".join((self._publish_command, b"$%d\r\n" % size, *encodings, b"\r\n"))

    @property
    def publishing(self) -> bool:
        """Whether the publishing connection is up (what waits meanwhile is sent then)."""
        return self._out is not None

    async def close(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    async def _subscriber(self) -> None:
        first = True
        while True:
            subscription: _Subscription | None = None
            try:
                subscription = await self._subscribe()
                if not first:
                    self.counts.reconnects += 1
                    log.info("bus: subscribed again to %s: resynchronising", redact(self.url))
                    self._on_resync()
                first = False
                self.subscribed.set()
                await self._read(subscription)
            except Exception as exc:  # OSError, TimeoutError, an error reply (not a cancel)
                self._failure = exc
                log.warning("bus: subscriber connection lost (%s); reconnecting",
                            _describe(exc))
            finally:
                self.subscribed.clear()
                if subscription is not None:
                    subscription.transport.abort()
            await asyncio.sleep(self._reconnect_delay)

    async def _subscribe(self) -> _Subscription:
        """A connection subscribed to the bus channel and the other nodes' (module doc),
        read by a protocol of its own: redis-py's pub/sub reading (get_message, its
        parser and retry layers, a task switch per message) was most of a receiving
        node's cost of the bus."""
        patterns = others_patterns(self.channel, self.node)
        subscription = _Subscription(self._message, 1 + len(patterns))
        timeout = max(self._liveness, 1.0)
        await _connect(self.url, timeout, lambda: subscription)
        try:
            async with asyncio.timeout(timeout):
                await subscription.auth(self.url)
                subscription.send(_command(b"SUBSCRIBE", self.channel.encode())
                                  + _command(b"PSUBSCRIBE", *(p.encode() for p in patterns)))
                await subscription.subscribed()
        except BaseException:
            subscription.transport.abort()
            raise
        return subscription

    def _message(self, data: bytes) -> None:
        self.counts.payloads += 1
        self._take(data)

    async def _read(self, subscription: _Subscription) -> None:
        """Until the connection is lost, or silent for ``liveness`` seconds although
        pinged every third of it (a black-holed link keeps its socket open)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.wait([subscription.lost], timeout=self._liveness / 3)
            if subscription.lost.done():
                raise subscription.why
            if loop.time() - subscription.heard > self._liveness:
                raise TimeoutError(f"nothing from Redis for {self._liveness:g} s")
            subscription.send(_command(b"PING"))  # the wait timed out: a third of liveness

    def _take(self, data: bytes) -> None:
        try:
            messages = decode_all(data)
        except BusFormatError as exc:
            self.counts.malformed += 1
            log.warning("bus: dropped a message: %s", exc)
            return
        # All of it is for this node: it subscribes to no channel of its own, and the bus
        # channel carries what every node takes (presence, its own included, and admin's
        # revokes, whatever name their publisher goes by).
        for message in messages:
            self.counts.received += 1
            self._receive(message)

    async def _publisher(self) -> None:
        """Keep the publishing connection: a plain socket whose commands Redis does not
        answer (CLIENT REPLY OFF): PUBLISH through redis-py, its reply read, parsed and
        awaited by a task of its own, cost a sending node more than the write itself, at
        one PUBLISH per group commit.  A lost connection (Redis gone, or a link that takes
        nothing for ``liveness`` seconds) is replaced; what waited meanwhile is sent then,
        or dropped (counted) if the connection cannot be made."""
        while True:
            try:
                connection = await self._connect_publishing()
            except Exception as exc:  # OSError, TimeoutError, refused AUTH (not a cancel)
                # At most once: the position checks on the other nodes fill the gap.
                if self._unsent:
                    log.warning("bus: %d notices not published (%s)", len(self._unsent), exc)
                    self.counts.dropped += len(self._unsent)
                    self._unsent = []
                await asyncio.sleep(self._reconnect_delay)
                continue
            self._out = connection.transport
            try:
                self._flush()
                await self._watch(connection)
            except Exception as exc:  # not a cancel: CancelledError is a BaseException
                log.warning("bus: publishing connection lost (%s); reconnecting", exc)
            finally:
                self._out = None
                connection.transport.abort()
            await asyncio.sleep(self._reconnect_delay)

    async def _connect_publishing(self) -> _Connection:
        """A connection, authenticated, that answers no command (CLIENT REPLY OFF)."""
        connection = _Connection()
        timeout = max(self._liveness, 1.0)
        await _connect(self.url, timeout, lambda: connection)
        try:
            async with asyncio.timeout(timeout):
                await connection.auth(self.url)
            connection.send(_command(b"CLIENT", b"REPLY", b"OFF"))
        except BaseException:
            connection.transport.abort()
            raise
        return connection

    async def _watch(self, connection: _Connection) -> None:
        """Return when the publishing connection is gone: closed by Redis, or its
        writes stuck for ``liveness`` seconds (a black-holed link).  Nothing is answered
        on it after CLIENT REPLY OFF but errors of the connection itself (logged)."""
        stuck_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.wait([connection.lost], timeout=self._liveness / 3)
            if connection.lost.done():
                raise connection.why
            if connection.transport.get_write_buffer_size() == 0:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = loop.time()
            elif loop.time() - stuck_since >= self._liveness:
                raise TimeoutError(f"Redis took nothing for {self._liveness:g} s")


WRITE_BUFFER_LIMIT = 16 * 1024 * 1024  # bytes unsent to Redis before notices are dropped


def _describe(exc: Exception) -> str:
    """An exception as a reason: its text, or its type's name where it has none (a
    TimeoutError's is empty)."""
    return str(exc) or type(exc).__name__


def _publish_prefix(channel: str) -> bytes:
    """A PUBLISH on ``channel`` in Redis's wire format, up to its payload's length."""
    name = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(name), name)


def _command(*words: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        parts.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """A Redis connection read with hiredis's parser: ``reply`` gets each reply."""

    def __init__(self) -> None:
        import hiredis  # the optional extra: chatd[redis]

        loop = asyncio.get_running_loop()
        self._loop = loop
        self._parser = hiredis.Reader()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # at once
        # Done when the connection is gone (``why``): a result, never an exception,
        # so that no one has to retrieve it.
        self.lost: asyncio.Future[None] = loop.create_future()
        self.why: Exception = ConnectionError("closed by Redis")
        self.heard = loop.time()  # when anything last came
        self._answer: asyncio.Future[Any] | None = None  # a command's reply awaited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A socket's transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.why = exc
        self.lost.set_result(None)  # asyncio calls this once per connection
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(ConnectionError("closed by Redis"))

    def data_received(self, data: bytes) -> None:
        self.heard = self._loop.time()
        self._parser.feed(data)
        while (reply := self._parser.gets()) is not False:
            self.reply(reply)

    def reply(self, reply: Any) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(reply)
        elif isinstance(reply, Exception):
            log.warning("bus: Redis says: %s", reply)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    async def auth(self, url: str) -> None:
        """AUTH with the URL's credentials, if it has any; ConnectionError if refused."""
        options = _parse_url(url)
        password = options.get("password")
        if password is None:
            return
        user = options.get("username")
        self._answer = self._loop.create_future()
        self.send(_command(b"AUTH", *([user.encode()] if user else []), password.encode()))
        answer = await self._answer
        self._answer = None
        if isinstance(answer, Exception):
            raise ConnectionError(f"AUTH refused: {answer}")


class _Subscription(_Connection):
    """The subscriber's connection: confirmations, then messages (to ``message``)."""

    def __init__(self, message: Callable[[bytes], None], channels: int) -> None:
        super().__init__()
        self._message = message
        self._unconfirmed = channels
        self.confirmed: asyncio.Future[None] = self._loop.create_future()

    async def subscribed(self) -> None:
        """Until Redis confirms every subscription; raises why if it refuses or the
        connection is lost first (a TLS server that wants a client certificate closes
        it after the handshake): not a wait for the timeout with the reason unknown."""
        await asyncio.wait([self.confirmed, self.lost], return_when=asyncio.FIRST_COMPLETED)
        if not self.confirmed.done():
            raise self.why
        self.confirmed.result()  # a refusal (NOAUTH, NOPERM...) raises here

    def _take(self, data: bytes) -> None:
        try:
            self._message(data)
        except Exception:  # one bad message must not end the subscription
            log.exception("bus: handling a message failed")

    def reply(self, reply: Any) -> None:
        if type(reply) is list and reply:
            kind = reply[0]
            if kind == b"message" and len(reply) == 3:
                self._take(reply[2])
                return
            if kind == b"pmessage" and len(reply) == 4:
                self._take(reply[3])
                return
            if kind in (b"subscribe", b"psubscribe"):
                self._unconfirmed -= 1
                if self._unconfirmed == 0 and not self.confirmed.done():
                    self.confirmed.set_result(None)
                return
            if kind == b"pong":
                return
        if isinstance(reply, Exception) and self._answer is None:
            # Refused (NOAUTH, NOPERM...): give the connection up, saying why.
            self.why = ConnectionError(f"Redis says: {reply}")
            if not self.confirmed.done():
                self.confirmed.set_exception(self.why)
            self.transport.abort()
            return
        super().reply(reply)


def _parse_url(url: str) -> dict[str, Any]:
    """The URL as redis-py reads it (redis://, rediss://, unix://)."""
    from redis.connection import parse_url as untyped  # the optional extra: chatd[redis]

    parse_url: Callable[[str], dict[str, Any]] = untyped
    return parse_url(url)


async def _connect(url: str, timeout: float, protocol: Callable[[], asyncio.Protocol]) -> None:
    """Connect ``protocol`` to the Redis at ``url``."""
    options = _parse_url(url)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if "path" in options:
            await loop.create_unix_connection(protocol, options["path"])
        else:
            tls = _tls_context(options) if url.startswith("rediss://") else None
            await loop.create_connection(
                protocol, options.get("host", "localhost"), options.get("port", 6379), ssl=tls
            )


def _tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS of a rediss:// URL (``options``: the URL as _parse_url reads it), built by
    redis-py itself, as it builds it for its own connections (presence): ssl_ca_certs,
    ssl_certfile, ssl_keyfile, ssl_password, ssl_cert_reqs, ssl_check_hostname and the
    rest, with redis-py's defaults (the certificate checked against the system's
    authorities, and those of ssl_ca_certs too, and the host name).  A context of the
    bus's own once trusted ssl_ca_certs alone, and ignored ssl_password and ssl_ca_path:
    a server redis-py took, the bus refused."""
    from redis.asyncio.connection import SSLConnection  # the optional extra: chatd[redis]

    settings = {k: v for k, v in options.items() if k != "connection_class"}
    context: ssl.SSLContext = SSLConnection(**settings).ssl_context.get()
    return context


async def publish_once(url: str, message: BusMessage, timeout: float = 5.0) -> None:
    """Publish one message from outside a node (``chatd admin``); raises ConnectionError
    if Redis cannot be reached within ``timeout`` seconds."""
    from redis import asyncio as aioredis

    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=timeout
    )
    try:
        await client.publish(BUS_CHANNEL, encode(message))
    except Exception as exc:  # redis-py's own errors, OSError
        raise ConnectionError(f"cannot publish on the bus at {redact(url)}: {exc}") from None
    finally:
        await _quietly(client.aclose())


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to end, cancelling again any that goes on:
    Python 3.11's asyncio.timeout (redis-py's socket timeouts) turns a cancellation
    that meets its own expiry into a TimeoutError, which the loops catch and survive."""
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    # Every one done: their failures (logged where they happened) retrieved at once.
    await asyncio.gather(*tasks, return_exceptions=True)


async def _quietly(closing: Awaitable[Any]) -> None:
    try:
        async with asyncio.timeout(2):
            await closing
    except Exception:  # closing a broken connection: nothing left to save
        log.debug("bus: closing a connection failed", exc_info=True)


# Presence.

# Each script runs atomically in Redis, so of two nodes binding (or unbinding) one user
# at once exactly one sees the transition, and the PUBLISH of the transition takes its
# place in the bus channel in the order of the changes: every node, the changing one
# included, hears a user's transitions in one order.

# KEYS: the user's set, this node's users.  ARGV: node, expires at, now, key TTL, user
# id, the online notice, the offline notice (kept for a janitor), the bus channel.
_ONLINE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[5], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[4])
local count = redis.call('ZCARD', KEYS[1])
if count == 1 then redis.call('PUBLISH', ARGV[8], ARGV[6]) end
return count
"""

# KEYS: the user's set, this node's users.  ARGV: node, now, user id, the offline
# notice, the bus channel.
_OFFLINE_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count == 0 then redis.call('PUBLISH', ARGV[5], ARGV[4]) end
return count
"""

# A node whose heartbeat lapsed (or this node's previous life, with force): its users
# are taken out, and those left without a node go offline.  Claimed by ZREM, so of
# several janitors one does it.  KEYS: the nodes, the dead node's users.  ARGV: dead
# node, now, force ("1"), the presence key prefix, the bus channel.
_BURY_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 and ARGV[3] ~= '1' then return -1 end
local entries = redis.call('HGETALL', KEYS[2])
local gone = 0
for i = 1, #entries, 2 do
  local key = ARGV[4] .. entries[i]
  redis.call('ZREM', key, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[2])
  if redis.call('ZCARD', key) == 0 then
    redis.call('PUBLISH', ARGV[5], entries[i + 1])
    gone = gone + 1
  end
end
redis.call('DEL', KEYS[2])
return gone
"""


class RedisPresence:
    """Who has a session on some node, and the transitions announced (module doc);
    one instance per node.

    A user's first session on this node adds the node to the user's sorted set and,
    if no other node is there, publishes the user's ``PresenceChange`` (online) on the
    bus; the last one's end removes it and, if no node is left, publishes offline.
    Each node refreshes a heartbeat and its entries every ``ttl / 3`` seconds and looks
    for lapsed heartbeats every ``min(ttl / 3, 1)`` seconds: a killed node's users are
    taken out, and announced offline, ``ttl`` plus at most that much after its last
    refresh.  While Redis cannot be reached, ``unshared`` gets the transitions of this
    node's own sessions (single-node behaviour) instead.
    """

    def __init__(
        self,
        url: str,
        node: str,
        ttl: float,
        channel: str = BUS_CHANNEL,
        unshared: Callable[[PresenceChange], None] | None = None,
    ) -> None:
        self.node, self.ttl, self.channel = node, ttl, channel
        self._url = url
        self._unshared = unshared
        # This node's users, each with their offline notice (for the janitors).
        self._users: dict[int, bytes] = {}
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._refreshed = False
        # Writes go out one at a time, in the order asked: an "offline" never overtakes
        # the "online" before it.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        from redis import asyncio as aioredis

        timeout = max(self.ttl / 3, 1.0)
        self._client = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        for name, script in (("online", _ONLINE_SCRIPT), ("offline", _OFFLINE_SCRIPT),
                             ("bury", _BURY_SCRIPT)):
            self._scripts[name] = self._client.register_script(script)
        try:
            # A previous life of this node (same --node-id, killed): its users are gone.
            await self._bury(self.node, force=True)
        except Exception as exc:  # Redis down: the refresh loop writes when it is back
            log.warning("presence: cannot clear this node's old entries (%s)", exc)
        self._task = asyncio.create_task(self._refresh_forever(), name="presence")

    async def close(self, forget: bool = True) -> None:
        """Stop refreshing; with ``forget``, take this node's entries out at once (its
        users with no other node go offline)."""
        if self._task is not None:
            await stop_tasks([self._task])
        if self._client is None:
            return  # closed already
        if forget:
            await _quietly(self._bury(self.node, force=True))
        await _quietly(self._client.aclose())
        self._client = None

    def online_here(self, user_id: int, name: str = "", channels: Iterable[int] = ()) -> None:
        """A user's first session on this node."""
        channels = tuple(channels)
        offline = encode(PresenceChange(user_id, name, False, channels, self.node))
        self._users[user_id] = offline
        change = PresenceChange(user_id, name, True, channels, self.node)
        self._spawn(self._announce_online(change, offline), change)

    def offline_here(self, user_id: int, name: str = "", channels: Iterable[int] = ()) -> None:
        """A user's last session on this node ended."""
        self._users.pop(user_id, None)
        change = PresenceChange(user_id, name, False, tuple(channels), self.node)
        self._spawn(self._announce_offline(change), change)

    async def is_online(self, user_id: int) -> bool:
        if user_id in self._users:
            return True
        count = await self._client.zcount(_presence_key(user_id), time.time(), "+inf")
        return bool(count)

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        """Those of ``user_ids`` with a live entry of any node."""
        asked = list(user_ids)
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for user_id in asked:
            pipe.zcount(_presence_key(user_id), now, "+inf")
        counts = await pipe.execute()
        return {u for u, count in zip(asked, counts, strict=True) if count}

    async def refresh(self) -> None:
        """Renew the heartbeat and every entry of this node.  A heartbeat that was gone
        (Redis restarted empty, or other nodes took this one for dead) means the others
        may have heard these users go offline: they are announced online again."""
        async with self._lock:
            users = dict(self._users)
            now = time.time()
            pipe = self._client.pipeline(transaction=False)
            pipe.zadd(NODES_KEY, {self.node: now + self.ttl})
            for user_id in users:
                key = _presence_key(user_id)
                pipe.zadd(key, {self.node: now + self.ttl})
                pipe.zremrangebyscore(key, "-inf", now)  # other nodes' lapsed entries
                pipe.expire(key, self._key_ttl)
            if users:
                pipe.hset(self._users_key, mapping=users)
                pipe.expire(self._users_key, self._key_ttl)
            added, *_ = await pipe.execute()
            if added and self._refreshed:
                log.warning("presence: this node's heartbeat was gone: announcing again")
                for user_id, offline in users.items():
                    change = decode(offline)
                    assert isinstance(change, PresenceChange)
                    online = PresenceChange(user_id, change.name, True, change.channels)
                    await self._announce_online(online, offline)
            self._refreshed = True

    async def bury_lapsed(self) -> int:
        """Take out the nodes whose heartbeat lapsed; how many were."""
        dead = await self._client.zrangebyscore(NODES_KEY, "-inf", time.time())
        for node in dead:
            name = node.decode() if isinstance(node, bytes) else str(node)
            if name != self.node:
                log.info("presence: node %s is gone: its users go offline", name)
                await self._bury(name)
        return len(dead)

    @property
    def _users_key(self) -> str:
        return f"{NODE_USERS_PREFIX}{self.node}"

    @property
    def _key_ttl(self) -> int:
        """Seconds this node's keys outlive a refresh: past its heartbeat's lapse (ttl)
        by more than a janitor's longest wait (1 s), so that the janitor still finds the
        users to announce offline. int(ttl * 2) alone gave 1 s for a ttl of 0.9."""
        return math.ceil(self.ttl * 2) + 2

    async def _announce_online(self, change: PresenceChange, offline: bytes) -> None:
        await self._scripts["online"](
            keys=[_presence_key(change.user_id), self._users_key],
            args=[self.node, time.time() + self.ttl, time.time(), self._key_ttl,
                  change.user_id, encode(change), offline, self.channel],
        )

    async def _announce_offline(self, change: PresenceChange) -> None:
        await self._scripts["offline"](
            keys=[_presence_key(change.user_id), self._users_key],
            args=[self.node, time.time(), change.user_id, encode(change), self.channel],
        )

    async def _bury(self, node: str, force: bool = False) -> None:
        await self._scripts["bury"](
            keys=[NODES_KEY, f"{NODE_USERS_PREFIX}{node}"],
            args=[node, time.time(), "1" if force else "0", PRESENCE_PREFIX, self.channel],
        )

    async def _refresh_forever(self) -> None:
        period = self.ttl / 3
        tick = min(period, 1.0)
        loop = asyncio.get_running_loop()
        refreshed = -period
        while True:
            try:
                if loop.time() - refreshed >= period - tick / 2:
                    refreshed = loop.time()
                    await self.refresh()
                await self.bury_lapsed()
            except Exception as exc:  # Redis down: entries may lapse; they return with it
                log.warning("presence: refresh failed (%s)", exc)
            await asyncio.sleep(tick)

    def _spawn(self, work: Awaitable[None], change: PresenceChange) -> None:
        async def run() -> None:
            try:
                async with self._lock:
                    await work
            except Exception as exc:  # the refresh loop writes the entry again
                log.warning("presence: update failed (%s): announced on this node only", exc)
                if self._unshared is not None:
                    self._unshared(change)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _presence_key(user_id: int) -> str:
    return f"{PRESENCE_PREFIX}{user_id}"
