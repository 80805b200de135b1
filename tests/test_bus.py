"""Events as data, the bus and the hub, in memory: recording sessions instead of sockets.

The hub, the bus and delivery carry typed events (chatd.model); a session encodes
them at its edge.  These tests check who receives what (protocol.md section 9), that
events come in commit order, and that a channel message is encoded once for all its
msgpack recipients; tests/test_live.py checks the same rules across the socket.
"""

from __future__ import annotations

import ast
import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from chatd import events
from chatd.app import App, PendingReply
from chatd.auth import Hasher
from chatd.bus import LocalBus
from chatd.codec import encode_frame
from chatd.config import Config
from chatd.connection import Connection, ReadTimer, one_by_one
from chatd.delivery import Subscription
from chatd.hub import Hub, Session
from chatd.metrics import Metrics
from chatd.model import (
    INBOX,
    PING,
    ChannelPost,
    Event,
    InboxMessage,
    Join,
    Leave,
    Presence,
    Published,
    SentCopy,
    StreamEvent,
)
from chatd.protocol import Data
from chatd.store import CHANNEL, NewMessage, Store, Stored, StreamPosition
from chatd.streams import LeanStreamReader
from tests.conftest import PASSWORD

CHANNEL_ID = 7
NOW = 1583410320.0  # 2020.03.05:12:12:00
WAIT = 10.0  # seconds a condition may take to come true, however loaded the machine


class RecordingSession(Session):
    """A session without a transport: it keeps the events written to it."""

    __slots__ = ("events",)

    def __init__(self, address: str = "-") -> None:
        super().__init__(address)
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    async def push_paced(self, event: Event) -> None:
        self.events.append(event)

    def abort(self, reason: str) -> None:
        raise AssertionError(f"aborted: {reason}")

    def take(self) -> list[Event]:
        taken, self.events = self.events, []
        return taken


async def until(condition: Callable[[], bool]) -> None:
    """Wait, a loop turn at a time, until ``condition()`` holds (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - state with no event of its own
            await asyncio.sleep(0.001)


async def no_position() -> StreamPosition:
    return StreamPosition(0, 0)


async def nothing_stored(after: int, limit: int) -> list[StreamEvent]:
    return []


async def go_live(hub: Hub, session: Session, user_id: int, name: str) -> None:
    """Bind and subscribe a session to a user who is a member of CHANNEL_ID, with
    nothing to catch up on."""
    hub.bind(session, user_id, name, b"digest", float("inf"), [CHANNEL_ID])
    subscription = Subscription(session, page_size=100, queue_limit=100)
    streams = hub.subscribe(session, subscription)
    await subscription.start([(s, no_position, nothing_stored) for s in [INBOX, *streams]])
    await until(lambda: not subscription.catching_up)


def post(message_id: int, origin: int = 0) -> ChannelPost:
    """A channel message whose seq is its id (tests/test_delivery.py has them differ)."""
    return ChannelPost(
        CHANNEL_ID, "general", message_id, "alice", "hello all", NOW, origin, seq=message_id
    )


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every body the msgpack front-end encodes as an event frame."""
    encoded: list[object] = []

    def counting(body: Any) -> bytes:
        encoded.append(body)
        return encode_frame(body)

    monkeypatch.setattr(events, "encode_frame", counting)
    yield encoded


# The wire: byte for byte what protocol.md section 10 shows, keys in its order.


BOB_IN_GENERAL = {"channel": "general", "name": "Bob"}


def test_each_event_encodes_as_protocol_md_shows_it() -> None:
    expected: list[tuple[Event, dict[str, Any]]] = [
        (
            InboxMessage(2, 41, "alice", "hi", NOW),
            {
                "event": "message",
                "data": {"id": 41, "name": "alice", "msg": "hi", "datetime": "2020.03.05:12:12:00"},
            },
        ),
        (
            SentCopy(1, "Bob", 41, "alice", "hi", NOW),
            {
                "event": "message",
                "data": {
                    "id": 41,
                    "name": "alice",
                    "msg": "hi",
                    "datetime": "2020.03.05:12:12:00",
                    "to": "Bob",
                },
            },
        ),
        (
            post(1207),
            {
                "event": "channel_message",
                "data": {
                    "id": 1207,
                    "channel": "general",
                    "name": "alice",
                    "msg": "hello all",
                    "datetime": "2020.03.05:12:12:00",
                },
            },
        ),
        (Join(7, "general", 2, "Bob"), {"event": "join", "data": BOB_IN_GENERAL}),
        (Leave(7, "general", 2, "Bob"), {"event": "leave", "data": BOB_IN_GENERAL}),
        (Presence("Bob", False), {"event": "presence", "data": {"name": "Bob", "online": False}}),
        (PING, {"event": "ping", "data": {}}),
    ]
    for event, body in expected:
        # msgpack keeps a map's key order, so equal bytes mean the same keys in the same order.
        assert events.frame(event) == encode_frame(body), event


def test_an_event_is_encoded_once_however_often_it_is_asked_for(
    encodings: list[object],
) -> None:
    event = post(1)
    frames = [events.frame(event) for _ in range(3)]
    assert len(encodings) == 1
    assert frames[0] is frames[1] is frames[2]
    assert events.frame(post(1)) == frames[0]  # another event object: encoded afresh
    assert len(encodings) == 2


def test_only_the_edge_knows_bytes() -> None:
    """Handlers, the hub, the bus, delivery and the model never import the codec or
    the msgpack encoder: they carry events as data."""
    chatd = Path(__file__).resolve().parent.parent / "chatd"
    for module in ("handlers", "hub", "bus", "delivery", "model"):
        tree = ast.parse((chatd / f"{module}.py").read_text())
        imported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        assert not imported & {"chatd.codec", "chatd.events", "msgpack"}, module


# The hub and the bus, with sessions that record what they are given.


async def test_a_channel_post_reaches_every_follower_but_its_origin() -> None:
    hub = Hub()
    bus = LocalBus(hub)
    sessions = [RecordingSession() for _ in range(4)]
    for user_id, session in enumerate(sessions, start=1):
        await go_live(hub, session, user_id, f"user{user_id}")
    for session in sessions:
        session.take()  # presence of those who came after
    event = post(1, origin=sessions[0].serial)
    bus.publish(event)
    assert sessions[0].take() == []
    for session in sessions[1:]:
        taken = session.take()
        assert taken == [event]
        assert taken[0] is event  # one object for all: encoded once per front-end


async def test_a_channel_post_is_encoded_once_for_all_msgpack_connections(
    config: Config, encodings: list[object]
) -> None:
    """Real msgpack Connections on socket pairs: the frame each peer reads is the one
    frame encoded for all of them."""
    hub, metrics, timer = Hub(), Metrics(), ReadTimer(config)
    pairs = [socket.socketpair() for _ in range(5)]
    peers: list[asyncio.StreamReader] = []
    peer_writers: list[asyncio.StreamWriter] = []
    connections: list[Connection] = []
    try:
        for user_id, (ours, theirs) in enumerate(pairs, start=1):
            reader, writer = await _open_lean(ours)
            peer, peer_writer = await asyncio.open_connection(sock=theirs)
            peer_writers.append(peer_writer)
            connection = Connection(
                reader, writer, config, one_by_one(_unused_handler), metrics, timer
            )
            connections.append(connection)
            peers.append(peer)
            await go_live(hub, connection, user_id, f"user{user_id}")
        # Presence events went out as others came online: read them off first.
        for index, peer in enumerate(peers):
            for _ in range(len(peers) - 1 - index):
                await _read_frame(peer)
        encodings.clear()
        LocalBus(hub).publish(post(9, origin=connections[0].serial))
        expected = encode_frame(events._channel_post(post(9)))
        for peer in peers[1:]:
            assert await _read_frame(peer) == expected
        assert len(encodings) == 1  # one encoding for four recipients
        assert metrics.pushes_sent == 4 + 10  # the posts and the ten presence events
    finally:
        timer.close()
        for connection in connections:
            connection.abort("test over")
        for peer_writer in peer_writers:
            peer_writer.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


async def _unused_handler(session: Session, body: Any) -> Data:
    raise AssertionError("no request is read in this test")


async def _read_frame(peer: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(WAIT):
        header = await peer.readexactly(4)
        return header + await peer.readexactly(int.from_bytes(header, "big"))


async def test_events_offered_while_catching_up_come_after_the_catch_up_in_order() -> None:
    hub = Hub()
    session = RecordingSession()
    hub.bind(session, 1, "bob", b"digest", float("inf"), [CHANNEL_ID])
    subscription = Subscription(session, page_size=100, queue_limit=100)
    hub.subscribe(session, subscription)
    release = asyncio.Event()

    async def stored(after: int, limit: int) -> list[StreamEvent]:
        await release.wait()  # live events arrive while the store is being read
        return [post(1), post(2)]

    await subscription.start(
        [(INBOX, no_position, nothing_stored), (CHANNEL_ID, no_position, stored)]
    )
    bus = LocalBus(hub)
    for message_id in (4, 2, 3):  # 2 is both stored and offered: written once
        bus.publish(post(message_id))
    release.set()
    await until(lambda: not subscription.catching_up)
    bus.publish(post(5))
    assert [e.id for e in session.take() if isinstance(e, ChannelPost)] == [1, 2, 3, 4, 5]


async def test_a_fresh_stream_that_started_with_held_messages_reads_the_rest_of_the_store(
) -> None:
    """A fresh stream starts at the newest message when its position is read; messages
    offered before that read go out, and so must every later one: one committed before
    the read but offered after it (another node's, a moment behind on the bus) is read
    from the store, not dropped as older than the start."""
    hub = Hub()
    session = RecordingSession()
    hub.bind(session, 1, "bob", b"digest", float("inf"), [CHANNEL_ID])
    subscription = Subscription(session, page_size=100, queue_limit=100)
    hub.subscribe(session, subscription)
    stored: list[StreamEvent] = [post(i) for i in range(1, 5)]  # 4 committed, not offered yet
    bus = LocalBus(hub)

    async def fresh_at_newest() -> StreamPosition:
        return StreamPosition(stored[-1].id, stored[-1].seq, fresh=True)

    async def fetch(after: int, limit: int) -> list[StreamEvent]:
        return [p for p in stored if p.id > after][:limit]

    for message_id in (2, 3):  # offered between /subscribe and the position's read
        bus.publish(post(message_id))
    await subscription.start(
        [(INBOX, no_position, nothing_stored), (CHANNEL_ID, fresh_at_newest, fetch)]
    )
    await until(lambda: not subscription.catching_up)
    bus.publish(post(4))  # the late notice: already written, so dropped
    stored.append(post(5))
    bus.publish(post(5))
    assert [e.id for e in session.take() if isinstance(e, ChannelPost)] == [2, 3, 4, 5]


async def test_a_fresh_stream_stops_writing_held_messages_at_a_gap() -> None:
    """Held messages 2 and 4 were offered before the position's read, 3 not yet (another
    node's, late on the bus): 2 goes out, then 3 and 4 from the store, in order; the late
    notice of 3 is then a repeat."""
    hub = Hub()
    session = RecordingSession()
    hub.bind(session, 1, "bob", b"digest", float("inf"), [CHANNEL_ID])
    subscription = Subscription(session, page_size=100, queue_limit=100)
    hub.subscribe(session, subscription)
    stored: list[StreamEvent] = [post(i) for i in range(1, 5)]
    bus = LocalBus(hub)

    async def fresh_at_newest() -> StreamPosition:
        return StreamPosition(stored[-1].id, stored[-1].seq, fresh=True)

    async def fetch(after: int, limit: int) -> list[StreamEvent]:
        return [p for p in stored if p.id > after][:limit]

    for message_id in (2, 4):
        bus.publish(post(message_id))
    await subscription.start(
        [(INBOX, no_position, nothing_stored), (CHANNEL_ID, fresh_at_newest, fetch)]
    )
    await until(lambda: not subscription.catching_up)
    bus.publish(post(3))
    assert [e.id for e in session.take() if isinstance(e, ChannelPost)] == [2, 3, 4]


# Through the handlers, with a real store: what each session of each user receives.


class HookedStore(Store):
    """The SQLite store, where a test can run something (another node's commit, a
    /logout) as /subscribe reads where the channels start: ``after_newest`` once the
    newest messages are read (before the streams are held), ``before_position`` before
    a channel's position is read (after). Each runs once; none by default."""

    after_newest: Callable[[], Awaitable[None]] | None = None
    before_position: Callable[[], Awaitable[None]] | None = None

    async def channel_newest(self, channel_ids: Sequence[int]) -> dict[int, StreamPosition]:
        newest = await super().channel_newest(channel_ids)
        hook, self.after_newest = self.after_newest, None
        if hook is not None:
            await hook()
        return newest

    async def channel_position(
        self, channel_id: int, user_id: int
    ) -> tuple[StreamPosition, int]:
        hook, self.before_position = self.before_position, None
        if hook is not None:
            await hook()
        return await super().channel_position(channel_id, user_id)


@pytest.fixture
async def app(config: Config) -> AsyncIterator[App]:
    store = await HookedStore.open(config.db)
    hasher = Hasher(config)
    yield App(config, store, Hub(), hasher, clock=lambda: NOW)
    hasher.close()
    await store.close()


async def answer(app: App, session: Session, op: str, **params: Any) -> Data:
    reply = await app.handle(session, {"op": op, "params": params})
    if isinstance(reply, PendingReply):
        await reply.wait()
        reply = reply.result()
    assert reply["code"] == 0, reply
    return reply.get("data") or {}


_addresses = iter(range(1, 1000))


async def device(app: App, name: str, register: bool = False) -> RecordingSession:
    """A subscribed session of ``name``, nothing left to catch up on."""
    session = RecordingSession(f"192.0.2.{next(_addresses)}")
    if register:
        await answer(app, session, "/register", name=name, password=PASSWORD,
                     password_repete=PASSWORD)
    await answer(app, session, "/login", name=name, password=PASSWORD)
    await answer(app, session, "/subscribe")
    await until(lambda: session.subscription is not None and not session.subscription.catching_up)
    return session


def messages(session: RecordingSession) -> list[tuple[str, int, str]]:
    """What the session was given since last asked, presence aside."""
    taken = []
    for event in session.take():
        if isinstance(event, InboxMessage | ChannelPost):
            taken.append((type(event).__name__, event.id, event.body))
        elif isinstance(event, SentCopy):
            taken.append(("SentCopy", event.id, f"to {event.to}: {event.body}"))
        elif isinstance(event, Join | Leave):
            taken.append((event.kind, event.channel_id, event.name))
    return taken


async def test_private_messages_copies_and_notes_to_self(app: App) -> None:
    alice = await device(app, "alice", register=True)
    alice_phone = await device(app, "alice")
    bob = await device(app, "bob", register=True)
    await answer(app, alice, "/send", name="bob", msg="hi")
    assert messages(bob) == [("InboxMessage", 1, "hi")]
    assert messages(alice_phone) == [("SentCopy", 1, "to bob: hi")]
    assert messages(alice) == []  # the calling session has its reply
    await answer(app, alice, "/send", name="alice", msg="note")
    # A note to self: every session of the user, the calling one included, no copy.
    assert messages(alice) == [("InboxMessage", 2, "note")]
    assert messages(alice_phone) == [("InboxMessage", 2, "note")]
    assert messages(bob) == []
    await answer(app, alice, "/send", name="bob", msg="again", client_id="c1")
    await answer(app, alice, "/send", name="bob", msg="again", client_id="c1")
    assert messages(bob) == [("InboxMessage", 3, "again")]  # a client_id repeat: nothing


async def test_channel_posts_joins_and_leaves(app: App) -> None:
    alice = await device(app, "alice", register=True)
    bob = await device(app, "bob", register=True)
    bob_phone = await device(app, "bob")
    await answer(app, alice, "/channel/join", name="general")
    await answer(app, bob, "/channel/join", name="general")
    assert messages(alice) == [("join", 1, "bob")]
    assert messages(bob_phone) == [("join", 1, "bob")]  # the joiner's other device
    assert messages(bob) == []
    await answer(app, bob, "/channel/send", name="general", message="hello")
    assert messages(alice) == [("ChannelPost", 1, "hello")]
    assert messages(bob_phone) == [("ChannelPost", 1, "hello")]
    assert messages(bob) == []
    await answer(app, bob_phone, "/channel/leave", name="general")
    assert messages(alice) == [("leave", 1, "bob")]
    assert messages(bob) == [("leave", 1, "bob")]
    await answer(app, alice, "/channel/send", name="general", message="after")
    # Neither of bob's sessions follows the channel any more.
    assert messages(bob) == messages(bob_phone) == []


async def test_pipelined_sends_are_delivered_in_commit_order(app: App) -> None:
    alice = await device(app, "alice", register=True)
    bob = await device(app, "bob", register=True)
    await answer(app, bob, "/channel/join", name="general")
    await answer(app, alice, "/channel/join", name="general")
    bob.take()
    # Many sends in flight at once share group commits; each is published after its
    # commit, in the order committed (which is the order sent).
    pending = []
    for n in range(60):
        if n % 2:
            body = {"op": "/send", "params": {"name": "bob", "msg": f"m{n}"}}
        else:
            body = {"op": "/channel/send", "params": {"name": "general", "message": f"m{n}"}}
        reply = await app.handle(alice, body)
        assert isinstance(reply, PendingReply)
        pending.append(reply)
    await asyncio.wait([asyncio.ensure_future(p.wait()) for p in pending])
    replies = [p.result() for p in pending]
    assert all(r["code"] == 0 for r in replies)
    got = messages(bob)
    assert [text for _, _, text in got] == [f"m{n}" for n in range(60)]
    ids = [r["data"]["id"] for r in replies]
    private = [message_id for kind, message_id, _ in got if kind == "InboxMessage"]
    channel = [message_id for kind, message_id, _ in got if kind == "ChannelPost"]
    assert private == sorted(private) and channel == sorted(channel)
    assert [message_id for _, message_id, _ in got] == ids


class CheckingBus:
    """A bus that, as each event is published, reads its message back through a
    connection of its own to the database file: it sees only committed rows."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.seen: list[tuple[str, int, bool]] = []

    def publish(self, event: Published) -> None:
        if isinstance(event, InboxMessage | ChannelPost):
            table = "private_messages" if isinstance(event, InboxMessage) else "channel_messages"
            with closing(sqlite3.connect(self.db)) as other:
                found = other.execute(f"SELECT 1 FROM {table} WHERE id = ?", (event.id,))
                self.seen.append((event.body, event.id, found.fetchone() is not None))

    async def follow(self, user_id: int, channel_ids: Collection[int]) -> None:
        pass

    async def online(self, user_ids: Collection[int]) -> set[int]:
        return set()

    def copies_wanted(self, user_id: int, origin: int) -> bool:
        return True

    def revoke(self, user_id: int, digests: tuple[bytes, ...] = ()) -> None:
        pass


async def test_events_are_published_after_commit_never_inside_it(
    app: App, config: Config
) -> None:
    alice = await device(app, "alice", register=True)
    await device(app, "bob", register=True)
    bus = app.bus = CheckingBus(config.db)
    await answer(app, alice, "/send", name="bob", msg="one")
    await answer(app, alice, "/channel/send", name="general", message="two")
    assert bus.seen == [("one", 1, True), ("two", 1, True)]


class RecordingBus(LocalBus):
    """The one-node bus, keeping the kind of every event published."""

    __slots__ = ("published",)

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.published: list[str] = []

    def publish(self, event: Published) -> None:
        self.published.append(type(event).__name__)
        super().publish(event)


async def test_no_copy_is_made_for_a_sender_without_another_device(app: App) -> None:
    alice = await device(app, "alice", register=True)
    bob = await device(app, "bob", register=True)
    bus = app.bus = RecordingBus(app.hub)
    await answer(app, alice, "/send", name="bob", msg="one")
    assert bus.published == ["InboxMessage"]
    alice_phone = await device(app, "alice")
    await answer(app, alice, "/send", name="bob", msg="two")
    assert bus.published == ["InboxMessage", "InboxMessage", "SentCopy"]
    assert messages(alice_phone) == [("SentCopy", 2, "to bob: two")]
    assert [text for _, _, text in messages(bob)] == ["one", "two"]


async def test_message_events_carry_their_stream_sequence_number(app: App) -> None:
    alice = await device(app, "alice", register=True)
    bob = await device(app, "bob", register=True)
    carol = await device(app, "carol", register=True)
    await answer(app, bob, "/channel/join", name="general")
    await answer(app, alice, "/channel/join", name="general")
    await answer(app, alice, "/send", name="carol", msg="to carol")  # another inbox stream
    for text in ("one", "two"):
        await answer(app, alice, "/send", name="bob", msg=text)
        await answer(app, alice, "/channel/send", name="general", message=text)
    live = [e for e in bob.take() if isinstance(e, InboxMessage | ChannelPost)]
    assert [(type(e).__name__, e.body, e.seq) for e in live] == [
        ("InboxMessage", "one", 1),
        ("ChannelPost", "one", 1),
        ("InboxMessage", "two", 2),
        ("ChannelPost", "two", 2),
    ]
    assert [e.seq for e in carol.take() if isinstance(e, InboxMessage)] == [1]
    # A catch-up on a new session brings the same numbers (bob acknowledged nothing).
    laptop = await device(app, "bob")
    caught_up = [e for e in laptop.take() if isinstance(e, InboxMessage)]
    assert [(e.body, e.seq) for e in caught_up] == [("one", 1), ("two", 2)]


async def _open_lean(sock: socket.socket) -> tuple[LeanStreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection(sock=...), with the server's reader (Connection reads
    through LeanStreamReader.read_now)."""
    loop = asyncio.get_running_loop()
    reader = LeanStreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def test_a_message_stored_elsewhere_during_subscribe_goes_out_despite_a_late_notice(
    app: App,
) -> None:
    # A channel bob never read starts at its newest message as /subscribe began. Another
    # node stores a message just after the streams are held, and its notice comes only
    # once the catch-up is done: the catch-up read it from the store, so it goes out
    # (once). Read after the hold, the start took it in, and the late notice was at or
    # below it: never pushed.
    store = app.store
    assert isinstance(store, HookedStore)
    alice = await device(app, "alice", register=True)
    await answer(app, alice, "/channel/join", name="general")
    await answer(app, alice, "/channel/send", name="general", message="before")
    bob = RecordingSession()
    await answer(app, bob, "/register", name="bob", password=PASSWORD, password_repete=PASSWORD)
    await answer(app, bob, "/login", name="bob", password=PASSWORD)
    await answer(app, bob, "/channel/join", name="general")
    assert alice.user_id is not None and bob.user_id is not None
    (general,) = app.hub.channels_of(bob.user_id)
    elsewhere: list[Stored] = []

    async def another_node_commits() -> None:  # stored, its notice not yet here
        message = NewMessage(CHANNEL, alice.user_id or 0, general, "meanwhile", NOW, None)
        elsewhere.append(await store.enqueue(message))

    store.before_position = another_node_commits
    await answer(app, bob, "/subscribe")
    await until(lambda: bob.subscription is not None and not bob.subscription.catching_up)
    (stored,) = elsewhere
    app.hub.deliver(
        ChannelPost(general, "general", stored.id, "alice", "meanwhile", NOW, seq=stored.seq)
    )
    assert messages(bob) == [("ChannelPost", stored.id, "meanwhile")]


async def test_a_session_unbound_while_subscribe_reads_starts_is_not_subscribed(
    app: App,
) -> None:
    store = app.store
    assert isinstance(store, HookedStore)
    bob = RecordingSession()
    await answer(app, bob, "/register", name="bob", password=PASSWORD, password_repete=PASSWORD)
    await answer(app, bob, "/login", name="bob", password=PASSWORD)
    await answer(app, bob, "/channel/join", name="general")

    async def logged_out_elsewhere() -> None:
        app.hub.unbind(bob)

    store.after_newest = logged_out_elsewhere
    reply = await app.handle(bob, {"op": "/subscribe", "params": {}})
    assert isinstance(reply, dict) and reply["code"] == 2, reply
    assert bob.subscription is None
    assert not any(app.hub.has_followers(c) for c in range(1, 10))
