"""Several nodes as one server: the bus (chatd.bus) over Redis (chatd.bus_redis).

``ClusterBus`` is the Bus of a node started with ``--bus redis://...``.  A committed
event goes to this node's hub at once and to Redis for the others; whichever way a
stored message arrives (its own publish, another node's notice, a read of the store),
it reaches the hub through one ``StreamOrder`` per node, so each message is pushed once,
in its stream's seq order, and a lost notice is read from the store (the truth):

- a stream is followed while this node has interest in it (for an inbox, any session
  of its user here, subscribed or not any more: cheaper than telling them apart; for a
  channel, a subscribed member here), from the moment a session starts following it:
  from the newest message this node has seen of it (it hears every notice) or, for a
  stream it has not heard of, from a store read (the user's
  acknowledged position for an inbox, the newest message for a channel); what came
  before is the subscription's own catch-up.  While that position is read, the
  stream's messages are held, then pushed;
- every ``bus_position_check`` seconds, and at once when the bus reconnects, every
  followed stream is read past its position (a lost last message, a node killed
  between COMMIT and publish), and streams without local interest are dropped.  One
  statement reads every followed stream's newest seq (MessageStore.stream_heads); only
  the streams behind it are read;
- events outside streams (a sender's copy, joins, leaves) are live only: a node that
  misses them (Redis down) does not replay them; the store still has the messages.

The calling connection gets its reply instead of its own event (protocol.md section
9): ``origin`` is a session serial of the publishing node, so other nodes deliver
with origin 0, and a local event that goes the store's way keeps its origin.

Presence is in Redis (chatd.bus_redis.RedisPresence): a user's first session on the
cluster and their last one's end are announced once, on the bus, in one order for every
node (a user on two nodes does not flap).  A token revoked on one node
(``/logout``, ``chatd admin revoke-tokens``) is a bus message that ends its sessions
on every node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Collection
from typing import Any

from chatd.bus_redis import (
    BusMessage,
    Notice,
    PresenceChange,
    RedisBus,
    RedisPresence,
    Revoke,
    StreamOrder,
    channel_stream,
    inbox_stream,
    stop_tasks,
)
from chatd.config import Config
from chatd.hub import Hub
from chatd.model import (
    ChannelPost,
    InboxMessage,
    Join,
    Leave,
    Published,
    SentCopy,
    StreamEvent,
)
from chatd.store import MessageStore
from chatd.urls import redact

log = logging.getLogger(__name__)

# Event types as they travel, by name (a node never builds a class it was not sent).
_EVENT_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (InboxMessage, ChannelPost, SentCopy, Join, Leave)
}
SEEN_LIMIT = 1_000_000  # streams remembered (two ints each) before starting over


REDIS_EXTRA = "pip install 'chatd[redis]'"


def require_redis() -> None:
    """Raises RuntimeError naming the extra if redis-py or hiredis is missing."""
    try:
        import hiredis  # noqa: F401  (the bus reads Redis with its parser)
        import redis  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"--bus redis:// needs the redis-py driver and hiredis: {REDIS_EXTRA}"
        ) from None


def stream_of(event: Published) -> str | None:
    """The stream a stored message belongs to; None for live-only events."""
    if isinstance(event, InboxMessage):
        return inbox_stream(event.recipient_id)
    if isinstance(event, ChannelPost):
        return channel_stream(event.channel_id)
    return None


_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _travelling_fields(cls: type[Any]) -> tuple[str, ...]:
    """The constructor's fields: front-ends' encodings and memos are not (init=False),
    nor the origin.  Once per class: dataclasses.fields on every publish was about a
    tenth of the bus's cost on a sending node."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(
            f.name for f in dataclasses.fields(cls) if f.init and f.name != "origin"
        )
    return names


def to_notice(event: Published, node: str = "") -> Notice:
    fields = {name: getattr(event, name) for name in _travelling_fields(type(event))}
    fields["type"] = type(event).__name__
    seq = getattr(event, "seq", 0)
    message_id = getattr(event, "id", 0)
    return Notice(stream_of(event) or "", seq, message_id, fields, node)


def from_notice(notice: Notice) -> Published:
    """The event a notice carries, with origin 0 (its origin is on another node).
    Raises ValueError if the notice holds no event this node knows."""
    fields = dict(notice.fields)
    cls = _EVENT_TYPES.get(fields.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown event type in notice {notice.stream}:{notice.seq}")
    try:
        event: Published = cls(**fields)
    except TypeError as exc:
        raise ValueError(f"bad event fields: {exc}") from None
    return event


class StoreLog:
    """A stream read from the store, as events (StreamOrder's StreamLog)."""

    def __init__(self, store: MessageStore) -> None:
        self._store = store

    async def read(self, stream: str, after_id: int, limit: int) -> list[StreamEvent]:
        kind, _, key = stream.partition(":")
        target = int(key)
        if kind == "u":
            rows = await self._store.inbox_after(target, after_id, limit)
            return [
                InboxMessage(target, m.id, m.sender, m.body, m.created_at, m.seq) for m in rows
            ]
        name = await self._store.channel_name(target)
        posts = await self._store.channel_after(target, after_id, limit, 0, 0)
        return [
            ChannelPost(target, name, m.id, m.sender, m.body, m.created_at, 0, m.seq)
            for m in posts
        ]


class ClusterBus:
    """The Bus of one node among several (module doc)."""

    def __init__(self, config: Config, hub: Hub, store: MessageStore, node: str) -> None:
        self.node = node
        self._hub = hub
        self._interval = config.bus_position_check
        self.order: StreamOrder[StreamEvent] = StreamOrder(StoreLog(store), self._push)
        self.redis = RedisBus(
            config.bus, node, self._receive, self._resync,
            liveness=max(3 * config.bus_position_check, 1.0),
        )
        self.presence = RedisPresence(
            config.bus, node, config.presence_ttl, self.redis.channel, self._announce
        )
        # Origins of this node's own events that wait for a store read (keyed by id).
        self._origins: dict[int, int] = {}
        self._checker: asyncio.Task[None] | None = None
        self._resyncs: set[asyncio.Task[None]] = set()
        hub.on_presence = self._presence_changed
        hub.on_follow = self._follow
        self._store = store
        # Streams whose starting position is being read: their messages meanwhile.
        self._pending: dict[str, list[StreamEvent]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        # The newest (seq, id) seen of each stream not followed, and the start of
        # streams followed from a store read since the last position check.
        self._seen: dict[str, tuple[int, int]] = {}
        self._early: dict[str, int] = {}
        # Test-only fault hook (tests/test_cluster.py): die between COMMIT and publish
        # when a message with this text is published.
        fault = os.environ.get("CHATD_TEST_FAULT", "")
        prefix = "exit-before-publish:"
        self._exit_before_publishing = (
            fault.removeprefix(prefix) or None if fault.startswith(prefix) else None
        )

    async def start(self) -> None:
        await self.redis.start()
        await self.presence.start()
        self._checker = asyncio.create_task(self._check_forever(), name="position-check")
        log.info("node %s on bus %s", self.node, redact(self.redis.url))

    async def close(self) -> None:
        await stop_tasks([*self._starting.values(), *self._resyncs,
                          *([self._checker] if self._checker else [])])
        self.order.close()
        await self.redis.close()
        await self.presence.close()

    # The Bus Protocol.

    def publish(self, event: Published) -> None:
        # Only in a node that then ends by os._exit, which writes no coverage data.
        if self._exit_before_publishing is not None:  # pragma: no cover
            self._fault(event, self._exit_before_publishing)
        self._take(event, local=True)
        self.redis.publish(to_notice(event, self.node))

    async def online(self, user_ids: Collection[int]) -> set[int]:
        here = {u for u in user_ids if self._hub.is_online(u)}
        elsewhere = [u for u in user_ids if u not in here]
        if elsewhere:
            try:
                here |= await self.presence.online(elsewhere)
            except Exception as exc:  # Redis down: this node's own view is all there is
                log.warning("presence: cannot ask Redis (%s)", exc)
        return here

    def copies_wanted(self, user_id: int, origin: int) -> bool:
        return True  # the user may have sessions on other nodes

    def revoke(self, user_id: int, digests: tuple[bytes, ...] = ()) -> None:
        """End these tokens' sessions on the other nodes (this one ends its own)."""
        self.redis.publish(Revoke(user_id, digests))

    @staticmethod
    def _fault(event: Published, text: str) -> None:  # pragma: no cover  (as publish's)
        if getattr(event, "body", None) == text:
            log.warning("test fault: exiting between COMMIT and publish")
            os._exit(70)

    # Delivery.

    def _offer(self, stream: str, event: StreamEvent, local: bool) -> None:
        pending = self._pending.get(stream)
        if pending is not None:
            pending.append(event)
            return
        if not self.order.following(stream):
            self._remember(stream, event)
            return
        early = self._early.get(stream)
        if early is not None and event.id <= early:
            # Committed before its stream's start was read, announced after: only the
            # subscriptions can tell whether it is news (they drop ids they wrote).
            self._hub.deliver(event)
            return
        origin = getattr(event, "origin", 0)
        before = self.order.position(stream)
        self.order.offer(stream, event)
        if local and origin and self.order.position(stream) == before:
            self._origins[event.id] = origin  # it goes the store's way: keep its origin

    def _push(self, stream: str, event: StreamEvent) -> None:
        origin = self._origins.pop(event.id, None)
        if origin is not None and isinstance(event, ChannelPost) and not event.origin:
            event = dataclasses.replace(event, origin=origin)
        self._hub.deliver(event)

    def _receive(self, message: BusMessage) -> None:
        if isinstance(message, Revoke):
            self._end_sessions(message)
            return
        if isinstance(message, PresenceChange):
            self._announce(message)
            return
        try:
            event = from_notice(message)
        except ValueError as exc:
            log.warning("bus: dropped a notice from %s: %s", message.node, exc)
            return
        self._take(event, local=False)

    def _take(self, event: Published, local: bool) -> None:
        if isinstance(event, InboxMessage | ChannelPost):
            self._offer(stream_of(event) or "", event, local)
        else:
            self._hub.deliver(event)

    async def follow(self, user_id: int, channel_ids: Collection[int]) -> None:
        streams = [inbox_stream(user_id)] + [channel_stream(c) for c in channel_ids]
        starting = [t for s in streams if (t := self._watch(s)) is not None]
        if starting:
            # Bounded: a store that does not answer fails the task, which then follows
            # from what it holds (holding nothing, it leaves that to the next check).
            await asyncio.wait(starting)

    def _follow(self, user_id: int, channel_ids: list[int]) -> None:
        """A subscribed session joined channels (the hub's on_follow)."""
        for channel_id in channel_ids:
            self._watch(channel_stream(channel_id))

    def _remember(self, stream: str, event: StreamEvent) -> None:
        """The newest message seen of a stream not followed: where to follow it from."""
        # A memory cap at a million streams heard of: not worth a test's million notices.
        seen = self._seen.get(stream)
        if seen is not None:
            # Notices of one stream can come out of order: this node's own at once,
            # another node's earlier one through Redis. An older one keeps the newest.
            if event.seq > seen[0]:
                self._seen[stream] = (event.seq, event.id)
            return
        if len(self._seen) >= SEEN_LIMIT:  # pragma: no cover
            self._seen.clear()  # a rare reset: streams then start from a store read
        self._seen[stream] = (event.seq, event.id)

    def _watch(self, stream: str) -> asyncio.Task[None] | None:
        """Start following ``stream``; the task reading its position, if one runs.

        A stream whose notices this node has seen is followed at once from the newest
        seen, which no message committed from now on can precede.  Another one's start
        is read from the store; until the next position check, a late notice of a
        message at or below that start goes to the hub as it is.
        """
        if self.order.following(stream):
            return None
        seen = self._seen.pop(stream, None)
        if seen is not None:
            self.order.follow(stream, *seen)
            return None
        task = self._starting.get(stream)
        if task is None:
            self._pending.setdefault(stream, [])  # held since a failed read: kept
            task = self._starting[stream] = asyncio.create_task(self._start_following(stream))
            task.add_done_callback(lambda _: self._starting.pop(stream, None))
        return task

    async def _start_following(self, stream: str) -> None:
        try:
            async with asyncio.timeout(30):
                seq, message_id = await self._start_of(stream)
        except Exception as exc:  # the store is down: from the first held message
            log.warning("cannot read where %s starts (%s)", stream, exc)
            first = self._pending.get(stream)
            if not first:
                # Nothing held to start from.  From 0, the stream's whole past would be
                # pushed once the store is back (a channel joined while subscribed got
                # every message before the join): keep holding, and let the next
                # position check read the start again (_start_again).
                return
            seq, message_id = None, first[0].id - 1
        held = self._pending.pop(stream, [])
        # Held messages at or below the start went unseen by the order: the hub has
        # them (each subscription drops an id it has written).
        for event in held:
            if event.id <= message_id:
                self._hub.deliver(event)
        self.order.follow(stream, seq, message_id)
        self._early[stream] = message_id
        for event in held:
            if event.id > message_id:
                self.order.offer(stream, event)

    async def _start_of(self, stream: str) -> tuple[int | None, int]:
        """A stream's starting position: (seq or None, id)."""
        kind, _, key = stream.partition(":")
        if kind == "u":
            cursor = await self._store.inbox_position(int(key))  # the seq at the ack
            return cursor.seq, cursor.id
        newest = await self._store.channel_history(int(key), None, 1)
        if not newest.messages:
            return 0, 0
        return newest.messages[-1].seq, newest.messages[-1].id

    def _interested(self, stream: str) -> bool:
        kind, _, key = stream.partition(":")
        if kind == "u":
            return self._hub.is_online(int(key))
        return self._hub.has_followers(int(key))

    def _resync(self) -> None:
        task = asyncio.create_task(self.check_positions(), name="resync")
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    async def check_positions(self) -> None:
        """Read the newest seq of every followed stream in one statement, then read the
        streams that are behind it (StreamOrder.check_positions)."""
        users: list[int] = []
        channels: list[int] = []
        for stream in self.order.streams:
            kind, _, key = stream.partition(":")
            (users if kind == "u" else channels).append(int(key))
        if not users and not channels:
            return
        try:
            async with asyncio.timeout(30):
                heads = await self._store.stream_heads(users, channels)
        except Exception as exc:  # the store is down: the next check tries again
            log.warning("cannot read the followed streams' heads (%s)", exc)
            return
        newest = {inbox_stream(u): seq for u, seq in heads.inboxes.items()}
        newest.update((channel_stream(c), seq) for c, seq in heads.channels.items())
        self.order.check_positions(newest)

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            for stream in self.order.streams:
                if not self._interested(stream):
                    self.order.unfollow(stream)
            self._start_again()
            # Before the heads are read, not after: a start read meanwhile keeps its late
            # notices until the next check (cleared after, it lost them at once).
            self._early.clear()
            await self.check_positions()
            self._forget_origins()

    def _start_again(self) -> None:
        """Streams whose start could not be read (the store down, nothing held): read it
        again, or stop holding their messages if nobody here follows them any more."""
        for stream in [s for s in self._pending if s not in self._starting]:
            if self._interested(stream):
                self._watch(stream)
            else:
                del self._pending[stream]

    def _forget_origins(self) -> None:
        """Origins of events already pushed (or never to be): keep the map small."""
        # A memory cap: 10,000 local events gone the store's way and never pushed (their
        # streams unfollowed meanwhile) between two checks; not worth a test's 10,000.
        if len(self._origins) > 10_000:  # pragma: no cover
            self._origins.clear()

    # Sessions and presence.

    def _end_sessions(self, revoke: Revoke) -> None:
        for session in self._hub.bound_sessions():
            if session.user_id != revoke.user_id:
                continue
            if not revoke.digests or session.token_digest in revoke.digests:
                log.info("session on %s ended: its token was revoked on node %s",
                         session, revoke.node)
                self._hub.unbind(session)

    def _presence_changed(
        self, user_id: int, name: str, channels: list[int], online: bool
    ) -> None:
        """A user's first session on this node or their last one's end (the hub's
        on_presence): Redis decides whether it is news for the cluster."""
        if online:
            self.presence.online_here(user_id, name, channels)
        else:
            self.presence.offline_here(user_id, name, channels)

    def _announce(self, change: PresenceChange) -> None:
        """A transition heard on the bus (this node's own included)."""
        self._hub.announce_presence(change.user_id, change.name, change.online,
                                    change.channels)
