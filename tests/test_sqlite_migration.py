"""A database written by chatd before per-stream seqs, opened by chatd now.

tests/fixtures/chatd-v4.sqlite3 was made by main's Store at schema version 4
(tests/fixtures/make_chatd_v4.py says how, and what it holds). Opening it must
number the stored messages in place (by id within each stream) and leave every
answer as it was: the same ids, the same positions, the same pages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.store import (
    CHANNEL,
    MIGRATIONS,
    PRIVATE,
    Joined,
    NewMessage,
    Store,
    StoreError,
    StreamPosition,
)
from chatd.validation import name_skeletons

FIXTURE = Path(__file__).parent / "fixtures" / "chatd-v4.sqlite3"
NOW = 1_800_000_000.0
ANN, BOB, CLEO = 1, 2, 3
LOBBY, DEV = 1, 2


@pytest.fixture
def old_file(tmp_path: Path) -> str:
    target = tmp_path / "chatd.sqlite3"
    shutil.copyfile(FIXTURE, target)
    return str(target)


@pytest.fixture
async def store(old_file: str) -> AsyncIterator[Store]:
    store = await Store.open(old_file)
    yield store
    await store.close()


def _query(path: str, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_the_fixture_is_at_version_4_without_seqs() -> None:
    # Guards the fixture itself: it must stay what the old code wrote.
    assert await asyncio.to_thread(_query, str(FIXTURE), "PRAGMA user_version") == [(4,)]
    columns = await asyncio.to_thread(_query, str(FIXTURE), "PRAGMA table_info(channel_messages)")
    assert "seq" not in [column[1] for column in columns]


async def test_opening_numbers_every_stream_by_id(old_file: str, store: Store) -> None:
    assert await asyncio.to_thread(_query, old_file, "PRAGMA user_version") == [
        (len(MIGRATIONS),)
    ]
    private = await asyncio.to_thread(
        _query, old_file, "SELECT id, recipient_id, seq FROM private_messages ORDER BY id"
    )
    # bob's inbox holds 1, 2, 4; ann's 3; cleo's 5.
    assert private == [(1, BOB, 1), (2, BOB, 2), (3, ANN, 1), (4, BOB, 3), (5, CLEO, 1)]
    channel = await asyncio.to_thread(
        _query, old_file, "SELECT id, channel_id, seq FROM channel_messages ORDER BY id"
    )
    assert channel == [(1, LOBBY, 1), (2, DEV, 1), (3, LOBBY, 2), (4, LOBBY, 3), (5, DEV, 2)]
    heads = await asyncio.to_thread(_query, old_file, "SELECT id, inbox_seq FROM users")
    assert sorted(heads) == [(ANN, 1), (BOB, 3), (CLEO, 1)]
    heads = await asyncio.to_thread(_query, old_file, "SELECT id, last_seq FROM channels")
    assert sorted(heads) == [(LOBBY, 3), (DEV, 2)]


async def test_accounts_and_tokens_answer_as_before(store: Store) -> None:
    ann = await store.find_user("ann")
    assert ann is not None and (ann.id, ann.name, ann.password_hash) == (ANN, "Ann", "hash-ann")
    owner = await store.token_owner(bytes([1]) * 32, NOW)
    assert owner is not None and owner[0].name == "bob"
    assert [(name, tokens) for name, _, tokens in await store.list_users(NOW)] == [
        ("Ann", 1), ("bob", 1), ("Cleo", 1),
    ]
    assert await store.user_name_taken("cleo", name_skeletons("cleo"))


async def test_positions_and_pages_answer_as_before(store: Store) -> None:
    # Positions stay ids, each with its message's new seq.
    assert await store.inbox_position(ANN) == StreamPosition(3, 1)
    assert await store.inbox_position(BOB) == StreamPosition(1, 1)
    assert await store.channel_position(LOBBY, CLEO) == (StreamPosition(4, 3), 4)
    never_received = StreamPosition(4, 3, fresh=True)
    assert await store.channel_position(LOBBY, BOB) == (never_received, 4)
    inbox = await store.take_inbox(BOB, 10)
    assert [(m.id, m.seq, m.sender, m.body) for m in inbox.messages] == [
        (2, 2, "Cleo", "bob, it is cleo"), (4, 3, "Ann", "second to bob"),
    ]
    history = await store.channel_history(LOBBY, None, 2)
    assert [(m.id, m.seq) for m in history.messages] == [(3, 2), (4, 3)] and history.more
    assert [m.id for m in (await store.channel_history(LOBBY, 3, 5)).messages] == [1]
    talk = await store.private_history(ANN, BOB, None, 10)
    assert [(m.id, m.sender, m.recipient) for m in talk.messages] == [
        (1, "Ann", "bob"), (3, "bob", "Ann"), (4, "Ann", "bob"),
    ]
    assert [(m.channel, m.read_cursor, m.unread) for m in await store.memberships(CLEO, 50)] == [
        ("Lobby", 4, 0),
    ]
    assert [m.id for m in await store.channel_after(LOBBY, 0, 10, ANN, 10)] == [3, 4]
    assert await store.ack_channel(LOBBY, BOB, 3) == 3


async def test_memberships_and_leaves_answer_as_before(store: Store) -> None:
    assert await store.channel_ids(ANN) == [LOBBY]
    assert not await store.is_member(DEV, ANN)
    assert await store.channel_members(LOBBY) == [(ANN, "Ann"), (BOB, "bob"), (CLEO, "Cleo")]
    channel, joined = await store.join_channel("dev", "dev", name_skeletons("dev"), ANN, NOW)
    assert (channel.id, joined) == (DEV, Joined.LEFT)


async def test_new_sends_go_on_from_the_old_ids_and_numbers(store: Store) -> None:
    to_lobby = await store.enqueue(NewMessage(CHANNEL, BOB, LOBBY, "new", NOW, None))
    to_bob = await store.enqueue(NewMessage(PRIVATE, CLEO, BOB, "new", NOW, None))
    to_dan = await store.enqueue(NewMessage(PRIVATE, ANN, CLEO, "new", NOW, None))
    assert (to_lobby.id, to_lobby.seq) == (6, 4)
    assert (to_bob.id, to_bob.seq) == (6, 4)
    assert (to_dan.id, to_dan.seq) == (7, 2)
    # A retry of a send stored by the old code is still recognised, with its number.
    retry = await store.enqueue(NewMessage(PRIVATE, BOB, ANN, "hi ann", NOW, "p-1"))
    assert (retry.id, retry.seq, retry.duplicate) == (3, 1, True)
    retry = await store.enqueue(NewMessage(CHANNEL, ANN, LOBBY, "hello lobby", NOW, "c-1"))
    assert (retry.id, retry.seq, retry.duplicate) == (1, 1, True)


async def test_reopening_the_migrated_file_changes_nothing(old_file: str) -> None:
    store = await Store.open(old_file)
    await store.close()
    before = await asyncio.to_thread(_query, old_file, "SELECT * FROM channel_messages")
    store = await Store.open(old_file)
    await store.close()
    assert await asyncio.to_thread(_query, old_file, "SELECT * FROM channel_messages") == before


async def test_the_log_says_creating_for_a_new_file_and_migrating_for_an_old_one(
    old_file: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A first start logged "migrating database schema to version 1", 2, ...: an upgrade?
    with caplog.at_level(logging.INFO, logger="chatd.store.sqlite"):
        await (await Store.open(str(tmp_path / "new.sqlite3"))).close()
        await (await Store.open(old_file)).close()
    schema = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert schema == [
        f"creating the database schema (version {len(MIGRATIONS)})",
        *(f"migrating database schema to version {n}" for n in range(5, len(MIGRATIONS) + 1)),
    ]


async def test_an_old_file_keeps_its_page_size(old_file: str, store: Store) -> None:
    # The page size of a file is fixed when it is made: opening never rewrites it.
    assert await asyncio.to_thread(_query, old_file, "PRAGMA page_size") == [(4096,)]


async def test_a_new_file_writes_a_quarter_of_the_wal_per_send(tmp_path: Path) -> None:
    # One message per commit, as at low load: each commit writes every page it touched
    # whole, so the page size sets the WAL's growth (and the checkpoints' work). With
    # SQLite's default 4 KiB pages this was ~22 KiB per send.
    path = str(tmp_path / "chatd.sqlite3")
    store = await Store.open(path)
    try:
        for name in ("ann", "bob"):
            assert await store.create_user(name, name, name_skeletons(name), "x", NOW)
        first = await store.enqueue(NewMessage(PRIVATE, 1, 2, "warm-up", NOW, None))
        assert first.id == 1
        before = await asyncio.to_thread(os.path.getsize, path + "-wal")
        for n in range(50):
            await store.enqueue(NewMessage(PRIVATE, n % 2 + 1, 2 - n % 2, "hi", NOW, f"c{n}"))
        grown = await asyncio.to_thread(os.path.getsize, path + "-wal") - before
    finally:
        await store.close()
    assert grown / 50 < 8 * 1024
    assert await asyncio.to_thread(_query, path, "PRAGMA page_size") == [(1024,)]


async def test_stores_opened_together_on_new_files_all_start(tmp_path: Path) -> None:
    # The switch from the rollback journal to WAL: SQLite answers the second of two
    # connections making it at once with "database is locked" without waiting (13-18 of
    # 100 rounds of four failed before the switch retried).
    for round_ in range(25):
        path = str(tmp_path / f"new-{round_}.sqlite3")
        opened = await asyncio.gather(*(Store.open(path) for _ in range(4)), return_exceptions=True)
        for store in opened:
            if isinstance(store, Store):
                await store.close()
        assert [s for s in opened if not isinstance(s, Store)] == []
        assert await asyncio.to_thread(_query, path, "PRAGMA journal_mode") == [("wal",)]


async def test_a_new_file_locked_longer_than_the_busy_timeout_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.sqlite3")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match=r"cannot open database .*: database is locked"):
            await Store.open(path, busy_timeout=0.2)
    finally:
        holder.close()
    store = await Store.open(path, busy_timeout=0.2)
    await store.close()


async def test_a_database_without_a_wal_is_refused() -> None:
    # An in-memory database keeps journal_mode=memory: the store's guarantees need WAL.
    with pytest.raises(StoreError, match=r"cannot use the WAL journal \(journal_mode is memory\)"):
        await Store.open(":memory:")
