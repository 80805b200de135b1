"""Edges of the SQLite store that the wire cannot reach: a bad open, the bound on the
heads it keeps as guesses, the hop to the database thread over a pipe (no eventfd), and a
result handler that fails.

Real database files, the store's own connections and threads; no server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatd.store import PRIVATE, NewMessage, Stored, StoreError
from chatd.store import sqlite as sqlite_store
from chatd.store.sqlite import Store

WAIT = 30.0  # seconds: a bound on every wait


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
