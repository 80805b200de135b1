"""The database file under a running server and at start-up (issue 11, F4 and two smaller
items): deleted or replaced while serving, missing at start-up, read-only, or already
served by another chatd.  Real servers and real files throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from chatd.client import Client
from chatd.store import DatabaseFileLost
from tests.conftest import PASSWORD, Harness, MakeHarness, Process, Spawn
from tests.crash_helpers import connect, register, terminate
from tests.test_faults import stored_bodies
from tests.test_operations import chatd_command

LOST = DatabaseFileLost.default_message
SAVED = re.compile(rb"saved everything chatd had committed to (\S+)\. ")


async def failed_start(server: Process) -> tuple[int, str]:
    """The exit status and the whole log of a server expected to refuse to start."""
    assert server.proc.stderr is not None
    async with asyncio.timeout(60):
        server.stderr += await server.proc.stderr.read()
        status = await server.proc.wait()
    return status, server.stderr.decode()


def remove_database(db: Path) -> None:
    """What an operator's `rm chatd.sqlite3*` does: the file, its WAL and its index."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


class LogReader:
    """Reads a server's log as it comes (a full pipe must never block the server), and
    wakes those waiting for a line."""

    def __init__(self, server: Process) -> None:
        self.server = server
        self._grew = asyncio.Condition()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.server.proc.stderr is not None
        while chunk := await self.server.proc.stderr.read(65536):
            async with self._grew:
                self.server.stderr += chunk
                self._grew.notify_all()

    async def wait_for(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        async with asyncio.timeout(30), self._grew:
            await self._grew.wait_for(lambda: pattern.search(self.server.stderr) is not None)
        match = pattern.search(self.server.stderr)
        assert match is not None
        return match


class Signal(logging.Handler):
    """Sets an event when a log record's text contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_deleting_the_database_while_serving_acknowledges_nothing_more_and_loses_nothing(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "db.sqlite3"
    server = await spawn()
    port = await server.wait_listening()
    log = LogReader(server)
    log_reader = log.task
    try:
        await register(port, "alice", "bob")
        alice, bob = await connect(port, "alice"), await connect(port, "bob")
        acked = [f"m{i}" for i in range(10)]
        for text in acked:
            assert (await alice.call("/send", {"name": "bob", "msg": text}))["code"] == 0

        await asyncio.to_thread(remove_database, db)
        # Sent together: they share group commits, the first of them into the deleted file.
        replies = await asyncio.gather(
            *(alice.call("/send", {"name": "bob", "msg": f"late{i}"}) for i in range(20))
        )
        assert {(r["code"], r["msg"]) for r in replies} == {(9, LOST)}
        assert (await alice.call("/channel/send", {"name": "dev", "message": "x"}))["code"] == 9
        assert (await bob.call("/receive"))["code"] == 9
        assert (await bob.call("/ack", {"id": 1}))["code"] == 9
        newcomer = await connect(port)
        params = {"name": "carol", "password": PASSWORD, "password_repete": PASSWORD}
        assert (await newcomer.call("/register", params))["code"] == 9
        # Reads still work, from the file chatd still has open.
        assert (await alice.call("/ping"))["code"] == 0
        history = await alice.request("/history", {"name": "bob", "limit": 100})
        assert [m["msg"] for m in history["messages"]][:10] == acked

        rescued = Path((await log.wait_for(SAVED))[1].decode())
        for client in (alice, bob, newcomer):
            await client.close()
        assert await terminate(server, log_reader) == 0
    finally:
        log_reader.cancel()
    text = server.stderr.decode()
    assert text.count("DATABASE FILE LOST") == 1, text
    assert f"{db} was deleted while chatd was using it" in text

    # No new, empty database in its place: the start is refused and says what to do.
    status, text = await failed_start(await spawn())
    assert status == 1
    assert f"database {db} is missing" in text and "chatd init" in text and str(rescued) in text
    assert text.count("\n") == 1, text
    assert not await asyncio.to_thread(db.exists)

    # The copy saved when the file was lost holds every acknowledged message: restore it.
    assert (await asyncio.to_thread(stored_bodies, rescued))[:10] == acked
    await asyncio.to_thread(shutil.move, rescued, db)
    again = await spawn()
    bob = await connect(await again.wait_listening(), "bob")
    received = (await bob.request("/receive"))["messages"]["alice"]
    assert received[:10] == acked
    await bob.close()
    assert await again.stop() == 0


async def test_a_deletion_is_noticed_by_the_checkpoint_when_nothing_is_written(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await make_harness(db_checkpoint_interval=0.05)
    alice = await harness.user("alice")
    await alice.request("/send", {"name": "alice", "msg": "hello"})
    saved = Signal("saved everything")
    logging.getLogger("chatd.store").addHandler(saved)
    try:
        await asyncio.to_thread(remove_database, Path(harness.config.db))
        async with asyncio.timeout(30):
            await saved.seen.wait()
    finally:
        logging.getLogger("chatd.store").removeHandler(saved)
    lost = [r for r in caplog.records if "DATABASE FILE LOST" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelname == "ERROR"
    assert (await alice.call("/send", {"name": "alice", "msg": "again"}))["msg"] == LOST


async def test_a_database_replaced_under_the_server_refuses_writes(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    harness = await make_harness()
    alice = await harness.user("alice")
    await alice.request("/send", {"name": "alice", "msg": "kept"})
    db = Path(harness.config.db)
    other = tmp_path / "other.sqlite3"
    await asyncio.to_thread(_create_empty_database, other)
    await asyncio.to_thread(os.replace, other, db)  # a restore done while chatd runs

    reply = await alice.call("/send", {"name": "alice", "msg": "lost?"})
    assert (reply["code"], reply["msg"]) == (9, LOST)
    await harness.stop()  # waits for the copy of the file that was replaced
    # The file put in place is left alone (once chatd has let go of the old file's WAL).
    assert await asyncio.to_thread(_tables, db) == ["t"]
    (rescued,) = await asyncio.to_thread(lambda: list(tmp_path.glob(f"{db.name}.rescued-*")))
    assert (await asyncio.to_thread(stored_bodies, rescued))[0] == "kept"


def _create_empty_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as other:
        other.execute("CREATE TABLE t (x)")
        other.commit()


def _tables(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [name for (name,) in db.execute("SELECT name FROM sqlite_master")]


async def test_chatd_init_is_the_only_way_to_start_over_where_a_database_existed(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "db.sqlite3"
    lock = Path(f"{db}.lock")
    first = await spawn()
    await register(await first.wait_listening(), "alice")
    assert await first.stop() == 0
    # A database made before the lock file existed (an older chatd) is served as it is.
    await asyncio.to_thread(lock.unlink)
    upgraded = await spawn()
    await upgraded.wait_listening()
    assert "created=" in await asyncio.to_thread(lock.read_text)
    status, _, err = await chatd_command("init", "--db", str(db))
    assert status == 1 and f"another chatd is serving {db}" in err
    assert await upgraded.stop() == 0

    status, _, err = await chatd_command("init", "--db", str(db))
    assert status == 1 and f"{db} exists" in err
    await asyncio.to_thread(remove_database, db)
    status, log = await failed_start(await spawn())
    assert status == 1 and f"database {db} is missing" in log

    status, out, _ = await chatd_command("init", "--db", str(db))
    assert status == 0 and f"created a new, empty database at {db}" in out
    fresh = await spawn()
    client = await Client.connect("127.0.0.1", await fresh.wait_listening(), timeout=10)
    assert (await client.call("/login", {"name": "alice", "password": PASSWORD}))["code"] == 3
    await client.close()
    assert await fresh.stop() == 0


async def test_a_second_server_on_the_same_database_is_refused_while_admin_and_backup_work(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "db.sqlite3"
    first = await spawn()
    port = await first.wait_listening()
    await register(port, "alice")

    status, log = await failed_start(await spawn())
    assert status == 1
    assert f"another chatd is serving {db} (pid {first.proc.pid})" in log
    assert log.count("\n") == 1, log

    # Operators' commands do not take the server's lock.
    status, out, _ = await chatd_command("admin", "users", "--db", str(db))
    assert status == 0 and "alice" in out
    status, out, _ = await chatd_command("backup", str(tmp_path / "copy.sqlite3"), "--db", str(db))
    assert status == 0 and "backed up" in out
    alice = await connect(port, "alice")  # the first server went on serving
    await alice.close()
    assert await first.stop() == 0

    # The lock goes with the server that held it.
    after = await spawn()
    await after.wait_listening()
    assert await after.stop() == 0


async def test_two_servers_in_one_process_cannot_share_a_database(harness: Harness) -> None:
    from chatd.server import Server
    from chatd.store import StoreError

    with pytest.raises(StoreError, match="another chatd is serving"):
        await Server(harness.config).start()
    assert (await (await harness.user()).call("/ping"))["code"] == 0


async def test_a_read_only_database_file_is_refused_at_start(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "db.sqlite3"
    first = await spawn()
    await first.wait_listening()
    assert await first.stop() == 0
    # Root writes through file modes: an immutable file is read-only even to root.
    as_root = os.geteuid() == 0
    try:
        if as_root:
            if await chattr("+i", db):
                pytest.skip("running as root, and chattr +i is not available here")
        else:
            db.chmod(0o444)
        status, text = await failed_start(await spawn())
    finally:
        if as_root:
            await chattr("-i", db)
    assert status == 1
    assert f"database {db} is read-only" in text and "permissions" in text
    assert text.count("\n") == 1, text


async def chattr(flags: str, path: Path) -> int:
    proc = await asyncio.create_subprocess_exec(
        "chattr", flags, str(path), stderr=asyncio.subprocess.DEVNULL
    )
    async with asyncio.timeout(30):
        return await proc.wait()
