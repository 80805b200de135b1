"""Time-bounded reads on SQLite (IRC CHATHISTORY's timestamps, TARGETS) walk only the
messages near their bounds, however long the history (chatd.store.sqlite, Store._by_id).

Without an index by time, a bound few messages meet (BEFORE a time older than the
channel, AFTER one in the future) read the whole history, and TARGETS read every private
message on the server: a cost any user could make every commit wait behind. The work is
counted in SQLite virtual-machine steps (a progress handler), not in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest

from chatd.store import CHANNEL, PRIVATE, NewMessage, Store
from chatd.store.rows import Bounds
from chatd.store.sqlite import TIME_SLACK
from tests.test_sqlite_commit import user

T0 = 1_700_000_000.0
MESSAGES = 3_000  # one a second from T0, in the channel and from ann to bob each
STEP = 100  # VM steps between two calls of the progress handler


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(str(tmp_path / "bounds.sqlite3"))
    try:
        yield opened
    finally:
        await opened.close()


async def store_all(store: Store, messages: list[NewMessage]) -> None:
    done = store.enqueue_many(messages, lambda results: None)
    await asyncio.wait_for(done, 60)


async def history(store: Store) -> tuple[int, int, int, int]:
    """ann, bob and cid (who never sent anything) in #c; MESSAGES in #c from ann and as
    many from ann to bob; the ids of: ann, bob, cid, the channel."""
    ann, bob, cid = [await user(store, name) for name in ("ann", "bob", "cid")]
    channel, _ = await store.join_channel("c", "c", ("c", "C"), ann, T0)
    for member in (bob, cid):
        await store.join_channel("c", "c", ("c", "C"), member, T0)
    await store_all(store, [NewMessage(CHANNEL, ann, channel.id, f"c{i}", T0 + i, None)
                            for i in range(MESSAGES)])
    await store_all(store, [NewMessage(PRIVATE, ann, bob, f"p{i}", T0 + i, None)
                            for i in range(MESSAGES)])
    return ann, bob, cid, channel.id


class Steps:
    """SQLite VM steps taken on the store's connection, counted by a progress handler."""

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> int:
        self.count += STEP
        return 0  # go on

    async def install(self, store: Store) -> None:
        connection = store._db._conn  # the handler is set on the connection's own thread
        await store._handoff.call(connection.set_progress_handler, self.tick, STEP)

    async def taken_by(self, read: Awaitable[object]) -> int:
        self.count = 0
        await read
        return self.count


async def test_bounds_few_messages_meet_walk_few_rows(store: Store) -> None:
    ann, bob, cid, channel = await history(store)
    steps = Steps()
    await steps.install(store)
    latest = await steps.taken_by(store.channel_range(channel, Bounds(), 50, True))
    # Before this, each of these walked all 3,000 rows (9 steps a row: 27,000 steps).
    hostile = {
        "channel BEFORE older": store.channel_range(channel, Bounds(before_time=T0 - 1e6), 50,
                                                    True),
        "channel AFTER future": store.channel_range(channel, Bounds(after_time=T0 + 1e6), 50,
                                                    False),
        "private BEFORE older": store.private_range(ann, bob, Bounds(before_time=T0 - 1e6), 50,
                                                    True),
        "TARGETS of a user who sent nothing": store.recent_targets(cid, T0 - 1, T0 + 1e6, 50),
        "TARGETS in the future": store.recent_targets(ann, T0 + 1e6, T0 + 2e6, 50),
    }
    for name, read in hostile.items():
        taken = await steps.taken_by(read)
        assert taken <= max(latest, 2_000), f"{name}: {taken} steps (LATEST 50: {latest})"


async def test_a_clock_stepped_back_within_the_slack_hides_nothing(store: Store) -> None:
    ann, bob, _, channel = await history(store)
    # The clock steps back by less than TIME_SLACK: a message older by its time than the
    # one before it by id, then the clock goes on from there.
    back = T0 + MESSAGES - TIME_SLACK / 2
    await store_all(store, [NewMessage(CHANNEL, bob, channel, "stepped back", back, None),
                            NewMessage(PRIVATE, bob, ann, "stepped back", back, None)])
    after = Bounds(after_time=back - 1)
    posts = await store.channel_range(channel, after, 100, False)
    assert [m.body for m in posts if m.created_at > back - 1] == [m.body for m in posts]
    assert posts[-1].body == "stepped back"
    assert len(posts) == TIME_SLACK / 2 + 1  # the messages of the last 30 s, and it
    sent = await store.private_range(ann, bob, after, 100, False)
    assert sent[-1].body == "stepped back" and len(sent) == TIME_SLACK / 2 + 1
    targets = await store.recent_targets(ann, back - 1, back + 1, 10)
    assert ("c", True, back) in targets and ("bob", False, back) in targets


async def test_time_bounds_on_an_empty_history(store: Store) -> None:
    ann = await user(store, "ann")
    channel, _ = await store.join_channel("c", "c", ("c", "C"), ann, T0)
    assert await store.recent_targets(ann, T0 - 1, T0 + 1, 10) == []
    assert await store.channel_range(channel.id, Bounds(after_time=T0), 10, False) == []
