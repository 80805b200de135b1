"""The reply queue of a connection, on its own: no socket, a peer that fails on cue."""

from __future__ import annotations

import asyncio

import pytest

from chatd.connection import _ReplyQueue


class BrokenPeer:
    """The two calls the queue makes on its connection; every write fails."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.gone = asyncio.Event()
        self.writes = 0

    async def send(self, frame: bytes) -> None:
        self.writes += 1
        raise ConnectionResetError("the peer is gone")

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)
        self.gone.set()


async def test_replies_after_a_failed_write_are_refused_and_finish_does_not_wait() -> None:
    """Requests still buffered when a write fails must not make close wait for them."""
    peer = BrokenPeer()
    queue = _ReplyQueue(peer)  # type: ignore[arg-type]
    await queue.put({"code": 0, "msg": "success"})
    async with asyncio.timeout(5):
        await peer.gone.wait()
    assert peer.aborted == ["dropped: cannot write replies (ConnectionResetError)"]
    with pytest.raises(ConnectionResetError):
        await queue.put({"code": 0, "msg": "success"})  # a later request in the same read
    async with asyncio.timeout(1):  # not write_timeout: nothing can be written any more
        await queue.finish(timeout=30)
    assert peer.writes == 1
    queue.discard()
