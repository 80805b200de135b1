"""What one position check of a node costs (chatd.cluster, README "Running several nodes").

Builds a PostgreSQL database with ``--inboxes`` users and ``--channels`` channels, one
message in each stream, and follows every stream at its newest message (a node whose
sessions are all up to date: the common case).  Then times a check, alternating:

- ``per-stream``: every followed stream read past its position (one query each, the
  check before MessageStore.stream_heads);
- ``heads``: one statement for every stream's newest seq, then only the streams behind.

Prints wall time, this process's CPU and the PostgreSQL backends' CPU per check.
Usage: python scripts/position_check_cost.py [--db postgresql://...] [--runs 4]
The database named by ``--db`` is created and dropped (default: a random name on
127.0.0.1:5432).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from chatd.bus_redis import StreamOrder, channel_stream, inbox_stream
from chatd.cluster import StoreLog
from chatd.config import Config
from chatd.model import StreamEvent
from chatd.store import CHANNEL, PRIVATE, MessageStore, NewMessage, open_store
from chatd.validation import name_skeletons

TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pids: list[int]) -> float:
    """Seconds of CPU (user + system) the given processes have used."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


async def populate(store: MessageStore, inboxes: int, channels: int) -> list[str]:
    """Users and channels with one message each; the streams' names."""
    streams = []
    for n in range(inboxes):
        name = f"u{n}"
        await store.create_user(name, name, name_skeletons(name), "x", time.time())
    first = await store.find_user("u0")
    assert first is not None
    for n in range(channels):
        channel, _ = await store.join_channel(
            f"c{n}", f"c{n}", name_skeletons(f"c{n}"), first.id, time.time()
        )
        await store.enqueue(NewMessage(CHANNEL, first.id, channel.id, "hi", time.time(), None))
        streams.append(channel_stream(channel.id))
    for n in range(inboxes):
        user = await store.find_user(f"u{n}")
        assert user is not None
        await store.enqueue(NewMessage(PRIVATE, first.id, user.id, "hi", time.time(), None))
        streams.append(inbox_stream(user.id))
    return streams


async def follow_at_heads(store: MessageStore, streams: list[str]) -> StreamOrder[StreamEvent]:
    order: StreamOrder[StreamEvent] = StreamOrder(StoreLog(store), lambda s, e: None)
    for stream in streams:
        order.follow(stream, 0, 0)
    order.check_positions()  # reads each stream once: everything is now pushed
    await order.idle()
    return order


async def check_per_stream(store: MessageStore, order: StreamOrder[StreamEvent]) -> None:
    order.check_positions()
    await order.idle()


async def check_with_heads(store: MessageStore, order: StreamOrder[StreamEvent]) -> None:
    # What chatd.cluster.ClusterBus.check_positions does.
    users: list[int] = []
    channels: list[int] = []
    for stream in order.streams:
        kind, _, key = stream.partition(":")
        (users if kind == "u" else channels).append(int(key))
    heads = await store.stream_heads(users, channels)
    newest = {inbox_stream(u): s for u, s in heads.inboxes.items()}
    newest.update((channel_stream(c), s) for c, s in heads.channels.items())
    order.check_positions(newest)
    await order.idle()


async def measure(
    name: str, check: Callable[[MessageStore, StreamOrder[StreamEvent]], Awaitable[None]],
    store: MessageStore, order: StreamOrder[StreamEvent], admin: asyncpg.Connection,
    database: str,
) -> None:
    pids = [r["pid"] for r in await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1", database)]
    reads = order.counts.repaired
    wall, cpu, pg = time.perf_counter(), time.process_time(), backend_cpu(pids)
    await check(store, order)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pg = backend_cpu(pids) - pg
    print(f"{name:>10}: {wall * 1000:8.1f} ms wall, chatd CPU {cpu * 1000:7.1f} ms,"
          f" PostgreSQL CPU {pg * 1000:6.0f} ms, messages read {order.counts.repaired - reads}",
          flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--inboxes", type=int, default=4000)
    parser.add_argument("--channels", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    database = f"chatd_poscheck_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.server)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = urlunsplit(urlsplit(args.server)._replace(path=f"/{database}"))
    try:
        store = await open_store(url, Config(db=url))
        try:
            streams = await populate(store, args.inboxes, args.channels)
            order = await follow_at_heads(store, streams)
            print(f"{len(order.streams)} followed streams, all up to date")
            for _ in range(args.runs):
                for name, check in (("per-stream", check_per_stream), ("heads", check_with_heads)):
                    await measure(name, check, store, order, admin, database)
        finally:
            await store.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
