"""The WAL stays bounded under a write flood, and a full disk costs no acked message.

The disk tests mount a small tmpfs, so they need root; elsewhere they are skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.client import Client
from chatd.config import Config
from chatd.metrics import PrometheusMetrics
from tests.conftest import PASSWORD, TEST_SETTINGS, Harness, MakeHarness

KIB = 1024
MIB = 1024 * KIB
WAIT = 30.0  # seconds: a bound on every wait for the server


def wal_size(db: str) -> int:
    try:
        return os.path.getsize(db + "-wal")
    except FileNotFoundError:
        return 0


# The WAL under a flood of every write op.

WAL_LIMIT = 4 * MIB
# protocol.md/README ("Disk use"): the WAL file stays under twice db_wal_limit. Past the
# limit it is started over (looked at every 0.1 s); past 1.25 times it during a checkpoint,
# writes wait. The same flood grew the WAL to 34.5 MiB before the bound existed.
WAL_BOUND = 2 * WAL_LIMIT
FLOOD_CYCLES = 1500  # per lane


async def flood(client: Client, partner: str, lane: int, cycles: int) -> None:
    """Every write op in turn, as in the bench `wal` scenario; each must succeed."""
    for turn in range(cycles):
        own = f"lane{lane}-{turn % 8}"
        for op, params in (
            ("/send", {"name": partner, "msg": f"{lane} {turn}"}),
            ("/channel/send", {"name": "shared", "message": f"{lane} {turn}"}),
            ("/channel/join", {"name": own}),
            ("/channel/leave", {"name": own}),
            ("/ack", {"id": 1 << 62}),
            ("/receive", {}),
        ):
            reply = await client.call(op, params, timeout=WAIT)
            assert reply["code"] == 0, (op, reply)


async def test_the_wal_stays_bounded_under_a_flood_of_every_write_op(
    make_harness: MakeHarness,
) -> None:
    harness = await make_harness(db_checkpoint_interval=0.05, db_wal_limit=WAL_LIMIT)
    db = harness.config.db
    alice, bob = await harness.user("alice"), await harness.user("bob")
    largest = 0
    flooding = True

    async def watch() -> None:
        nonlocal largest
        while flooding:
            largest = max(largest, await asyncio.to_thread(wal_size, db))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    lanes = [flood(alice, "bob", lane, FLOOD_CYCLES) for lane in range(4)]
    lanes += [flood(bob, "alice", lane, FLOOD_CYCLES) for lane in range(4, 8)]
    try:
        async with asyncio.timeout(600):
            await asyncio.gather(*lanes)
    finally:
        flooding = False
        await watcher
    assert 0 < largest <= WAL_BOUND, f"the WAL reached {largest / MIB:.1f} MiB"
    # Every message is there: 2 users x 4 lanes x FLOOD_CYCLES of each kind.
    stats = await alice.request("/stats")
    assert stats["messages_stored"] == 2 * 2 * 4 * FLOOD_CYCLES
    assert stats["disk_full"] is False


async def test_a_rewound_wal_file_is_truncated_back_to_the_limit(
    make_harness: MakeHarness,
) -> None:
    limit = 128 * KIB
    harness = await make_harness(db_checkpoint_interval=0.05, db_wal_limit=limit)
    db = harness.config.db
    alice, _ = await harness.user("alice"), await harness.user("bob")
    text = "x" * 4000
    # 2 MiB of messages at once: the WAL file grows past the limit.
    sends = asyncio.gather(
        *(alice.request("/send", {"name": "bob", "msg": f"{i}{text}"}) for i in range(500))
    )
    largest = 0
    while not sends.done():
        largest = max(largest, await asyncio.to_thread(wal_size, db))
        await asyncio.sleep(0.001)
    await sends
    assert largest > limit
    # Once checkpointed, the next write rewinds the WAL and cuts the file back to the limit.
    async with asyncio.timeout(WAIT):
        while await asyncio.to_thread(wal_size, db) > limit:
            await alice.request("/send", {"name": "bob", "msg": "tick"})
            await asyncio.sleep(0.02)


# A full disk.


@dataclasses.dataclass
class SmallDisk:
    """A tmpfs of a few MiB, and a filler file that takes whatever space is left."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / "filler"

    def fill(self) -> None:
        """Write to the filler until the filesystem is full, to the last block."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            for chunk in (64 * KIB, 4 * KIB, 512):
                try:
                    while os.write(fd, b"\0" * chunk):
                        pass
                except OSError:
                    pass  # this size no longer fits: try a smaller one
        finally:
            os.close(fd)

    def free(self, size: int) -> None:
        os.truncate(self.filler, max(0, os.path.getsize(self.filler) - size))

    def free_space(self) -> int:
        disk = os.statvfs(self.path)
        return disk.f_bavail * disk.f_frsize


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
async def on_small_disk(small_disk: SmallDisk) -> AsyncIterator[Harness]:
    """A server whose database is on the small disk (stopped before it is unmounted)."""
    config = Config(
        host="127.0.0.1",
        port=0,
        db=str(small_disk.path / "chatd.sqlite3"),
        db_checkpoint_interval=0.05,
        **TEST_SETTINGS,
    )
    harness = Harness(config)
    await harness.start()
    yield harness
    await harness.stop()


class Reader:
    """Another process's long read (a backup, say): the WAL cannot be checkpointed past it."""

    def __init__(self, db: str) -> None:
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)

    async def hold(self) -> None:
        def begin() -> None:
            self._db.execute("BEGIN")
            self._db.execute("SELECT COUNT(*) FROM users").fetchall()

        await asyncio.to_thread(begin)

    async def release(self) -> None:
        await asyncio.to_thread(self._db.close)


async def history(client: Client, other: str) -> dict[int, str]:
    """Every message of the conversation, by id."""
    found: dict[int, str] = {}
    before: int | None = None
    while True:
        params: dict[str, Any] = {"name": other, "limit": 200}
        if before is not None:
            params["before"] = before
        page = await client.request("/history", params)
        found.update({m["id"]: m["msg"] for m in page["messages"]})
        if not page["more"]:
            return found
        before = page["messages"][0]["id"]


BOB = {"name": "bob", "password": PASSWORD}


def disk_lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def test_a_full_disk_refuses_writes_then_recovers_as_soon_as_space_is_freed(
    on_small_disk: Harness, small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: a WAL holding more than the space freed afterwards.

    Before the fix, the background checkpoint grew the database file into the freed
    space (moving the WAL there) and failed again, so the writes still failed.
    """
    caplog.set_level(logging.INFO, logger="chatd")
    harness = on_small_disk
    db = harness.config.db
    alice, bob = await harness.user("alice"), await harness.user("bob")
    acked: dict[int, str] = {}
    body = "m" * 3000

    async def send(n: int) -> dict[str, Any]:
        reply = await alice.call("/send", {"name": "bob", "msg": f"{n} {body}"}, timeout=WAIT)
        if reply["code"] == 0:
            acked[reply["data"]["id"]] = f"{n} {body}"
        return reply

    # A WAL of 3 MiB that no checkpoint can move while a reader holds its start.
    reader = Reader(db)
    await reader.hold()
    sent = 0
    while await asyncio.to_thread(wal_size, db) < 3 * MIB:
        replies = await asyncio.gather(*(send(n) for n in range(sent, sent + 50)))
        assert all(r["code"] == 0 for r in replies)
        sent += 50
    await asyncio.to_thread(small_disk.fill)
    # What room the WAL file had left is soon used up, by the smallest write there is (a
    # login's token: two 1 KiB pages): were it a send, a login could still fit after it.
    async with asyncio.timeout(WAIT):
        while (await (await harness.connect()).call("/login", BOB))["code"] == 0:
            pass
    await reader.release()
    for n in range(sent, sent + 20):  # every write fails alike, and says why
        reply = await send(n)
        assert (reply["code"], reply["msg"]) == (9, "server is out of disk space"), reply
    sent += 20
    fresh = await harness.connect()
    login = await fresh.call("/login", BOB)
    assert (login["code"], login["msg"]) == (9, "server is out of disk space")
    # Reads go on working.
    assert (await alice.request("/stats"))["disk_full"] is True
    assert set(await history(bob, "alice")) == set(acked)
    assert disk_lines(caplog, "disk full: writes fail") == 1  # once, not per request

    # 1 MiB freed: less than the WAL a checkpoint would move into the database file.
    await asyncio.to_thread(small_disk.free, MIB)
    # Time for a checkpoint (every 0.05 s) to take the space, if it were to try.
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(small_disk.free_space) >= MIB // 2
    for n in range(sent, sent + 20):
        reply = await send(n)
        assert reply["code"] == 0, reply
    sent += 20
    await (await harness.connect()).login("bob", PASSWORD)
    assert (await alice.request("/stats"))["disk_full"] is False
    assert disk_lines(caplog, "disk space available again") == 1
    assert disk_lines(caplog, "disk full: writes fail") == 1

    # All the space back: the checkpoint moves the WAL into the database file at last.
    await asyncio.to_thread(small_disk.filler.unlink)
    async with asyncio.timeout(WAIT):
        while not disk_lines(caplog, "background checkpoints resumed"):
            await alice.request("/send", {"name": "bob", "msg": "tick"})
            await asyncio.sleep(0.05)
    stored = await history(bob, "alice")
    assert {i: stored[i] for i in acked} == acked  # every acknowledged send, intact

    await harness.restart()
    bob = await harness.connect()
    await bob.login("bob", PASSWORD)
    stored = await history(bob, "alice")
    assert {i: stored[i] for i in acked} == acked
    assert len(acked) > 500


async def test_a_failed_group_commit_is_rolled_back_and_leaves_nothing_behind(
    on_small_disk: Harness, small_disk: SmallDisk
) -> None:
    """A group commit bigger than SQLite's page cache fails mid-way (not at COMMIT).

    SQLite then rolls the transaction back itself; every sender must still be told
    why, and the next writes must find no transaction left open.
    """
    harness = on_small_disk
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await asyncio.to_thread(small_disk.fill)
    big = "x" * 4000
    acked: set[str] = set()
    async with asyncio.timeout(WAIT):  # use up what room the WAL had left
        for n in itertools.count():
            reply = await alice.call("/send", {"name": "bob", "msg": f"{n} {big}"})
            if reply["code"]:
                break
            acked.add(f"{n} {big}")
    # 3 MiB in one batch: more than the 2 MiB page cache, so pages spill to the WAL early.
    texts = [f"batch {n} {big}" for n in range(750)]
    replies = await asyncio.gather(
        *(alice.call("/send", {"name": "bob", "msg": text}, timeout=WAIT) for text in texts)
    )
    assert {(r["code"], r["msg"]) for r in replies} == {(9, "server is out of disk space")}
    await asyncio.to_thread(small_disk.filler.unlink)
    assert set((await history(bob, "alice")).values()) == acked  # none of the batch
    replies = await asyncio.gather(
        *(alice.call("/send", {"name": "bob", "msg": text}, timeout=WAIT) for text in texts)
    )
    assert {r["code"] for r in replies} == {0}
    assert set((await history(bob, "alice")).values()) == acked | set(texts)
    assert (await alice.request("/stats"))["disk_full"] is False


def test_the_disk_full_gauge_reads_the_store() -> None:
    metrics = PrometheusMetrics(known_ops=("/send",))
    full = [False]
    metrics.watch_disk(lambda: full[0])
    assert metrics.registry.get_sample_value("chatd_disk_full") == 0.0
    full[0] = True
    assert metrics.registry.get_sample_value("chatd_disk_full") == 1.0
