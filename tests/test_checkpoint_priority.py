"""Background checkpoints on two connections: PASSIVE ones on a thread of low priority,
RESTART ones at the normal priority, which first interrupt a PASSIVE one under way.

Real database files and the store's own threads; no server. The WAL is made large with
a plain sqlite3 connection (no checkpoint of its own), so that a PASSIVE checkpoint
copies for a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import aiosqlite
import pytest

from chatd import trace
from chatd.store import PRIVATE, NewMessage
from chatd.store.sqlite import PASSIVE_NICE, Store

MIB = 1024 * 1024
BIG_WAL = 64 * MIB  # a PASSIVE checkpoint of it copies for hundreds of milliseconds
WAIT = 30.0  # seconds: a bound on every wait
LINUX = sys.platform.startswith("linux")


def fill_wal(path: str, size: int) -> None:
    """Append about ``size`` bytes of new pages to the WAL, committed, not checkpointed."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE filler(data BLOB)")
        conn.execute("BEGIN")
        # Two rows a 1 KiB page: a table of new pages, which a checkpoint copies last.
        conn.executemany("INSERT INTO filler VALUES (randomblob(400))", [()] * (size // 512))
        conn.execute("COMMIT")


async def size_of(path: str) -> int:
    return await asyncio.to_thread(os.path.getsize, path)


async def copying_started(path: str, before: int) -> None:
    """Wait until a checkpoint is copying: the database file grows past ``before``
    (the WAL holds new pages only, so it grows from the copy's start)."""
    async with asyncio.timeout(WAIT):
        while await size_of(path) <= before:  # noqa: ASYNC110 (a file, no event to wait on)
            await asyncio.sleep(0.001)


def interruptions(caplog: pytest.LogCaptureFixture) -> int:
    return sum("interrupted for a RESTART" in r.getMessage() for r in caplog.records)


async def thread_id(connection: aiosqlite.Connection) -> int:
    """The native id of the thread that runs the connection's statements, as that very
    thread tells it (not as the store finds it)."""
    await connection.create_function("native_thread_id", 0, threading.get_native_id)
    rows = list(await connection.execute_fetchall("SELECT native_thread_id()"))
    return int(rows[0][0])


async def user(store: Store, name: str) -> int:
    await store.create_user(name, name, (name, name.upper()), "hash", time.time())
    found = await store.find_user(name)
    assert found is not None
    return found.id


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "db.sqlite3")


@pytest.fixture
async def store(path: str) -> AsyncIterator[Store]:
    opened = await Store.open(path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.skipif(not LINUX, reason="a nice value of its own for each thread is Linux's")
async def test_passive_checkpoints_run_at_a_lower_priority_than_the_loop_and_restarts(
    store: Store, path: str
) -> None:
    loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if loop_nice >= 19:
        pytest.skip("the tests run at the lowest priority already")
    await store.checkpoint_in_background(path, 3600)
    assert store._passive is not None and store._restarter is not None
    passive = os.getpriority(os.PRIO_PROCESS, await thread_id(store._passive))
    restart = os.getpriority(os.PRIO_PROCESS, await thread_id(store._restarter))
    assert passive == min(19, loop_nice + PASSIVE_NICE)
    assert restart == loop_nice
    # The loop's own priority is untouched (setpriority with the process id would have
    # changed the main thread's alone, had the store gone that way).
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_nice


async def test_elsewhere_than_linux_no_priority_is_changed(
    store: Store, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans: list[tuple[str, int, int, int]] = []
    monkeypatch.setattr(trace, "ON", True)
    monkeypatch.setattr(trace, "_spans", spans)
    with monkeypatch.context() as elsewhere:
        elsewhere.setattr(sys, "platform", "darwin")
        await store.checkpoint_in_background(path, 3600)
    assert store._passive is not None
    if LINUX:
        passive = os.getpriority(os.PRIO_PROCESS, await thread_id(store._passive))
        assert passive == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    sender = await user(store, "alice")
    await store.enqueue(NewMessage(PRIVATE, sender, sender, "x", 0.0, None))
    await store._checkpoint()  # PASSIVE checkpoints work all the same
    copied = [n for what, _, _, n in spans if what == "checkpoint_PASSIVE"]
    assert copied and copied[0] > 0, spans


async def test_sqlite_stops_a_passive_checkpoint_interrupted_while_it_copies(
    path: str,
) -> None:
    """What the RESTART checkpoints rely on: sqlite3_interrupt stops a checkpoint
    between two pages copied (not in its fsyncs; the WAL is synced at its commit here)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as keeper:  # keeps the WAL
        keeper.execute("PRAGMA page_size=1024")
        keeper.execute("PRAGMA journal_mode=WAL")
        # A read leaves it a shared lock on the file: the filling connection is not the
        # last one, which would checkpoint the whole WAL as it closes.
        keeper.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        await asyncio.to_thread(fill_wal, path, BIG_WAL)
        before = await size_of(path)
        checkpointer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        with closing(checkpointer):

            def checkpoint() -> BaseException | None:
                try:
                    checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    return exc
                return None

            running = asyncio.ensure_future(asyncio.to_thread(checkpoint))
            await copying_started(path, before)
            checkpointer.interrupt()
            interrupted = time.perf_counter()
            async with asyncio.timeout(WAIT):
                outcome = await running
            returned_after = time.perf_counter() - interrupted
            stopped_at = await size_of(path)
            assert isinstance(outcome, sqlite3.OperationalError), outcome
            assert outcome.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT
            # Stopped part of the way: a checkpoint to the end copies much more.
            checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            copied_whole = await size_of(path) - before
            assert stopped_at - before < copied_whole * 0.9, (stopped_at, copied_whole)
            # Promptly: measured at 0.2-0.6 ms; a generous bound for a loaded machine.
            assert returned_after < 0.25, returned_after


async def test_a_restart_wanted_while_a_long_passive_checkpoint_runs_interrupts_it(
    store: Store, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The WAL far over its limit: the checkpoint loop's PASSIVE checkpoint copies the
    bulk, and the next write (or the loop) wants a RESTART one at once: it interrupts
    the PASSIVE one instead of finding it busy, and the write after it rewinds the WAL."""
    caplog.set_level(logging.DEBUG, logger="chatd.store.sqlite")
    sender = await user(store, "alice")
    await asyncio.to_thread(fill_wal, path, BIG_WAL)
    before = await size_of(path)
    limit = 8 * MIB  # the WAL is 8 times over: past the 1.5 times of the write path
    await store.checkpoint_in_background(path, 3600, wal_limit=limit)
    await copying_started(path, before)  # the loop's rewind, PASSIVE first
    async with asyncio.timeout(WAIT):
        await store.enqueue(NewMessage(PRIVATE, sender, sender, "through", 0.0, None))
    assert interruptions(caplog) >= 1
    assert not [r for r in caplog.records if "RESTART checkpoint gave way" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # The write found the WAL checkpointed to its end (RESTART), so it started it over,
    # and truncated the file to journal_size_limit (the limit).
    assert await size_of(path + "-wal") <= limit


async def test_closing_the_store_interrupts_a_long_passive_checkpoint(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="chatd.store.sqlite")
    store = await Store.open(path)  # closed by the test itself
    try:
        await asyncio.to_thread(fill_wal, path, BIG_WAL)
        before = await size_of(path)
        await store.checkpoint_in_background(path, 3600, wal_limit=4 * BIG_WAL)  # no rewind
        passive = asyncio.create_task(store._checkpoint())
        await copying_started(path, before)
    finally:
        async with asyncio.timeout(WAIT):
            await store.close()
    await passive
    assert interruptions(caplog) == 1
    assert store._passive is not None and store._restarter is not None
    for connection in (store._passive, store._restarter):
        with pytest.raises(ValueError):
            await connection.execute("SELECT 1")  # closed


async def test_under_a_steady_write_load_the_wal_stays_bounded_on_two_connections(
    store: Store, path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store-level: every commit's WAL looked at. Both kinds of checkpoint run, each on
    its own connection, and no RESTART one ever finds a PASSIVE one in its way."""
    caplog.set_level(logging.DEBUG, logger="chatd.store.sqlite")
    spans: list[tuple[str, int, int, int]] = []
    monkeypatch.setattr(trace, "ON", True)
    monkeypatch.setattr(trace, "_spans", spans)
    limit = 256 * 1024
    sender = await user(store, "alice")
    await store.checkpoint_in_background(path, 0.02, wal_limit=limit)
    largest = 0
    text = "x" * 300
    async with asyncio.timeout(120):
        for turn in range(300):
            await asyncio.gather(
                *(
                    store.enqueue(NewMessage(PRIVATE, sender, sender, f"{turn} {text}", 0.0, None))
                    for _ in range(20)
                )
            )
            largest = max(largest, store._wal_end())
    kinds = {what for what, *_ in spans}
    assert "checkpoint_RESTART" in kinds, kinds
    # At this small limit a PASSIVE one (low priority, beside a busy loop) is often
    # interrupted: the WAL passes 1.25 times the limit before it is done.
    assert kinds & {"checkpoint_PASSIVE", "checkpoint_PASSIVE_interrupted"}, kinds
    assert 0 < largest <= 2 * limit, largest
    assert not [r for r in caplog.records if "RESTART checkpoint gave way" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
