"""Real faults, no mocks: a server killed with SIGKILL mid-stream, a database locked by
another connection, database writes failing at the operating-system level, and clients
that reset their connection while replies are owed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import shutil
import socket
import sqlite3
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chatd.client import Client
from chatd.codec import encode_frame
from tests.conftest import PASSWORD, MakeHarness, Spawn
from tests.crash_helpers import (
    KILL_AFTER_SECONDS,
    RECIPIENT,
    SENDER,
    check_received,
    connect,
    conversation_ids,
    drain_inbox,
    kill_during_sends,
    read_stderr,
    register,
    terminate,
)


def integrity_check(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        result: str = db.execute("PRAGMA integrity_check").fetchone()[0]
    return result


def copy_database(db: Path, directory: Path) -> Path:
    """A copy of the database file and its write-ahead log (not the shared-memory index)."""
    directory.mkdir()
    for suffix in ("", "-wal"):
        source = Path(f"{db}{suffix}")
        if source.exists():
            shutil.copy(source, directory / f"{db.name}{suffix}")
    return directory / db.name


def stored_bodies(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [body for (body,) in db.execute("SELECT body FROM private_messages ORDER BY id")]


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_sigkill_during_a_stream_of_sends_loses_and_duplicates_nothing(
    spawn: Spawn, tmp_path: Path, synchronous: str
) -> None:
    args = ("--db-synchronous", synchronous) if synchronous != "NORMAL" else ()  # the default
    db = tmp_path / "db.sqlite3"
    server = await spawn(*args)
    stream = await kill_during_sends(server, await server.wait_listening(), KILL_AFTER_SECONDS)
    unknown = stream.unknown
    assert unknown, "the kill found no send in flight"
    sent = set(stream.tasks)

    # The files exactly as the crash left them, checked on a copy (the restart below must
    # do the recovery itself).
    crashed = copy_database(db, tmp_path / "crashed")
    assert integrity_check(crashed) == "ok"
    on_disk = stored_bodies(crashed)

    again = await spawn(*args)
    port = await again.wait_listening()
    log_reader = read_stderr(again)
    try:
        recipient = await connect(port, RECIPIENT)
        sender = await connect(port, SENDER)
        received = await drain_inbox(recipient)
        check_received(stream, received)
        assert set(received) == set(on_disk)
        # The ids the sender was given are the ids stored.
        stored_ids = await conversation_ids(sender, RECIPIENT)
        assert set(stored_ids) == set(received)
        assert {text: stored_ids[text] for text in stream.acked} == stream.acked

        # Resending the unknown outcomes with their client_id: the stored id if it was
        # stored, a new message otherwise; a second resend changes nothing.
        resent: dict[str, int] = {}
        for attempt in range(2):
            for text in unknown:
                params = {"name": RECIPIENT, "msg": text, "client_id": f"c{text[1:]}"}
                reply = await sender.call("/send", params)
                assert reply["code"] == 0, reply
                message_id = reply["data"]["id"]
                if text in stored_ids:
                    assert message_id == stored_ids[text], text
                elif attempt == 0:
                    assert message_id not in stored_ids.values()
                    resent[text] = message_id
                else:
                    assert message_id == resent[text], text
        received += await drain_inbox(recipient)
        assert sorted(received) == sorted(sent), "not every message exactly once"
        assert set(await conversation_ids(sender, RECIPIENT)) == sent
        await recipient.close()
        await sender.close()
        assert await terminate(again, log_reader) == 0, again.stderr.decode()[-3000:]
    finally:
        log_reader.cancel()
    assert integrity_check(db) == "ok"
    assert sorted(stored_bodies(db)) == sorted(sent)


# Another process holding the database's write lock until told to let go, as a backup
# or `chatd admin` would.
LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
db.close()
"""


class Locker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None

    async def lock(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            LOCKER,
            self.path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(20):
            assert await self.proc.stdout.readline() == b"locked\n"

    async def release(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"\n")
            async with asyncio.timeout(20):
                await proc.stdin.drain()
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_database_locked_by_another_process_fails_writes_with_code_9_only(
    make_harness: MakeHarness, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await make_harness(db_busy_timeout=0.2)
    alice = await harness.user("alice")
    bob = await harness.user("bob")
    bob_live = await harness.connect(token=bob.token)
    await bob_live.request("/subscribe")
    await alice.request("/send", {"name": "bob", "msg": "before"})
    await alice.request("/channel/send", {"name": "dev", "message": "c0"})
    assert (await bob_live.next_event(timeout=10))["data"]["msg"] == "before"

    caplog.clear()
    locker = Locker(harness.config.db)
    await locker.lock()
    try:
        # Writes wait db_busy_timeout for the lock, then fail alone with code 9.
        writes: list[tuple[Client, str, dict[str, Any]]] = [
            (alice, "/send", {"name": "bob", "msg": "during", "client_id": "k"}),
            (alice, "/channel/send", {"name": "dev", "message": "c1"}),
            (bob, "/receive", {}),
            (bob, "/ack", {"id": 1}),
        ]
        for client, op, params in writes:
            reply = await client.call(op, params, timeout=10)
            assert (reply["code"], reply["msg"]) == (9, "server error"), (op, reply)
        # With WAL, readers do not need the write lock: reads go on working.
        assert (await alice.call("/ping"))["code"] == 0
        history = await alice.request("/history", {"name": "bob"})
        assert [m["msg"] for m in history["messages"]] == ["before"]
        assert (await alice.request("/user/info", {"name": "bob"}))["name"] == "bob"
        channel = await alice.request("/channel/history", {"name": "dev"})
        assert [m["msg"] for m in channel["messages"]] == ["c0"]
        assert (await alice.request("/channel/list"))["channels"][0]["name"] == "dev"
        assert (await alice.request("/stats"))["connections"] == 3
    finally:
        await locker.release()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    unexpected = [r for r in errors if "unexpected error" in r.getMessage()]
    assert len(unexpected) == len(writes), [r.getMessage() for r in errors]
    for record in errors:
        assert record.exc_info is not None, record.getMessage()  # with its traceback
        assert "database is locked" in str(record.exc_info[1])

    # The lock is gone: the server goes on, and the retry is stored once.
    for text in ("during", "after"):
        params = {"name": "bob", "msg": text, "client_id": text}
        assert (await alice.call("/send", params))["code"] == 0
    await alice.request("/channel/send", {"name": "dev", "message": "c1"})
    live = [(await bob_live.next_event(timeout=10))["data"]["msg"] for _ in range(2)]
    assert live == ["during", "after"]
    # The failed /receive moved nothing and lost nothing.
    assert (await bob.request("/receive"))["messages"] == {"alice": ["before", "during", "after"]}
    channel = await alice.request("/channel/history", {"name": "dev"})
    assert [m["msg"] for m in channel["messages"]] == ["c0", "c1"]
    await bob_live.request("/ping")
    assert not bob_live.waiting_events()
    assert integrity_check(Path(harness.config.db)) == "ok"


async def test_failed_disk_writes_give_code_9_and_the_server_recovers(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Every write to the database file fails (EFBIG), as on a full or broken disk.

    Root ignores file modes, so instead the server's RLIMIT_FSIZE is lowered to zero
    from outside (Python ignores SIGXFSZ, so the write fails instead of killing it).
    """
    server = await spawn()
    port = await server.wait_listening()
    log_reader = read_stderr(server)
    pid = server.proc.pid
    try:
        await register(port, "alice", "bob")
        alice = await connect(port, "alice")
        bob = await connect(port, "bob")
        await alice.request("/send", {"name": "bob", "msg": "before"})
        limits = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, limits[1]))
        try:
            reply = await alice.call("/send", {"name": "bob", "msg": "during", "client_id": "k"})
            assert (reply["code"], reply["msg"]) == (9, "server error")
            reply = await alice.call("/channel/send", {"name": "dev", "message": "c"})
            assert reply["code"] == 9
            assert (await bob.call("/receive"))["code"] == 9
            # Reads need no write: they go on working.
            assert (await alice.call("/ping"))["code"] == 0
            history = await alice.request("/history", {"name": "bob"})
            assert [m["msg"] for m in history["messages"]] == ["before"]
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, limits)
        # The failed send stored nothing, not even its client_id: the retry is new.
        first = await alice.call("/send", {"name": "bob", "msg": "during", "client_id": "k"})
        assert first["code"] == 0
        again = await alice.call("/send", {"name": "bob", "msg": "during", "client_id": "k"})
        assert again["data"]["id"] == first["data"]["id"]
        await alice.request("/send", {"name": "bob", "msg": "after"})
        received = (await bob.request("/receive"))["messages"]
        assert received == {"alice": ["before", "during", "after"]}
        fresh = await connect(port)
        await fresh.request(
            "/register", {"name": "carol", "password": PASSWORD, "password_repete": PASSWORD}
        )
        await fresh.login("carol", PASSWORD)
        for client in (alice, bob, fresh):
            await client.close()
        assert await terminate(server, log_reader) == 0, server.stderr.decode()[-3000:]
    finally:
        log_reader.cancel()
    log = server.stderr.decode()
    assert log.count("unexpected error") == 3, log[-5000:]
    assert "Traceback" in log
    assert integrity_check(tmp_path / "db.sqlite3") == "ok"


async def test_a_client_resetting_with_replies_queued_is_let_go(spawn: Spawn) -> None:
    """A client pipelines many sends, then resets the connection (RST) without reading.

    The server must drop the connection at once: no unhandled exception, the user goes
    offline, and shutdown does not wait for it.
    """
    server = await spawn("--graceful-timeout", "1")  # the default event loop: uvloop
    port = await server.wait_listening()
    log_reader = read_stderr(server)
    try:
        await register(port, "alice", "bob")
        bob = await connect(port, "bob")
        login = encode_frame({"op": "/login", "params": {"name": "alice", "password": PASSWORD}})
        sends = b"".join(
            encode_frame({"op": "/send", "params": {"name": "bob", "msg": f"m{i}"}})
            for i in range(1000)
        )
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(login)
            async with asyncio.timeout(10):
                await reader.readexactly(4)  # logged in
            writer.write(sends)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, while the server still owes 1000 replies
        for _ in range(5):  # and a reset right after a request the server is answering
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(login + encode_frame({"op": "/ping"}) * 3)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        deadline = time.monotonic() + 2
        while (stats := await bob.request("/stats"))["connections"] > 1:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await bob.close()
        started = time.monotonic()
        assert await terminate(server, log_reader) == 0
        shutdown = time.monotonic() - started
    finally:
        log_reader.cancel()
    log = server.stderr.decode()
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert (stats["connections"], stats["users_online"]) == (1, 1), stats
    assert shutdown < 2, "shutdown waited for connections whose peer was gone"


async def stop_reading_with_replies_owed(port: int, name: str) -> asyncio.StreamWriter:
    """Log in as ``name``, then ask for history replies of 200 KB each without reading
    them, until the server is stuck writing to this client (it stops reading us too)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    login = {"op": "/login", "params": {"name": name, "password": PASSWORD}}
    writer.write(encode_frame(login))
    async with asyncio.timeout(10):
        await reader.readexactly(4)  # logged in
    long_text = "x" * 4000
    writer.write(encode_frame({"op": "/send", "params": {"name": name, "msg": long_text}}) * 50)
    history = encode_frame({"op": "/history", "params": {"name": name, "limit": 50}})
    async with asyncio.timeout(30):
        while True:
            writer.write(history * 1000)
            try:
                async with asyncio.timeout(0.5):
                    await writer.drain()
            except TimeoutError:
                return writer  # backpressure: the server is stuck writing to us


async def test_shutdown_resets_a_client_that_stopped_reading(spawn: Spawn) -> None:
    """A client that neither reads its replies nor hangs up does not hold shutdown up
    past graceful_timeout, and ending it is not reported as a crash."""
    server = await spawn("--graceful-timeout", "1")
    port = await server.wait_listening()
    log_reader = read_stderr(server)
    try:
        await register(port, "alice")
        writer = await stop_reading_with_replies_owed(port, "alice")
        started = time.monotonic()
        assert await terminate(server, log_reader) == 0
        shutdown = time.monotonic() - started
        writer.transport.abort()
    finally:
        log_reader.cancel()
    log = server.stderr.decode()
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    assert "closing 1 connections still busy at shutdown" in log, log[-3000:]
    assert "dropped: still busy at shutdown" in log, log[-3000:]
    assert 1 <= shutdown < 5, shutdown
