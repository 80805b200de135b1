"""The SQLite store's group commit path: the hop to the database thread and back
(_Handoff), and the client_id look-up inside the commit.

A real database file in WAL mode, the store's own connection and thread; no server:
these are costs and hand-offs a wire test cannot see.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.store import PRIVATE, NewMessage, Stored
from chatd.store.sqlite import Store, _earlier_sends


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(str(tmp_path / "db.sqlite3"))
    try:
        yield opened
    finally:
        await opened.close()


async def user(store: Store, name: str) -> int:
    await store.create_user(name, name, (name, name.upper()), "hash", time.time())
    found = await store.find_user(name)
    assert found is not None
    return found.id


async def test_a_client_id_look_up_searches_the_index_instead_of_reading_the_table(
    store: Store,
) -> None:
    sender, recipient = await user(store, "alice"), await user(store, "bob")
    for batch in range(20):
        await asyncio.gather(
            *(
                store.enqueue(NewMessage(PRIVATE, sender, recipient, "x", 0.0, f"c{batch}-{i}"))
                for i in range(100)
            )
        )
    keyed = [
        NewMessage(PRIVATE, sender, recipient, "x", 0.0, "c7-42"),
        NewMessage(PRIVATE, sender, recipient, "x", 0.0, "never-sent"),
    ]

    def look_up() -> tuple[int, list[str]]:
        conn = store._db._conn
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 1)  # called every VM instruction
        try:
            found = _earlier_sends(conn, keyed)
        finally:
            conn.set_progress_handler(None, 1)
        return steps, [client_id for _, _, client_id in found]

    steps, found = await store._handoff.call(look_up)
    assert found == ["c7-42"]
    # Two index searches take a few dozen instructions; reading 2,000 rows took thousands.
    assert steps < 300, steps


async def test_an_error_on_the_database_thread_reaches_the_caller_and_the_next_call_works(
    store: Store,
) -> None:
    def fails() -> None:
        store._db._conn.execute("SELECT * FROM no_such_table")

    with pytest.raises(sqlite3.OperationalError):
        await store._handoff.call(fails)
    assert await store._handoff.call(lambda: 42) == 42


async def test_a_call_whose_caller_gave_up_still_runs_and_the_others_are_answered(
    store: Store,
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    ran: list[str] = []

    def slow() -> str:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        ran.append("slow")
        return "slow"

    abandoned = store._handoff.call(slow)
    await started.wait()
    abandoned.cancel()
    after = store._handoff.call(lambda: "after")
    release.set()
    assert await after == "after"
    assert ran == ["slow"]


async def test_many_calls_at_once_are_each_answered_in_order(store: Store) -> None:
    results = await asyncio.gather(*(store._handoff.call(lambda n=n: n) for n in range(200)))
    assert results == list(range(200))


async def test_closing_the_store_closes_the_wake_up_descriptor(tmp_path: Path) -> None:
    opened = await Store.open(str(tmp_path / "db.sqlite3"))
    fd = opened._handoff._read_fd
    before = os.fstat(fd)  # open while the store is
    await opened.close()
    try:
        after = os.fstat(fd)
    except OSError:
        pass
    else:  # the number was taken by a file opened since
        assert (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino)
    with pytest.raises(ValueError, match="closed"):
        opened._handoff.call(lambda: None)


async def test_lone_and_batched_sends_number_one_stream_without_a_gap(store: Store) -> None:
    sender, recipient = await user(store, "alice"), await user(store, "bob")

    def send(body: str) -> asyncio.Future[Stored]:
        return store.enqueue(NewMessage(PRIVATE, sender, recipient, body, 0.0, None))

    lone = [await send(f"lone{i}") for i in range(3)]  # one message a commit: _insert_one
    batched = await asyncio.gather(*(send(f"batch{i}") for i in range(5)))
    last = await send("last")
    assert [s.seq for s in [*lone, *batched, last]] == list(range(1, 10))
    ids = [s.id for s in [*lone, *batched, last]]
    assert ids == sorted(ids)


async def test_a_lone_send_to_a_deleted_user_fails_alone(store: Store) -> None:
    sender, gone = await user(store, "alice"), await user(store, "gone")
    await store.delete_user(gone)
    with pytest.raises(sqlite3.IntegrityError):
        await store.enqueue(NewMessage(PRIVATE, sender, gone, "to nobody", 0.0, None))
    again = await store.enqueue(NewMessage(PRIVATE, sender, sender, "to myself", 0.0, None))
    assert again.seq == 1


async def test_the_write_path_reads_the_wal_size_the_file_has_through_truncations(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db.sqlite3")
    limit = 64 * 1024
    store = await Store.open(path)

    async def wal_file() -> int:
        return await asyncio.to_thread(os.path.getsize, path + "-wal")

    try:
        await store.checkpoint_in_background(path, 3600, wal_limit=limit)
        sender = await user(store, "alice")
        sizes = []
        for _ in range(3):  # grow the WAL past the limit, then rewind it: truncated to it
            while await wal_file() <= limit:
                await store.enqueue(NewMessage(PRIVATE, sender, sender, "x" * 2000, 0.0, None))
                assert store._wal_end() == await wal_file()
            sizes.append(store._wal_end())
            await store._rewind()
            await store.enqueue(NewMessage(PRIVATE, sender, sender, "after", 0.0, None))
            assert store._wal_end() == await wal_file() <= limit
        assert all(size > limit for size in sizes)
    finally:
        await store.close()
