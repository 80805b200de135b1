"""The store contract (chatd.store.MessageStore), run against every store.

Each test runs on a fresh SQLite file and on a fresh PostgreSQL database, twice on
PostgreSQL (batches by size as in production, then every batch message by message:
chatd.store.postgres.FEW); the PostgreSQL cases skip where PostgreSQL is absent (or fail, with
CHATD_REQUIRE_POSTGRES=1: tests/pg_helpers.py).  A behaviour is part of the contract
when both stores must give the same answer; the few checks of one store's insides
(its schema version, PostgreSQL's per-stream seq) say so.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from chatd.config import Config
from chatd.store import (
    CHANNEL,
    PRIVATE,
    Batch,
    Bounds,
    Joined,
    MessageStore,
    NewMessage,
    Skeletons,
    Stored,
    StoreError,
    StreamHeads,
    StreamPosition,
    TooManyChannels,
    open_store,
)
from chatd.validation import name_skeletons
from tests.pg_helpers import fresh_database

NOW = 1_800_000_000.0
HOUR = 3600.0


class Backend:
    """One database of one kind: open stores on it, and peek at it with plain SQL."""

    def __init__(self, kind: str, db: str) -> None:
        self.kind = kind
        self.db = db
        self._open: list[MessageStore] = []

    async def open(self) -> MessageStore:
        store = await open_store(self.db, Config(db=self.db))
        self._open.append(store)
        return store

    async def close(self, store: MessageStore) -> None:
        self._open.remove(store)
        await store.close()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1])

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of one read-only statement, from a connection of its own."""
        if self.kind == "sqlite":
            return await asyncio.to_thread(_sqlite_query, self.db, sql)
        import asyncpg

        conn = await asyncpg.connect(self.db)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def schema_version(self) -> int:
        sql = "PRAGMA user_version" if self.kind == "sqlite" else "SELECT version FROM chatd_schema"
        (row,) = await self.query(sql)
        version: int = row[0]
        return version


def _sqlite_query(path: str, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-few"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Backend]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            db = str(tmp_path / "contract.sqlite3")
        else:
            db = await stack.enter_async_context(fresh_database())
        if request.param == "postgresql-few":
            # Every batch through chatd_store_few, message by message (by default only
            # batches of up to FEW messages are; the larger ones here are set-based).
            from chatd.store import postgres

            monkeypatch.setattr(postgres, "FEW", 1_000_000)
        backend = Backend(request.param.partition("-")[0], db)
        yield backend
        await backend.close_all()


@pytest.fixture
async def store(backend: Backend) -> MessageStore:
    return await backend.open()


async def add_user(store: MessageStore, name: str, now: float = NOW) -> int:
    assert await store.create_user(name, name.lower(), looks(name), f"hash-of-{name}", now)
    user = await store.find_user(name.lower())
    assert user is not None
    return user.id


def looks(name: str) -> Skeletons:
    return name_skeletons(name)


def private(sender: int, recipient: int, body: str, client_id: str | None = None) -> NewMessage:
    return NewMessage(PRIVATE, sender, recipient, body, NOW, client_id)


def to_channel(sender: int, channel: int, body: str, client_id: str | None = None) -> NewMessage:
    return NewMessage(CHANNEL, sender, channel, body, NOW, client_id)


def bodies(batch: Batch[Any]) -> list[str]:
    return [message.body for message in batch.messages]


# Accounts and tokens.


async def test_users_are_created_once_per_name_key(store: MessageStore) -> None:
    assert await store.create_user("Ann", "ann", looks("Ann"), "h1", NOW)
    assert not await store.create_user("ANN", "ann", looks("ANN"), "h2", NOW + 1)
    user = await store.find_user("ann")
    assert user is not None
    assert (user.name, user.password_hash, user.created_at) == ("Ann", "h1", NOW)
    assert await store.find_user("bob") is None
    assert await store.find_profile("bob") is None
    assert await store.find_profile("ann") == user


async def test_password_hash_is_replaced_and_read_fresh(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    await store.find_profile("ann")
    await store.set_password_hash(ann, "new-hash")
    user = await store.find_user("ann")
    assert user is not None and user.password_hash == "new-hash"


async def test_users_are_listed_by_name_key_in_code_point_order(store: MessageStore) -> None:
    # A locale collation ignores punctuation at first; chatd sorts as SQLite does.
    for name in ("bz", "b_x", "ba", "b.x", "é"):
        await add_user(store, name)
    bob = await store.find_user("ba")
    assert bob is not None
    await store.add_token(bob.id, b"live", NOW, NOW + HOUR)
    await store.add_token(bob.id, b"expired", NOW - 2 * HOUR, NOW - HOUR)
    users = await store.list_users(NOW)
    assert [name for name, _, _ in users] == ["b.x", "b_x", "ba", "bz", "é"]
    assert dict((name, tokens) for name, _, tokens in users)["ba"] == 1
    assert all(created_at == NOW for _, created_at, _ in users)


async def test_tokens_live_expire_and_are_revoked(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    await store.add_token(ann, b"a1", NOW, NOW + HOUR)
    await store.add_token(ann, b"a2", NOW, NOW + HOUR)
    await store.add_token(bob, b"b1", NOW, NOW + HOUR)
    owner = await store.token_owner(b"a1", NOW)
    assert owner is not None
    assert (owner[0].id, owner[0].name, owner[1]) == (ann, "ann", NOW + HOUR)
    assert await store.token_owner(b"a1", NOW + HOUR) is None  # expired
    assert await store.token_owner(b"nope", NOW) is None
    assert await store.live_tokens([b"a1", b"b1", b"nope"], NOW) == {b"a1", b"b1"}
    assert await store.live_tokens([], NOW) == set()
    await store.revoke_token(b"a1")
    assert await store.live_tokens([b"a1", b"a2"], NOW) == {b"a2"}
    assert await store.revoke_tokens(ann) == 1
    assert await store.revoke_tokens(ann) == 0
    assert await store.live_tokens([b"a2", b"b1"], NOW) == {b"b1"}


async def test_deleting_a_user_removes_what_they_held(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    channel, _ = await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW)
    await store.join_channel("Lobby", "lobby", looks("Lobby"), bob, NOW)
    await store.add_token(ann, b"a1", NOW, NOW + HOUR)
    await store.enqueue(private(ann, bob, "to bob"))
    await store.enqueue(private(bob, ann, "to ann"))
    await store.enqueue(to_channel(ann, channel.id, "from ann"))
    await store.enqueue(to_channel(bob, channel.id, "from bob"))
    await store.delete_user(ann)
    assert await store.find_user("ann") is None
    assert await store.find_profile("ann") is None  # not answered from the cache
    assert await store.live_tokens([b"a1"], NOW) == set()
    assert bodies(await store.take_inbox(bob, 10)) == []
    assert bodies(await store.channel_history(channel.id, None, 10)) == ["from bob"]
    assert await store.channel_members(channel.id) == [(bob, "bob")]


# Private messages.


async def test_inbox_is_taken_once_in_order_in_batches(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    sent = [await store.enqueue(private(ann, bob, f"m{i}")) for i in range(5)]
    assert [s.id for s in sent] == sorted(s.id for s in sent)
    assert all(s.created_at == NOW and not s.duplicate for s in sent)
    first = await store.take_inbox(bob, 3)
    assert (bodies(first), first.more) == (["m0", "m1", "m2"], True)
    assert [m.id for m in first.messages] == [s.id for s in sent[:3]]
    assert all(m.sender == "ann" and m.created_at == NOW for m in first.messages)
    second = await store.take_inbox(bob, 3)
    assert (bodies(second), second.more) == (["m3", "m4"], False)
    assert bodies(await store.take_inbox(bob, 3)) == []
    assert bodies(await store.take_inbox(ann, 3)) == []
    assert await store.inbox_position(bob) == StreamPosition(sent[-1].id, sent[-1].seq)


async def test_any_text_is_kept_exactly(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    text = "nul\x00 tab\t emoji \U0001f600 rtl \u202e end"
    first = await store.enqueue(private(ann, bob, text, client_id="\x00"))
    again = await store.enqueue(private(ann, bob, "other", client_id="\x00"))
    empty = await store.enqueue(private(ann, bob, "x", client_id=""))
    assert again.duplicate and again.id == first.id
    assert not empty.duplicate
    assert bodies(await store.take_inbox(bob, 10)) == [text, "x"]


async def test_acks_are_clamped_to_messages_that_exist(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    carol = await add_user(store, "carol")
    first = await store.enqueue(private(ann, bob, "one"))
    other = await store.enqueue(private(ann, carol, "not bob's"))
    second = await store.enqueue(private(ann, bob, "two"))
    assert await store.inbox_position(bob) == StreamPosition(0, 0)
    assert await store.ack_private(bob, other.id) == first.id
    assert await store.ack_private(bob, 1 << 62) == second.id  # from the future: clamped
    assert await store.ack_private(bob, 1) == second.id  # never moves back
    assert await store.inbox_position(bob) == StreamPosition(second.id, 2)
    assert [m.body for m in await store.inbox_after(bob, 0, 10)] == ["one", "two"]
    assert [m.body for m in await store.inbox_after(bob, first.id, 10)] == ["two"]
    assert [m.body for m in await store.inbox_after(bob, 0, 1)] == ["one"]
    assert bodies(await store.take_inbox(bob, 10)) == []  # acked counts as received


async def test_private_history_pages_both_directions(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    carol = await add_user(store, "carol")
    sent = []
    for i in range(5):
        sent.append(await store.enqueue(private(ann, bob, f"a{i}")))
        await store.enqueue(private(carol, bob, "not in this conversation"))
        sent.append(await store.enqueue(private(bob, ann, f"b{i}")))
    newest = await store.private_history(ann, bob, None, 4)
    assert (bodies(newest), newest.more) == (["a3", "b3", "a4", "b4"], True)
    assert [(m.sender, m.recipient) for m in newest.messages[:2]] == [
        ("ann", "bob"),
        ("bob", "ann"),
    ]
    older = await store.private_history(bob, ann, newest.messages[0].id, 4)
    assert (bodies(older), older.more) == (["a1", "b1", "a2", "b2"], True)
    oldest = await store.private_history(ann, bob, older.messages[0].id, 4)
    assert (bodies(oldest), oldest.more) == (["a0", "b0"], False)
    exact = await store.private_history(ann, bob, None, 10)
    assert (len(exact.messages), exact.more) == (10, False)


async def test_private_pages_when_one_side_did_all_the_talking(store: MessageStore) -> None:
    # Each direction is cut to the page before the two are merged: the page must still
    # be the newest (or oldest) of both together when one side fills it alone.
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    ids = [(await store.enqueue(private(ann, bob, f"a{i}"))).id for i in range(6)]
    await store.enqueue(private(bob, ann, "b0"))
    newest = await store.private_history(bob, ann, None, 3)
    assert (bodies(newest), newest.more) == (["a4", "a5", "b0"], True)
    older = await store.private_history(ann, bob, ids[4], 3)
    assert (bodies(older), older.more) == (["a1", "a2", "a3"], True)
    first = await store.private_range(ann, bob, Bounds(), 2, newest=False)
    assert [m.body for m in first] == ["a0", "a1"]
    last = await store.private_range(bob, ann, Bounds(after_id=ids[0]), 2, newest=True)
    assert [m.body for m in last] == ["a5", "b0"]


# Channels.


async def test_joining_leaving_and_rejoining(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    channel, joined = await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW)
    assert joined is Joined.NOW
    assert (channel.name, channel.created_at) == ("Lobby", NOW)
    again, joined = await store.join_channel("LOBBY", "lobby", looks("LOBBY"), ann, NOW + 1)
    assert (again, joined) == (channel, Joined.ALREADY)
    assert await store.find_channel("lobby") == channel
    assert await store.find_channel("nowhere") is None
    assert await store.channel_name(channel.id) == "Lobby"
    await store.join_channel("Lobby", "lobby", looks("Lobby"), bob, NOW)
    assert await store.channel_members(channel.id) == [(ann, "ann"), (bob, "bob")]
    assert await store.leave_channel(channel.id, ann, NOW + 2)
    assert not await store.leave_channel(channel.id, ann, NOW + 3)
    assert not await store.is_member(channel.id, ann)
    assert await store.is_member(channel.id, bob)
    assert await store.channel_ids(ann) == []
    assert await store.channel_members(channel.id) == [(bob, "bob")]
    _, joined = await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW + 4)
    assert joined is Joined.LEFT
    _, joined = await store.join_channel(
        "Lobby", "lobby", looks("Lobby"), ann, NOW + 5, rejoin=True
    )
    assert joined is Joined.NOW
    assert await store.channel_ids(ann) == [channel.id]


async def test_joins_beyond_max_memberships_are_refused_and_create_nothing(
    backend: Backend,
) -> None:
    store = await backend.open()
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")

    async def join(name: str, user: int, rejoin: bool = False) -> Joined:
        _, joined = await store.join_channel(
            name, name, looks(name), user, NOW, rejoin, max_memberships=2
        )
        return joined

    assert await join("one", ann) is Joined.NOW
    assert await join("two", ann) is Joined.NOW
    with pytest.raises(TooManyChannels, match=r"too many channels \(at most 2\)"):
        await join("three", ann)
    assert await store.find_channel("three") is None  # the new channel was not made
    assert await backend.query("SELECT name FROM channels ORDER BY name") == [("one",), ("two",)]
    assert await join("one", ann) is Joined.ALREADY  # a member already: fine at the cap
    assert await join("three", bob) is Joined.NOW  # the cap is per user
    with pytest.raises(TooManyChannels):
        await join("three", ann)  # an existing channel is refused too
    one = await store.find_channel("one")
    assert one is not None and await store.leave_channel(one.id, ann, NOW)
    assert await join("three", ann) is Joined.NOW  # leaving made room
    assert await join("one", ann) is Joined.LEFT  # a left channel says so, as without a cap
    with pytest.raises(TooManyChannels):
        await join("one", ann, rejoin=True)  # a rejoin counts as a join
    assert len(await store.channel_ids(ann)) == 2


async def test_max_memberships_holds_for_concurrent_joins(backend: Backend) -> None:
    # Two stores on one database, as two nodes: their joins of one user race.
    one, two = await backend.open(), await backend.open()
    ann = await add_user(one, "ann")
    bob = await add_user(one, "bob")
    names = [f"c{i}" for i in range(12)]
    for name in names:  # existing channels: joining them takes no channel-name lock
        await one.join_channel(name, name, looks(name), bob, NOW)
    results = await asyncio.gather(
        *(
            (one if i % 2 else two).join_channel(
                name, name, looks(name), ann, NOW, max_memberships=3
            )
            for i, name in enumerate(names)
        ),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, TooManyChannels)]
    assert len(refused) == len(names) - 3, results
    assert len(await one.channel_ids(ann)) == 3


async def test_channel_receive_backlog_then_news(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    channel, _ = await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW)
    for i in range(5):
        await store.enqueue(to_channel(ann, channel.id, f"m{i}"))
    await store.join_channel("Lobby", "lobby", looks("Lobby"), bob, NOW)
    newest = (await store.channel_history(channel.id, None, 1)).messages[0].id
    assert await store.channel_position(channel.id, bob) == (
        StreamPosition(newest, 5, fresh=True), newest
    )
    backlog = await store.take_channel(channel.id, bob, backlog=2, limit=10)
    assert (bodies(backlog), backlog.more) == (["m3", "m4"], False)
    assert bodies(await store.take_channel(channel.id, bob, 2, 10)) == []
    for i in range(5, 8):
        await store.enqueue(to_channel(ann, channel.id, f"m{i}"))
    news = await store.take_channel(channel.id, bob, 2, limit=2)
    assert (bodies(news), news.more) == (["m5", "m6"], True)
    rest = await store.take_channel(channel.id, bob, 2, limit=2)
    assert (bodies(rest), rest.more) == (["m7"], False)
    newest = rest.messages[0].id
    assert await store.channel_position(channel.id, bob) == (StreamPosition(newest, 8), newest)
    not_a_member = ann + bob + 1
    assert await store.channel_position(channel.id, not_a_member) == (
        StreamPosition(0, 0, fresh=True), 0
    )


async def test_memberships_count_what_receive_would_return(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    dev, _ = await store.join_channel("Dev", "dev", looks("Dev"), ann, NOW)
    await store.join_channel("lobby", "lobby", looks("lobby"), bob, NOW)
    for i in range(4):
        await store.enqueue(to_channel(bob, lobby.id, f"m{i}"))
    listed = await store.memberships(ann, backlog=3)
    assert [(m.channel, m.read_cursor, m.unread) for m in listed] == [
        ("Dev", None, 0),
        ("lobby", None, 3),  # a first receive shows the backlog
    ]
    assert listed[1].channel_id == lobby.id and listed[0].channel_id == dev.id
    taken = await store.take_channel(lobby.id, ann, 3, 10)
    await store.enqueue(to_channel(bob, lobby.id, "new"))
    listed = await store.memberships(ann, backlog=3)
    assert [(m.read_cursor, m.unread) for m in listed] == [(None, 0), (taken.messages[-1].id, 1)]


async def test_own_channel_messages_are_never_news(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    await store.join_channel("lobby", "lobby", looks("lobby"), bob, NOW)
    await store.enqueue(to_channel(ann, lobby.id, "ann 1"))
    await store.enqueue(to_channel(bob, lobby.id, "bob 1"))
    own_last = await store.enqueue(to_channel(ann, lobby.id, "ann 2"))
    listed = await store.memberships(ann, backlog=10)
    assert [m.unread for m in listed] == [1]
    first = await store.take_channel(lobby.id, ann, backlog=10, limit=10)
    assert (bodies(first), first.more) == (["bob 1"], False)
    # The position moved past the caller's own newest message all the same.
    assert (await store.channel_position(lobby.id, ann))[0] == StreamPosition(own_last.id, 3)
    await store.enqueue(to_channel(ann, lobby.id, "ann 3"))
    assert [m.unread for m in await store.memberships(ann, backlog=10)] == [0]
    assert bodies(await store.take_channel(lobby.id, ann, 10, 10)) == []
    assert bodies(await store.take_channel(lobby.id, bob, 10, 10)) == ["ann 1", "ann 2", "ann 3"]


async def test_look_alike_names_are_refused(store: MessageStore) -> None:
    ann = await add_user(store, "alice")
    assert await store.user_name_taken("alice", looks("alice"))
    assert await store.user_name_taken("aiice", looks("AIice"))  # a capital i for the l
    assert not await store.user_name_taken("bob", looks("bob"))
    assert not await store.create_user("AIice", "aiice", looks("AIice"), "h", NOW)
    lobby, joined = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    assert joined is Joined.NOW
    similar, joined = await store.join_channel("IobbY", "iobby", looks("IobbY"), ann, NOW)
    assert (similar, joined) == (lobby, Joined.LOOKALIKE)
    assert await store.find_channel("iobby") is None


async def test_look_alikes_registered_at_once_on_two_stores(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    for round_ in range(10):
        a, b = f"rn{round_}", f"m{round_}"  # in small letters "rn" looks like "m"
        created = await asyncio.gather(
            one.create_user(a, a, looks(a), "h", NOW), two.create_user(b, b, looks(b), "h", NOW)
        )
        assert sorted(created) == [False, True]


async def test_channel_acks_and_catch_up(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    other, _ = await store.join_channel("other", "other", looks("other"), ann, NOW)
    first = await store.enqueue(to_channel(ann, lobby.id, "one"))
    elsewhere = await store.enqueue(to_channel(ann, other.id, "elsewhere"))
    second = await store.enqueue(to_channel(ann, lobby.id, "two"))
    assert await store.ack_channel(lobby.id, bob, second.id) is None  # not a member
    assert await store.ack_channel(lobby.id, ann, elsewhere.id) == first.id
    assert await store.ack_channel(lobby.id, ann, 1 << 62) == second.id
    assert await store.ack_channel(lobby.id, ann, 1) == second.id
    after = store.channel_after
    assert [m.body for m in await after(lobby.id, 0, 10, bob, 0)] == ["one", "two"]
    assert [m.body for m in await after(lobby.id, first.id, 10, bob, 0)] == ["two"]
    assert [m.body for m in await after(lobby.id, 0, 1, bob, 0)] == ["one"]
    # The reader's own messages only past own_after (those sent once the catch-up began).
    assert [m.body for m in await after(lobby.id, 0, 10, ann, 0)] == ["one", "two"]
    assert [m.body for m in await after(lobby.id, 0, 10, ann, first.id)] == ["two"]
    assert [m.body for m in await after(lobby.id, 0, 10, ann, second.id)] == []
    await store.leave_channel(lobby.id, ann, NOW)
    assert await store.ack_channel(lobby.id, ann, second.id) is None  # left


async def test_channel_history_pages_backwards(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    other, _ = await store.join_channel("other", "other", looks("other"), ann, NOW)
    for i in range(7):
        await store.enqueue(to_channel(ann, lobby.id, f"m{i}"))
        await store.enqueue(to_channel(ann, other.id, "elsewhere"))
    page = await store.channel_history(lobby.id, None, 3)
    assert (bodies(page), page.more) == (["m4", "m5", "m6"], True)
    page = await store.channel_history(lobby.id, page.messages[0].id, 3)
    assert (bodies(page), page.more) == (["m1", "m2", "m3"], True)
    page = await store.channel_history(lobby.id, page.messages[0].id, 3)
    assert (bodies(page), page.more) == (["m0"], False)
    assert bodies(await store.channel_history(lobby.id, 1, 3)) == []
    assert (await store.channel_history(lobby.id, None, 7)).more is False


# Idempotent client_id.


async def test_a_repeated_client_id_is_stored_once(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    carol = await add_user(store, "carol")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    first = await store.enqueue(private(ann, bob, "hi", client_id="c1"))
    retry = await store.enqueue(private(ann, carol, "other text", client_id="c1"))
    assert (retry.id, retry.created_at, retry.duplicate) == (first.id, first.created_at, True)
    # Channel messages have their own client_id space; other senders theirs.
    in_channel = await store.enqueue(to_channel(ann, lobby.id, "hi", client_id="c1"))
    by_bob = await store.enqueue(private(bob, ann, "hi", client_id="c1"))
    assert not in_channel.duplicate and not by_bob.duplicate
    channel_retry = await store.enqueue(to_channel(ann, lobby.id, "again", client_id="c1"))
    assert (channel_retry.id, channel_retry.duplicate) == (in_channel.id, True)
    assert bodies(await store.take_inbox(bob, 10)) == ["hi"]
    assert bodies(await store.take_inbox(carol, 10)) == []
    assert bodies(await store.channel_history(lobby.id, None, 10)) == ["hi"]


async def test_concurrent_sends_with_one_client_id_store_one(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    published: list[Stored] = []
    futures = [
        store.enqueue(private(ann, bob, "hi", client_id="same"), published.append)
        for _ in range(2)
    ]
    first, second = await asyncio.gather(*futures)
    assert (first.duplicate, second.duplicate, second.id) == (False, True, first.id)
    assert published == [first]  # a repeat is not published again
    assert bodies(await store.take_inbox(bob, 10)) == ["hi"]


async def test_two_stores_on_one_database_dedup_a_racing_retry(backend: Backend) -> None:
    """As two nodes would: the original and its retry race on different stores."""
    one, two = await backend.open(), await backend.open()
    ann = await add_user(one, "ann")
    bob = await add_user(one, "bob")
    for round_ in range(20):
        client_id = f"race-{round_}"
        a, b = await asyncio.gather(
            one.enqueue(private(ann, bob, "hi", client_id)),
            two.enqueue(private(ann, bob, "hi", client_id)),
        )
        assert a.id == b.id and sorted((a.duplicate, b.duplicate)) == [False, True]
    assert len((await two.take_inbox(bob, 100)).messages) == 20


async def test_two_devices_taking_one_inbox_get_each_message_once(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    ann = await add_user(one, "ann")
    bob = await add_user(one, "bob")
    lobby, _ = await one.join_channel("lobby", "lobby", looks("lobby"), bob, NOW)
    for i in range(200):
        one.enqueue(private(ann, bob, f"p{i}"))
        one.enqueue(to_channel(ann, lobby.id, f"c{i}"))
    await one.enqueue(private(ann, bob, "last"))
    await one.take_channel(lobby.id, bob, backlog=0, limit=1)  # past the backlog
    for i in range(200, 260):
        await one.enqueue(to_channel(ann, lobby.id, f"c{i}"))
    taken: list[str] = []
    channel_taken: list[str] = []
    for _ in range(25):
        batches = await asyncio.gather(
            one.take_inbox(bob, 5), two.take_inbox(bob, 5),
            one.take_channel(lobby.id, bob, 0, 2), two.take_channel(lobby.id, bob, 0, 2),
        )
        taken += bodies(batches[0]) + bodies(batches[1])
        channel_taken += bodies(batches[2]) + bodies(batches[3])
    assert sorted(taken) == sorted([f"p{i}" for i in range(200)] + ["last"])
    assert sorted(channel_taken) == sorted(f"c{i}" for i in range(200, 260))


# Group commit and read-your-writes.


async def test_group_commit_stores_all_and_publishes_in_commit_order(
    backend: Backend, store: MessageStore
) -> None:
    ann = await add_user(store, "ann")
    users = [await add_user(store, f"u{i}") for i in range(3)]
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    published: list[tuple[int, int]] = []  # (enqueue position, stored id), as called
    futures: list[asyncio.Future[Stored]] = []
    count = 600
    for i in range(count):
        message = (
            to_channel(ann, lobby.id, f"c{i}") if i % 2 else private(ann, users[i % 3], f"p{i}")
        )

        def publish(stored: Stored, i: int = i) -> None:
            assert not futures[i].done()  # published before its sender is answered
            published.append((i, stored.id))

        futures.append(store.enqueue(message, publish))
    results = await asyncio.gather(*futures)
    assert [i for i, _ in published] == list(range(count))  # commit order = enqueue order
    assert [stored_id for _, stored_id in published] == [r.id for r in results]
    for kind in (0, 1):  # ids rise in enqueue order within each table
        ids = [r.id for i, r in enumerate(results) if i % 2 == kind]
        assert ids == sorted(ids)
    channel_rows = await store.channel_history(lobby.id, None, count)
    assert bodies(channel_rows) == [f"c{i}" for i in range(1, count, 2)]
    inbox_total = sum([len((await store.take_inbox(u, count)).messages) for u in users])
    assert inbox_total == count // 2
    if backend.kind == "postgresql":
        # Group commit on PostgreSQL: far fewer transactions than messages.
        ((transactions,),) = await backend.query(
            "SELECT COUNT(DISTINCT xmin::text) FROM channel_messages"
        )
        assert transactions < count // 4


async def test_a_failed_message_does_not_sink_its_batch(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    gone = await add_user(store, "gone")
    await store.delete_user(gone)
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), bob, NOW)
    futures = [
        store.enqueue(private(ann, bob, "before")),
        store.enqueue(private(ann, gone, "to nobody")),
        store.enqueue(private(gone, bob, "from nobody")),  # a sender deleted meanwhile
        store.enqueue(to_channel(gone, lobby.id, "from nobody")),
        store.enqueue(private(ann, bob, "after")),
    ]
    before, *failed, after = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(before, Stored) and isinstance(after, Stored)
    assert all(isinstance(result, Exception) for result in failed)
    assert bodies(await store.take_inbox(bob, 10)) == ["before", "after"]
    assert bodies(await store.channel_history(lobby.id, None, 10)) == []


async def test_reads_see_the_sends_enqueued_before_them(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    for i in range(50):
        sent = store.enqueue(private(ann, bob, f"p{i}"))  # not awaited
        store.enqueue(to_channel(ann, lobby.id, f"c{i}"))
        assert await store.ack_private(bob, 1 << 62) == (await sent).id
    final = store.enqueue(to_channel(ann, lobby.id, "last"))
    history = await store.channel_history(lobby.id, None, 1)
    assert bodies(history) == ["last"] and final.done()


# Opening, migrations, errors.


async def test_reopening_migrates_nothing_and_keeps_everything(backend: Backend) -> None:
    store = await backend.open()
    ann = await add_user(store, "ann")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    await store.enqueue(to_channel(ann, lobby.id, "kept"))
    version = await backend.schema_version()
    assert version >= 1
    await backend.close(store)
    store = await backend.open()
    assert await backend.schema_version() == version
    assert await store.find_channel("lobby") == lobby
    assert bodies(await store.channel_history(lobby.id, None, 10)) == ["kept"]
    # Ids go on from where they were.
    again = await store.enqueue(to_channel(ann, lobby.id, "next"))
    assert again.id > (await store.channel_history(lobby.id, again.id, 1)).messages[0].id


async def test_stores_opened_at_once_on_an_empty_database_do_not_race(
    backend: Backend,
) -> None:
    # Several nodes starting at once on PostgreSQL; on SQLite, the server and an admin
    # command (the version is read under the write lock, or both create the tables).
    stores = await asyncio.gather(*(backend.open() for _ in range(4)))
    assert await backend.schema_version() >= 1
    assert await add_user(stores[0], "ann") > 0
    assert await stores[3].find_user("ann") is not None


async def test_a_schema_newer_than_the_store_knows_is_refused(backend: Backend) -> None:
    await backend.close(await backend.open())
    if backend.kind == "sqlite":
        await asyncio.to_thread(_sqlite_write, backend.db, "PRAGMA user_version = 999")
    else:
        import asyncpg

        conn = await asyncpg.connect(backend.db)
        try:
            await conn.execute("UPDATE chatd_schema SET version = 999")
        finally:
            await conn.close()
    with pytest.raises(StoreError, match="version 999, newer than this chatd knows"):
        await backend.open()


def _sqlite_write(path: str, sql: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql)
    finally:
        conn.close()


async def test_each_stream_is_numbered_from_one(backend: Backend) -> None:
    store = await backend.open()
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    dev, _ = await store.join_channel("dev", "dev", looks("dev"), ann, NOW)
    futures = []
    for i in range(30):
        target = (lobby.id, dev.id)[i % 2]
        futures.append(store.enqueue(to_channel(ann, target, f"c{i}", f"k{i}")))
        futures.append(store.enqueue(private(ann, bob if i % 3 else ann, f"p{i}")))
    results = await asyncio.gather(*futures)
    await store.enqueue(private(bob, ann, "one more"))
    for table, stream in (("channel_messages", "channel_id"), ("private_messages", "recipient_id")):
        rows = await backend.query(f"SELECT {stream}, seq FROM {table} ORDER BY id")
        streams: dict[int, list[int]] = {}
        for key, seq in rows:
            streams.setdefault(key, []).append(seq)
        for seqs in streams.values():
            assert seqs == list(range(1, len(seqs) + 1))
    heads = await backend.query(f"SELECT last_seq FROM channels WHERE id = {lobby.id}")
    assert heads == [(15,)]
    # Results and rows carry the seq, and a repeated client_id gets the first one's.
    assert [r.seq for r in results[0:8:4]] == [1, 2]  # c0 and c2, both in lobby
    repeat = await store.enqueue(to_channel(ann, lobby.id, "c2 again", "k2"))
    assert (repeat.id, repeat.seq, repeat.duplicate) == (results[4].id, 2, True)
    history = await store.channel_history(lobby.id, None, 3)
    assert [m.seq for m in history.messages] == [13, 14, 15]
    caught_up = await store.inbox_after(bob, 0, 100)
    assert [m.seq for m in caught_up] == list(range(1, 21))
    assert [m.seq for m in await store.channel_after(lobby.id, 0, 2, bob, 0)] == [1, 2]
    assert [m.seq for m in (await store.take_inbox(ann, 2)).messages] == [1, 2]
    assert [m.seq for m in (await store.take_channel(dev.id, bob, 2, 2)).messages] == [14, 15]


async def test_stream_heads_are_read_for_many_streams_at_once(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    quiet = await add_user(store, "quiet")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    empty, _ = await store.join_channel("empty", "empty", looks("empty"), ann, NOW)
    await asyncio.gather(
        *(store.enqueue(private(ann, bob, f"p{i}")) for i in range(3)),
        *(store.enqueue(to_channel(ann, lobby.id, f"c{i}")) for i in range(5)),
    )
    heads = await store.stream_heads([ann, bob, quiet, 999_999], [lobby.id, empty.id, 999_999])
    assert heads.inboxes == {ann: 0, bob: 3, quiet: 0}  # a user that does not exist: absent
    assert heads.channels == {lobby.id: 5, empty.id: 0}
    # A head is what a read sees: never ahead of the stored messages.
    newest = await store.inbox_after(bob, 0, 100)
    assert newest[-1].seq == heads.inboxes[bob]
    await store.enqueue(private(bob, ann, "back"))
    assert (await store.stream_heads([ann], [])).inboxes == {ann: 1}
    assert await store.stream_heads([], []) == StreamHeads({}, {})
    many = list(range(1, 5001))  # thousands of ids are still one statement
    assert (await store.stream_heads(many, many)).inboxes[bob] == 3


async def test_channel_newest_is_read_for_many_channels_at_once(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    empty, _ = await store.join_channel("empty", "empty", looks("empty"), ann, NOW)
    other, _ = await store.join_channel("other", "other", looks("other"), ann, NOW)
    for i in range(3):  # interleaved channels: lobby's newest id is not its seq
        await store.enqueue(to_channel(ann, lobby.id, f"l{i}"))
        newest_other = await store.enqueue(to_channel(ann, other.id, f"o{i}"))
    newest_lobby = await store.enqueue(to_channel(ann, lobby.id, "last"))
    assert await store.channel_newest([lobby.id, empty.id, other.id, 999_999]) == {
        lobby.id: StreamPosition(newest_lobby.id, 4),
        empty.id: StreamPosition(0, 0),
        other.id: StreamPosition(newest_other.id, 3),
    }  # a channel that does not exist: absent
    assert await store.channel_newest([]) == {}
    many = [lobby.id, *range(10_000, 15_000)]  # thousands of ids are still one statement
    assert (await store.channel_newest(many)) == {lobby.id: StreamPosition(newest_lobby.id, 4)}


async def test_positions_carry_the_seq_of_their_message(store: MessageStore) -> None:
    # Delivery orders by seq, the wire speaks ids: a position is both (chatd.delivery).
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    carol = await add_user(store, "carol")
    for i in range(3):  # interleaved inboxes: bob's ids are not his seqs
        await store.enqueue(private(ann, carol, f"to carol {i}"))
        await store.enqueue(private(ann, bob, f"to bob {i}"))
    from_carol = await store.enqueue(private(carol, bob, "from carol"))
    assert from_carol.seq == 4 and from_carol.id == 7
    acked = await store.ack_private(bob, from_carol.id)
    assert await store.inbox_position(bob) == StreamPosition(acked, 4)
    # The acknowledged message deleted with its sender: the id stays, and the seq is
    # the newest one at or below it, so nothing after it is taken for a repeat.
    await store.delete_user(carol)
    assert await store.inbox_position(bob) == StreamPosition(acked, 3)
    lobby, _ = await store.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    await store.join_channel("lobby", "lobby", looks("lobby"), bob, NOW)
    assert await store.channel_position(lobby.id, bob) == (StreamPosition(0, 0, True), 0)
    first = await store.enqueue(to_channel(ann, lobby.id, "one"))
    await store.enqueue(private(ann, bob, "between"))
    second = await store.enqueue(to_channel(ann, lobby.id, "two"))
    assert await store.channel_position(lobby.id, bob) == (
        StreamPosition(second.id, 2, fresh=True), second.id
    )
    await store.ack_channel(lobby.id, bob, first.id)
    assert await store.channel_position(lobby.id, bob) == (
        StreamPosition(first.id, 1), second.id
    )


async def test_ids_grow_with_seq_within_a_stream_with_two_writers(backend: Backend) -> None:
    # The catch-up pages a stream by id (no (stream, seq) index on SQLite) and relies
    # on this: within one stream, id order is seq order, even with two nodes writing.
    one, two = await backend.open(), await backend.open()
    ann = await add_user(one, "ann")
    bob = await add_user(one, "bob")
    lobby, _ = await one.join_channel("lobby", "lobby", looks("lobby"), ann, NOW)
    sends = []
    for i in range(200):
        store = (one, two)[i % 2]
        sends.append(store.enqueue(to_channel(ann, lobby.id, f"c{i}")))
        sends.append(store.enqueue(private(ann, (ann, bob)[i % 3 == 0], f"p{i}")))
    await asyncio.gather(*sends)
    for table, stream in (("channel_messages", "channel_id"), ("private_messages", "recipient_id")):
        rows = await backend.query(f"SELECT {stream}, seq FROM {table} ORDER BY id")
        streams: dict[int, list[int]] = {}
        for key, seq in rows:
            streams.setdefault(key, []).append(seq)
        assert sum(map(len, streams.values())) == 200
        for seqs in streams.values():
            assert seqs == list(range(1, len(seqs) + 1))


async def test_an_unreachable_postgres_is_a_store_error() -> None:
    pytest.importorskip("asyncpg")
    url = "postgresql://chatd:secret@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError, match="cannot open database") as caught:
        await open_store(url, Config(db=url))
    assert "secret" not in str(caught.value)


async def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # makes `import asyncpg` fail
    monkeypatch.delitem(sys.modules, "chatd.store.postgres", raising=False)
    url = "postgresql://postgres@127.0.0.1:5432/chatd"
    with pytest.raises(StoreError) as caught:
        await open_store(url, Config(db=url))
    assert str(caught.value) == (
        "postgresql URLs need the asyncpg driver: pip install 'chatd[postgresql]'"
    )


SQLITE_ONLY = """
import asyncio, sys
from chatd.config import Config
from chatd.server import Server
from chatd.store import open_store

async def main() -> None:
    store = await open_store(sys.argv[1], Config(db=sys.argv[1]))
    await store.close()

asyncio.run(main())
print("asyncpg" in sys.modules)
"""


async def test_the_sqlite_default_never_loads_the_driver(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SQLITE_ONLY, str(tmp_path / "plain.sqlite3"),
        stdout=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert (proc.returncode, out.strip()) == (0, b"False")


async def test_postgres_sends_go_on_after_the_writer_connection_is_cut() -> None:
    async with fresh_database() as url:
        import asyncpg

        store = await open_store(url, Config(db=url))
        try:
            ann = await add_user(store, "ann")
            await store.enqueue(private(ann, ann, "before"))
            admin = await asyncpg.connect(url)
            try:  # every other backend of this database: the flusher's among them
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            finally:
                await admin.close()
            with pytest.raises(Exception):  # noqa: B017 (asyncpg's own kinds of loss)
                await store.enqueue(private(ann, ann, "lost with the connection"))
            after = await store.enqueue(private(ann, ann, "after"))
            assert after.seq == 2
            assert bodies(await store.take_inbox(ann, 10)) == ["before", "after"]
        finally:
            await store.close()


async def test_a_new_postgres_database_is_created_not_migrated_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A first start logged "migrating database schema to version 1", 2, ...: an upgrade?
    from chatd.store.postgres import MIGRATIONS

    async with fresh_database() as url:
        with caplog.at_level(logging.INFO, logger="chatd.store.postgres"):
            await (await open_store(url, Config(db=url))).close()
            await (await open_store(url, Config(db=url))).close()  # nothing to do: silent
    schema = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert schema == [f"creating the database schema (version {len(MIGRATIONS)})"]


async def test_postgres_schema_1_migrates_with_its_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A database made by chatd before the batch function (schema 1, as on main at 7de4ee5).
    from chatd.store.postgres import MIGRATIONS

    async with fresh_database() as url:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute(MIGRATIONS[0])
            await conn.execute(
                "CREATE TABLE chatd_schema (version INTEGER NOT NULL);"
                " INSERT INTO chatd_schema VALUES (1);"
                " INSERT INTO users (name, name_key, skeleton, upper_skeleton, password_hash,"
                "  created_at, inbox_seq) VALUES ('ann', 'ann', 'ann', 'ANN', 'h', 0, 1);"
                " INSERT INTO private_messages (sender_id, recipient_id, seq, body, created_at,"
                "  client_id) VALUES (1, 1, 1, 'old', 0, 'k')"
            )
        finally:
            await conn.close()
        with caplog.at_level(logging.INFO, logger="chatd.store.postgres"):
            store = await open_store(url, Config(db=url))
        steps = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
        assert steps == [
            f"migrating database schema to version {n}" for n in range(2, len(MIGRATIONS) + 1)
        ]
        try:
            repeat = await store.enqueue(private(1, 1, "old again", "k"))
            assert (repeat.id, repeat.seq, repeat.duplicate) == (1, 1, True)
            new = await store.enqueue(private(1, 1, "new"))
            assert (new.id, new.seq) == (2, 2)
            await store.delete_user(1)
            assert await store.inbox_after(1, 0, 10) == []
        finally:
            await store.close()


# IRC: guests (protocol.md 12.6) and CHATHISTORY ranges (12.5).


async def test_a_guest_holds_its_name_while_connected_and_leaves_its_words(
    store: MessageStore,
) -> None:
    ann = await add_user(store, "ann")
    guest = await store.create_guest("Visitor", "visitor", looks("Visitor"), NOW)
    assert guest is not None
    assert await store.create_guest("visitor", "visitor", looks("visitor"), NOW) is None
    assert not await store.create_user("VISITOR", "visitor", looks("VISITOR"), "h", NOW)
    assert await store.create_guest("ann", "ann", looks("ann"), NOW) is None
    channel, _ = await store.join_channel("Lobby", "lobby", looks("Lobby"), guest, NOW)
    await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW)
    await store.add_token(guest, b"g", NOW, NOW + HOUR)
    await store.enqueue(to_channel(guest, channel.id, "hello from a guest"))
    await store.enqueue(private(guest, ann, "to ann"))
    await store.enqueue(private(ann, guest, "to the guest"))
    await store.release_guests(guest)
    assert await store.find_user("visitor") is None
    assert await store.live_tokens([b"g"], NOW) == set()
    assert [name for _, name in await store.channel_members(channel.id)] == ["ann"]
    history = await store.channel_history(channel.id, None, 10)
    assert [(m.sender, m.body) for m in history.messages] == [("Visitor", "hello from a guest")]
    assert bodies(await store.take_inbox(ann, 10)) == ["to ann"]
    assert await store.create_user("visitor", "visitor", looks("visitor"), "h", NOW)
    await store.release_guests()  # at start-up: nothing left to release, no account touched
    assert await store.find_user("visitor") is not None


async def test_history_ranges_by_id_and_time(store: MessageStore) -> None:
    ann = await add_user(store, "ann")
    bob = await add_user(store, "bob")
    channel, _ = await store.join_channel("Lobby", "lobby", looks("Lobby"), ann, NOW)
    ids = []
    for second in range(1, 6):
        message = NewMessage(CHANNEL, ann, channel.id, f"c{second}", NOW + second, None)
        ids.append((await store.enqueue(message)).id)
        await store.enqueue(NewMessage(PRIVATE, bob, ann, f"p{second}", NOW + second, None))
    newest = await store.channel_range(channel.id, Bounds(), 2, newest=True)
    assert [m.body for m in newest] == ["c4", "c5"]
    after = await store.channel_range(channel.id, Bounds(after_id=ids[1]), 2, newest=False)
    assert [m.body for m in after] == ["c3", "c4"]
    timed = Bounds(after_time=NOW + 1.5, before_time=NOW + 4)
    assert [m.body for m in await store.channel_range(channel.id, timed, 9, False)] == [
        "c2", "c3"
    ]
    pairs = await store.private_range(ann, bob, Bounds(before_time=NOW + 3), 9, newest=True)
    assert [(m.sender, m.recipient, m.body) for m in pairs] == [
        ("bob", "ann", "p1"), ("bob", "ann", "p2")
    ]
    assert await store.message_time(True, ids[2]) == NOW + 3
    assert await store.message_time(True, 10_000) is None
    targets = await store.recent_targets(ann, NOW, NOW + 10, 10)
    assert sorted(targets) == [("Lobby", True, NOW + 5), ("bob", False, NOW + 5)]
    assert await store.recent_targets(ann, NOW + 6, NOW + 10, 10) == []
