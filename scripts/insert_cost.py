"""What the SQLite store's commit function costs per batch size (docs/benchmarks.md).

Times chatd.store.sqlite's two ways of inserting a batch of private messages without
client_ids, each inside its own BEGIN IMMEDIATE ... COMMIT on a real database file
(WAL, ``synchronous=NORMAL``, as chatd runs; checkpoints every 500 commits, outside
the figures' concern):

- ``one``: ``_insert_one`` per message (the head's compare-and-set, then the INSERT);
- ``planned``: ``_insert_planned`` (the heads moved by one UPDATE ... RETURNING, then
  one multi-row INSERT);
- ``store`` (``--through-store``, one message a commit): through ``Store.enqueue``, as
  the server sends, so that what the store adds around the transaction shows.

Prints wall time and this process's CPU per commit, for each size, alternated, in
several rounds. Run it pinned, on a quiet machine:

    taskset -c 1 python scripts/insert_cost.py --sizes 1 2 3 8 16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from chatd.store import Store
from chatd.store import sqlite as store_sqlite
from chatd.store.rows import CHANNEL, PRIVATE, NewMessage

RECIPIENTS = 30
BODY = "12345 1234567890123456789"  # the paced load's text: a seq and a timestamp


async def make_database(path: str) -> None:
    """A chatd database with a sender and RECIPIENTS users to write to."""
    store = await Store.open(path)
    for i in range(RECIPIENTS + 1):
        await store.create_user(f"u{i}", f"u{i}", (f"u{i}", f"U{i}"), "-", 0.0)
    await store.close()


def commit_cost(path: str, size: int, way: str, commits: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per commit of ``size`` messages inserted ``way``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    cursor = conn.cursor()
    heads: dict[str, dict[int, int]] = {PRIVATE: {}, CHANNEL: {}}
    wall, cpu = time.perf_counter(), time.process_time()
    for k in range(commits):
        batch = [
            NewMessage(PRIVATE, 1, 2 + (k * size + j) % RECIPIENTS, BODY, 1.0, None)
            for j in range(size)
        ]
        cursor.execute("BEGIN IMMEDIATE")
        if way == "one":
            for message in batch:
                store_sqlite._insert_one(cursor, message, heads[PRIVATE])
        else:
            store_sqlite._insert_planned(conn, batch, heads)
        cursor.execute("COMMIT")
        if k % 500 == 499:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    conn.close()
    return wall / commits * 1e6, cpu / commits * 1e6


def store_cost(path: str, commits: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per lone message sent through the store as the server
    sends it (``Store.enqueue``, awaited, on uvloop where installed): the transaction of
    ``one`` plus the hand-over to the database thread, the wake-up back and the checks
    after the commit. CPU of both threads."""

    async def send_all() -> tuple[float, float]:
        store = await Store.open(path)
        try:
            for k in range(200):  # warm-up: the statements compiled, the heads known
                await store.enqueue(NewMessage(PRIVATE, 1, 2 + k % RECIPIENTS, BODY, 1.0, None))
            wall, cpu = time.perf_counter(), time.process_time()
            for k in range(commits):
                await store.enqueue(NewMessage(PRIVATE, 1, 2 + k % RECIPIENTS, BODY, 1.0, None))
            return time.perf_counter() - wall, time.process_time() - cpu
        finally:
            await store.close()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - chatd's default install has it
        wall, cpu = asyncio.run(send_all())
    else:
        wall, cpu = uvloop.run(send_all())
    return wall / commits * 1e6, cpu / commits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--commits", type=int, default=4000)
    parser.add_argument("--through-store", action="store_true",
                        help="also a lone message through Store.enqueue (store_cost)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = str(Path(workdir) / "cost.sqlite3")
        asyncio.run(make_database(path))
        for round_ in range(args.rounds):
            ways = ("one", "planned") if round_ % 2 == 0 else ("planned", "one")
            for size in args.sizes:
                for way in ways:
                    wall, cpu = commit_cost(path, size, way, args.commits)
                    print(f"round {round_ + 1} size {size:3d} {way:8s}"
                          f" {wall:7.1f} us wall {cpu:7.1f} us CPU per commit")
            if args.through_store:
                wall, cpu = store_cost(path, args.commits)
                print(f"round {round_ + 1} size   1 store   "
                      f" {wall:7.1f} us wall {cpu:7.1f} us CPU per commit")


if __name__ == "__main__":
    main()
