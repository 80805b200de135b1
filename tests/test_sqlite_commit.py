"""The SQLite store's group commit path: the hop to the database thread and back
(_Handoff), the write lock taken without a coroutine, the per-commit check of the file,
and the client_id look-up inside the commit.

A real database file in WAL mode, the store's own connection and thread; no server:
these are costs and hand-offs a wire test cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from chatd.store import PRIVATE, DatabaseFileLost, NewMessage, Stored, StoreError
from chatd.store import sqlite as sqlite_store
from chatd.store.sqlite import WAL_LOOK_INTERVAL, Store, _earlier_sends, _WriteLock


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


async def test_the_write_lock_is_taken_at_once_only_when_no_one_waits_for_it() -> None:
    lock = _WriteLock()
    assert lock.take_if_free()
    assert not lock.take_if_free()  # held
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # it waits for the lock
    lock.release()
    # Released, but handed to the waiter, which has not run yet: taking it now would let
    # two hold it (acquire takes it without looking again once woken).
    assert not lock.locked() and not lock.take_if_free()
    await waiting
    assert order == ["waiter"] and lock.take_if_free()
    lock.release()
    cancelled = asyncio.create_task(lock.acquire())
    assert lock.take_if_free()  # the task has not run: it waits for nothing yet
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    lock.release()
    assert lock.take_if_free()  # a cancelled waiter holds nothing up


async def test_sends_wait_their_turn_behind_a_transaction_and_keep_their_order(
    store: Store,
) -> None:
    sender, recipient = await user(store, "alice"), await user(store, "bob")
    async with store._lock:  # another request's transaction under way
        held = [
            store.enqueue(NewMessage(PRIVATE, sender, recipient, f"m{i}", 0.0, None))
            for i in range(3)
        ]
        await asyncio.sleep(0.01)
        assert not any(future.done() for future in held)
    assert [stored.seq for stored in await asyncio.gather(*held)] == [1, 2, 3]
    lone = await store.enqueue(NewMessage(PRIVATE, sender, recipient, "m3", 0.0, None))
    assert lone.seq == 4 and not store._lock.locked()


def _replace(path: Path, keep_old_as: Path | None) -> None:
    """Put another database at ``path``; the old file (if any) kept under another name
    if asked."""
    if keep_old_as is not None:
        os.link(path, keep_old_as)
    other = path.with_name("other.sqlite3")
    sqlite3.connect(other).close()
    os.replace(other, path)


@pytest.mark.parametrize("keep_old", [False, True], ids=["replaced", "replaced-hard-linked"])
async def test_a_replaced_database_file_acknowledges_no_more_sends(
    tmp_path: Path, keep_old: bool
) -> None:
    path = tmp_path / "db.sqlite3"
    store = await Store.open(str(path))
    try:
        if sys.platform == "linux":
            assert store._watch is not None  # the readlink per commit, not the stat
        sender = await user(store, "alice")
        await store.enqueue(NewMessage(PRIVATE, sender, sender, "kept", 0.0, None))
        await asyncio.to_thread(_replace, path, tmp_path / "old.sqlite3" if keep_old else None)
        with pytest.raises(DatabaseFileLost):
            await store.enqueue(NewMessage(PRIVATE, sender, sender, "lost", 0.0, None))
    finally:
        await store.close()


async def test_a_database_opened_through_a_symbolic_link_notices_the_link_moved(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "a")
    store = await Store.open(str(link / "db.sqlite3"))
    try:
        assert store._watch is None  # the kernel's name is not the path: the stat alone
        sender = await user(store, "alice")
        await asyncio.to_thread(_replace, tmp_path / "b" / "db.sqlite3", None)
        switched = tmp_path / "switched"
        switched.symlink_to(tmp_path / "b")
        switched.replace(link)  # a deployment's "current" link moved to a new directory
        with pytest.raises(DatabaseFileLost):
            await store.enqueue(NewMessage(PRIVATE, sender, sender, "lost", 0.0, None))
    finally:
        await store.close()


async def test_closing_the_store_closes_the_file_watch(tmp_path: Path) -> None:
    opened = await Store.open(str(tmp_path / "db.sqlite3"))
    watch = opened._watch
    await opened.close()
    if watch is not None:
        try:
            name = os.readlink(watch[1])
        except OSError:
            return
        assert name != str(tmp_path / "db.sqlite3")  # the number was taken since


async def statements_of(store: Store, send: asyncio.Future[Stored]) -> tuple[Stored, list[str]]:
    """A send's result, and the statements its commit ran (a trace on the database thread)."""
    seen: list[str] = []
    await store._handoff.call(store._db._conn.set_trace_callback, seen.append)
    try:
        return await send, seen
    finally:
        await store._handoff.call(store._db._conn.set_trace_callback, None)


async def test_a_lone_send_moves_its_head_from_the_one_the_last_commit_left(store: Store) -> None:
    sender, recipient = await user(store, "alice"), await user(store, "bob")

    def send() -> asyncio.Future[Stored]:
        return store.enqueue(NewMessage(PRIVATE, sender, recipient, "x", 0.0, None))

    first, statements = await statements_of(store, send())
    assert first.seq == 1 and any("RETURNING" in s for s in statements)  # nothing known yet
    second, statements = await statements_of(store, send())
    assert second.seq == 2
    assert not any("RETURNING" in s for s in statements)  # "set 2 where it is 1"
    assert any(s.endswith(f"WHERE id = {recipient} AND inbox_seq = 1") for s in statements)


def _move_head(path: str, user_id: int, head: int) -> None:
    other = sqlite3.connect(path)
    try:
        other.execute("UPDATE users SET inbox_seq = ? WHERE id = ?", (head, user_id))
        other.commit()
    finally:
        other.close()


async def test_a_head_moved_elsewhere_or_a_user_id_given_again_is_numbered_from_the_row(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db.sqlite3")
    store = await Store.open(path)
    try:
        sender, recipient = await user(store, "alice"), await user(store, "bob")

        def send(to: int) -> asyncio.Future[Stored]:
            return store.enqueue(NewMessage(PRIVATE, sender, to, "x", 0.0, None))

        assert [(await send(recipient)).seq for _ in range(2)] == [1, 2]
        await asyncio.to_thread(_move_head, path, recipient, 10)  # another process's doing
        assert (await send(recipient)).seq == 11  # not 3: the guess is checked
        await store.delete_user(recipient)
        again = await user(store, "carol")
        assert again == recipient  # the highest id freed is given again (no AUTOINCREMENT)
        assert (await send(again)).seq == 1
        assert (await send(again)).seq == 2
    finally:
        await store.close()


async def test_a_file_system_mounted_over_the_database_directory_is_noticed(
    tmp_path: Path,
) -> None:
    # The per-commit readlink still reads the path (the file opened is intact beneath
    # the mount): the checkpoint loop's stat of the path is what tells.
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory = tmp_path / "data"
    directory.mkdir()
    path = str(directory / "db.sqlite3")
    store = await Store.open(path)
    mounted = False
    try:
        await store.checkpoint_in_background(path, 3600)
        sender = await user(store, "alice")
        mount = await asyncio.to_thread(
            subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(directory)],
            capture_output=True, text=True, check=False,
        )
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
        mounted = True
        with pytest.raises(DatabaseFileLost):
            async with asyncio.timeout(10):
                while True:  # until the checkpoint loop's next look (every 0.1 s)
                    await store.enqueue(NewMessage(PRIVATE, sender, sender, "x", 0.0, None))
                    await asyncio.sleep(WAL_LOOK_INTERVAL / 2)
    finally:
        await store.close()
        if mounted:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(directory)], check=True)


WAIT = 30.0  # seconds: a bound on every wait below

# Edges the wire cannot reach: a bad open, the bound on the heads kept as guesses, the
# hop over a pipe (no eventfd), a result handler that fails.

async def test_an_unknown_synchronous_mode_is_refused_before_the_file_is_touched(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    with pytest.raises(StoreError, match="synchronous must be one of"):
        await Store.open(str(path), synchronous="SOMETIMES")
    assert not path.exists()


async def test_streams_stay_numbered_in_order_when_the_kept_heads_are_dropped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five streams written to in turn, with room for the guesses of two: the bound is
    # passed on nearly every commit, alone (_insert_one) and in batches (_insert).
    monkeypatch.setattr(sqlite_store, "_HEADS_KEPT", 2)
    sender = await user(store, "sender")
    streams = [await user(store, f"r{i}") for i in range(5)]
    numbers: dict[int, list[int]] = defaultdict(list)
    for turn in range(6):
        for stream in streams:
            alone = await store.enqueue(NewMessage(PRIVATE, sender, stream, "x", 0.0, None))
            numbers[stream].append(alone.seq)
        # A lone commit drops the guesses once there are two (a batch adds all of its own).
        assert all(len(kept) <= 2 for kept in store._heads.values()), turn
        batch = await asyncio.gather(
            *(store.enqueue(NewMessage(PRIVATE, sender, s, "y", 0.0, None)) for s in streams)
        )
        for stream, stored in zip(streams, batch, strict=True):
            numbers[stream].append(stored.seq)
    assert all(numbers[stream] == list(range(1, 13)) for stream in streams), numbers
    heads = await store.stream_heads(streams, [])  # the stored heads agree
    assert heads.inboxes == {stream: 12 for stream in streams}


async def test_results_come_back_over_a_pipe_where_the_platform_has_no_eventfd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "eventfd")
    opened = await Store.open(str(tmp_path / "db.sqlite3"))
    try:
        handoff = opened._handoff
        assert handoff._read_fd != handoff._write_fd  # the two ends of a pipe
        sender, recipient = await user(opened, "ann"), await user(opened, "bob")
        stored = await asyncio.wait_for(
            asyncio.gather(
                *(
                    opened.enqueue(NewMessage(PRIVATE, sender, recipient, str(i), 0.0, None))
                    for i in range(50)
                )
            ),
            WAIT,
        )
        assert [message.seq for message in stored] == list(range(1, 51))
        history = await opened.inbox_after(recipient, 0, 100)
        assert [message.body for message in history] == [str(i) for i in range(50)]
    finally:
        await opened.close()


async def test_a_failing_result_handler_does_not_hold_back_the_results_after_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(result: Any, exc: BaseException | None) -> None:
        raise RuntimeError("a handler's own fault")

    store._handoff.call_then(broken, lambda: 1)
    after = store._handoff.call(lambda: 2)
    with caplog.at_level(logging.ERROR, logger="chatd.store.sqlite"):
        assert await asyncio.wait_for(after, WAIT) == 2
    assert any(
        "handing on a result of the database thread failed" in record.getMessage()
        and record.exc_info is not None
        for record in caplog.records
    )
    sender = await user(store, "carol")  # and the store goes on working
    stored = await store.enqueue(NewMessage(PRIVATE, sender, sender, "on", 0.0, None))
    assert isinstance(stored, Stored) and stored.seq == 1


class Recording:
    """A real connection, keeping the text of every statement it is given."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.texts: set[str] = set()

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        self.texts.add(sql)
        return self.conn.execute(sql, args)


async def test_batches_of_every_size_use_few_distinct_statements(tmp_path: Path) -> None:
    # SQLite compiles, and the connection caches (128 of them), one program per distinct
    # statement text; a text per batch size held tens of MiB after a long fuzz run.
    path = str(tmp_path / "db.sqlite3")
    store = await Store.open(path)
    users = [await user(store, f"u{i}") for i in range(40)]
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    recording = Recording(conn)
    heads: dict[str, dict[int, int]] = {PRIVATE: {}, "channel": {}}
    newest: dict[int, int] = defaultdict(int)
    for size in range(9, 700, 7):
        batch = [
            NewMessage(PRIVATE, users[0], users[1 + (size * j) % 39], "x", 0.0,
                       f"{size}-{j}" if j % 3 == 0 else None)
            for j in range(size)
        ]
        conn.execute("BEGIN IMMEDIATE")
        stored = sqlite_store._insert_planned(cast(Any, recording), batch, heads)
        conn.execute("COMMIT")
        ids = [s.id for s in stored]
        assert ids == sorted(ids) and len(set(ids)) == size
        for message, result in zip(batch, stored, strict=True):  # each stream, no gap
            assert result.seq == newest[message.target_id] + 1
            newest[message.target_id] = result.seq
    conn.close()
    # Per statement kind (the heads' UPDATE, the INSERT, the client_id look-up), a text
    # per power of two up to 512: 99 batch sizes from 9 to 695 made 209 before.
    assert len(recording.texts) <= 3 * 10, len(recording.texts)
