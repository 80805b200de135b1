"""Several nodes: Redis pub/sub carries notices between them; the store is the truth.

Three parts, each usable alone (the server wires them together, README "Running
several nodes"):

- ``RedisBus``: after COMMIT a node publishes a ``Notice`` (stream, seq, id and the
  message's fields) on one Redis channel; every node receives every notice.  Redis
  pub/sub is at-most-once: a notice published while a node is disconnected is gone.
  Publishing never blocks a send: notices queue (bounded) for one writer task, and a
  full queue or a failed publish drops them, counted.  The writer sends whatever has
  queued as one Redis message, the encodings back to back (``decode_all``): one
  PUBLISH, and one message for each node to read, per batch instead of per notice
  (redis-py's work per message was most of a node's CPU at 2,000 notices/s; every
  node reads its own notices too).  The subscriber connection is pinged every
  ``liveness / 3`` seconds and torn down when nothing at all has arrived for
  ``liveness`` seconds (a black-holed link keeps its socket open); every
  (re)subscription, the first excepted, calls ``on_resync``.
- ``StreamOrder``: per stream a node follows, the highest seq pushed to its local
  sessions (and that message's id).  The next seq is pushed; a seq already pushed is
  dropped (the sender's own echo, a link that came back); a seq beyond the next makes
  the node read the stream from the store past its position and push what it finds,
  in order.  ``check_positions`` (every ``bus_position_check`` seconds, and at once on
  ``on_resync``) does that read for every followed stream: the only guard against a
  lost *last* notice and against a node killed between COMMIT and publish.
- ``RedisPresence``: per user a sorted set of the nodes with a session for them,
  scored by expiry time; each node refreshes its own entries every ``ttl / 3``
  seconds, so a killed node's users read as offline at most ``ttl`` seconds later.
  Node clocks are assumed to agree within a second (NTP).

Stream names: ``c:<channel id>`` for a channel, ``u:<user id>`` for a user's inbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import msgpack

log = logging.getLogger(__name__)

BUS_CHANNEL = "chatd:bus"
PAYLOAD_LIMIT = 256 * 1024  # bytes of queued messages sent as one Redis message
PRESENCE_PREFIX = "chatd:online:"
WIRE_VERSION = 1
_NOTICE, _REVOKE = "n", "r"


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


BusMessage = Notice | Revoke


def encode(message: BusMessage) -> bytes:
    if isinstance(message, Notice):
        body = [WIRE_VERSION, _NOTICE, message.node, message.stream, message.seq, message.id,
                message.fields]
    else:
        body = [WIRE_VERSION, _REVOKE, message.node, message.user_id, list(message.digests)]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode(data: bytes) -> BusMessage:
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BusFormatError(f"not msgpack: {exc}") from None
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
    raise BusFormatError(f"malformed bus message of kind {kind!r}")


def decode_all(data: bytes) -> list[BusMessage]:
    """The messages of one payload, in order (a payload is one or more encodings back
    to back); BusFormatError if any of it is not a message."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    messages, start = [], 0
    while start < len(data):
        try:
            unpacker.skip()
        except msgpack.OutOfData:
            raise BusFormatError("a message cut short") from None
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise BusFormatError(f"not msgpack: {exc}") from None
        end = unpacker.tell()
        messages.append(decode(data[start:end]))
        start = end
    if not messages:
        raise BusFormatError("an empty payload")
    return messages


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

    def repair(self, stream: str) -> None:
        """Read ``stream`` from the store past its position and push what is there."""
        if stream not in self._high:
            return
        if stream in self._repairs:
            self._again.add(stream)  # it may have read before this message committed
            return
        task = asyncio.create_task(self._repair(stream))
        self._repairs[stream] = task
        task.add_done_callback(lambda done: self._repaired(stream, done))

    def check_positions(self) -> None:
        """Repair every followed stream: the guard against a lost *last* notice."""
        for stream in list(self._high):
            self.repair(stream)

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

    async def _repair(self, stream: str) -> None:
        while True:
            high = self._high.get(stream)
            if high is None:
                return  # unfollowed meanwhile
            page = await self._log.read(stream, high.id, self._page_size)
            for message in page:
                if self._high.get(stream) is not high:
                    return
                if message.id > high.id:  # holes (deleted rows) are skipped, never waited for
                    self.counts.repaired += 1
                    self._deliver(stream, high, message)
            if len(page) < self._page_size:
                return  # the store has no more


# The Redis connections.


@dataclass(slots=True)
class BusCounts:
    published: int = 0
    received: int = 0
    dropped: int = 0  # notices not published: queue full or Redis unreachable
    malformed: int = 0
    reconnects: int = 0


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
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(queue_limit)
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()
        self.counts = BusCounts()

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
            raise ConnectionError(f"cannot subscribe on the bus at {self.url}") from None

    def publish(self, message: BusMessage) -> None:
        """Queue a message for the bus without waiting; a full queue drops it."""
        if isinstance(message, Notice) and not message.node:
            message = Notice(message.stream, message.seq, message.id, message.fields, self.node)
        elif isinstance(message, Revoke) and not message.node:
            message = Revoke(message.user_id, message.digests, self.node)
        try:
            self._queue.put_nowait(encode(message))
        except asyncio.QueueFull:
            self.counts.dropped += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _client(self) -> Any:
        from redis import asyncio as aioredis  # the optional extra: chatd[redis]

        timeout = max(self._liveness, 1.0)
        return aioredis.Redis.from_url(
            self.url, socket_connect_timeout=timeout, socket_timeout=timeout,
            retry_on_timeout=False,
        )

    async def _subscriber(self) -> None:
        first = True
        while True:
            client = self._client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                if not first:
                    self.counts.reconnects += 1
                    log.info("bus: subscribed again to %s: resynchronising", self.url)
                    self._on_resync()
                first = False
                self.subscribed.set()
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py's ConnectionError, TimeoutError, OSError...
                log.warning("bus: subscriber connection lost (%s); reconnecting", exc)
            finally:
                self.subscribed.clear()
                await _quietly(pubsub.aclose())
                await _quietly(client.aclose())
            await asyncio.sleep(self._reconnect_delay)

    async def _read(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        while True:
            message = await pubsub.get_message(timeout=self._liveness / 3)
            now = loop.time()
            if message is not None:
                heard = now
                if message.get("type") == "message":
                    self._take(message["data"])
                continue
            if now - heard > self._liveness:
                raise TimeoutError(f"nothing from Redis for {self._liveness:g} s")
            if now - pinged >= self._liveness / 3:
                pinged = now
                await pubsub.ping()

    def _take(self, data: bytes) -> None:
        try:
            messages = decode_all(data)
        except BusFormatError as exc:
            self.counts.malformed += 1
            log.warning("bus: dropped a message: %s", exc)
            return
        for message in messages:
            if message.node == self.node:
                continue  # delivered locally when published
            self.counts.received += 1
            self._receive(message)

    async def _publisher(self) -> None:
        client = self._client()
        try:
            while True:
                batch = [await self._queue.get()]
                size = len(batch[0])
                while not self._queue.empty() and size < PAYLOAD_LIMIT:
                    batch.append(self._queue.get_nowait())
                    size += len(batch[-1])
                try:
                    # One Redis message for the lot (module doc), in queue order.
                    await client.publish(self.channel, b"".join(batch))
                    self.counts.published += len(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # At most once: the position checks on the other nodes fill the gap.
                    self.counts.dropped += len(batch)
                    log.warning("bus: %d notices not published (%s)", len(batch), exc)
                    await _quietly(client.aclose())
                    client = self._client()
                    await asyncio.sleep(self._reconnect_delay)
        finally:
            await _quietly(client.aclose())


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
        raise ConnectionError(f"cannot publish on the bus at {url}: {exc}") from None
    finally:
        await _quietly(client.aclose())


async def _quietly(closing: Awaitable[Any]) -> None:
    try:
        async with asyncio.timeout(2):
            await closing
    except Exception:  # closing a broken connection: nothing left to save
        log.debug("bus: closing a connection failed", exc_info=True)


# Presence.


class RedisPresence:
    """Who has a session on some node (module doc); one instance per node."""

    def __init__(self, url: str, node: str, ttl: float) -> None:
        self.node, self.ttl = node, ttl
        self._url = url
        self._users: set[int] = set()
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # Writes go out one at a time, in the order asked: an "offline" never overtakes
        # the "online" before it.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        from redis import asyncio as aioredis

        timeout = max(self.ttl / 3, 1.0)
        self._client = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        self._task = asyncio.create_task(self._refresh_forever(), name="presence")

    async def close(self, forget: bool = True) -> None:
        """Stop refreshing; with ``forget``, take this node's entries out at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if forget and self._users and self._client is not None:
            await _quietly(self._remove(self._users))
        if self._client is not None:
            await _quietly(self._client.aclose())

    def online_here(self, user_id: int) -> None:
        """A user's first session on this node."""
        self._users.add(user_id)
        self._spawn(self._write([user_id]))

    def offline_here(self, user_id: int) -> None:
        """A user's last session on this node ended."""
        self._users.discard(user_id)
        self._spawn(self._remove([user_id]))

    async def is_online(self, user_id: int) -> bool:
        if user_id in self._users:
            return True
        count = await self._client.zcount(_presence_key(user_id), time.time(), "+inf")
        return bool(count)

    async def online(self, user_ids: Iterable[int]) -> set[int]:
        """Those of ``user_ids`` with a live entry of any node."""
        asked = list(user_ids)
        if not asked:
            return set()
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for user_id in asked:
            pipe.zcount(_presence_key(user_id), now, "+inf")
        counts = await pipe.execute()
        return {u for u, count in zip(asked, counts, strict=True) if count}

    async def refresh(self) -> None:
        async with self._lock:
            await self._write(list(self._users))

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # Redis down: entries may lapse; they return with it
                log.warning("presence: refresh failed (%s)", exc)
            await asyncio.sleep(self.ttl / 3)

    async def _write(self, users: Iterable[int]) -> None:
        users = list(users)
        if not users:
            return
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for user_id in users:
            key = _presence_key(user_id)
            pipe.zadd(key, {self.node: now + self.ttl})
            pipe.zremrangebyscore(key, "-inf", now)  # other nodes' lapsed entries
            pipe.expire(key, max(1, int(self.ttl * 2)))
        await pipe.execute()

    async def _remove(self, users: Iterable[int]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for user_id in users:
            pipe.zrem(_presence_key(user_id), self.node)
        await pipe.execute()

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                async with self._lock:
                    await work
            except Exception as exc:  # the refresh loop writes it again
                log.warning("presence: update failed (%s)", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _presence_key(user_id: int) -> str:
    return f"{PRESENCE_PREFIX}{user_id}"
