"""The paced path: a send's reply written by its commit's settle, pushes written at once.

A paced message (one frame per read, one commit) is answered without the reply queue:
the settle that makes its reply writes it (Connection._reply_ready). Whatever comes
while it is owed, a second frame in the same read or a later read, a client behind in
reading, an end of stream, goes through the queue behind it, in request order. Pushes
made while a commit is published are written when it ends (Hub.pushes). The in-memory
tests drive a real Connection with a Pending settled on cue; the others use a server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from chatd.app import Pending
from chatd.codec import FrameDecoder, Malformed, Oversize, encode_frame
from chatd.config import Config
from chatd.connection import (
    DRAIN_ABOVE,
    READ_CHUNK,
    Connection,
    PutReply,
    ReadTimer,
    _ReplyQueue,
)
from chatd.hub import PushBatch, Session
from chatd.metrics import Metrics
from chatd.streams import LeanStreamReader
from tests.conftest import Harness
from tests.test_wire import RawPeer


class CommitOnCue(Pending):
    """A send's reply, ready when the test says (as a group commit's settle makes it)."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self._ready = False
        self._settled = asyncio.Event()
        self._callback: Callable[[Pending], None] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def on_ready(self, callback: Callable[[Pending], None]) -> bool:
        self._callback = callback
        return True

    def settle(self) -> None:
        """As ReplyGroup._settle: ready, then the connection told."""
        self._ready = True
        self._settled.set()
        if self._callback is not None:
            callback, self._callback = self._callback, None
            callback(self)

    async def wait(self) -> None:
        await self._settled.wait()

    def replies(self) -> list[dict[str, Any]]:
        return [{"id": self.rid, "code": 0, "msg": "success"}]


class AnsweredAtOnce(CommitOnCue):
    """A group holding only errors: ready when handed over."""

    def __init__(self, rid: int) -> None:
        super().__init__(rid)
        self._ready = True

    def on_ready(self, callback: Callable[[Pending], None]) -> bool:
        return False  # ready already (as ReplyGroup answers then)

    def replies(self) -> list[dict[str, Any]]:
        return [{"id": self.rid, "code": 2, "msg": "not logged in"}]


class Transport(asyncio.Transport):
    """Records each write; ``buffered`` is what the kernel has not taken yet."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.wrote = asyncio.Event()
        self.buffered = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        self.wrote.set()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class Peer:
    """A Connection on an in-memory stream: /send is answered by a CommitOnCue (or an
    AnsweredAtOnce for /bad), anything else at once."""

    def __init__(self) -> None:
        config = Config(db=":memory:")
        self.reader = LeanStreamReader(limit=READ_CHUNK)
        self.transport = Transport()
        self.reader.set_transport(self.transport)
        protocol = asyncio.StreamReaderProtocol(self.reader)
        writer = asyncio.StreamWriter(
            self.transport, protocol, self.reader, asyncio.get_running_loop()
        )
        self.sends: list[CommitOnCue] = []
        self.handled = 0
        self.progress = asyncio.Event()
        self.closed: list[str] = []
        self.connection = Connection(
            self.reader, writer, config, self._handle, Metrics(), ReadTimer(config)
        )
        self.connection.start(lambda connection, why: self.closed.append(why))

    async def _handle(
        self, session: Session, bodies: list[Any], put: PutReply, budget: int
    ) -> int:
        for body in bodies:
            reply: dict[str, Any] | Pending
            if body["op"] == "/send":
                reply = CommitOnCue(body["id"])
                self.sends.append(reply)
            elif body["op"] == "/bad":
                reply = AnsweredAtOnce(body["id"])
            else:
                reply = {"id": body["id"], "code": 0, "msg": "success"}
            await put(reply)
            self.handled += 1
            self.progress.set()
        return 0

    def feed(self, *requests: tuple[str, int]) -> None:
        """One read holding these requests."""
        self.reader.feed_data(b"".join(encode_frame({"op": op, "id": i}) for op, i in requests))

    async def handled_at_least(self, count: int) -> None:
        async with asyncio.timeout(5):
            while self.handled < count:
                self.progress.clear()
                await self.progress.wait()

    def replies(self) -> list[Any]:
        return FrameDecoder().feed(b"".join(self.transport.writes))

    async def written(self, count: int) -> list[Any]:
        """Every reply written, once there are ``count`` (the queue writes in its task)."""
        async with asyncio.timeout(5):
            while len(self.replies()) < count:
                self.transport.wrote.clear()
                await self.transport.wrote.wait()
        return self.replies()

    async def close(self) -> None:
        self.reader.feed_eof()
        task = self.connection.task
        assert task is not None
        async with asyncio.timeout(5):
            await task


async def test_a_lone_send_is_written_by_its_settle_without_a_queue() -> None:
    peer = Peer()
    peer.feed(("/send", 1))
    await peer.handled_at_least(1)
    assert peer.transport.writes == []  # not before its commit
    peer.sends[0].settle()
    # Written in the settle itself: no task, no loop turn in between.
    assert peer.replies() == [{"id": 1, "code": 0, "msg": "success"}]
    assert peer.connection._queue is None
    peer.feed(("/send", 2))  # and again: the connection owes nothing any more
    await peer.handled_at_least(2)
    peer.sends[1].settle()
    assert [reply["id"] for reply in peer.replies()] == [1, 2]
    assert peer.connection._queue is None
    await peer.close()


async def test_a_second_frame_in_the_same_read_is_answered_after_the_send() -> None:
    peer = Peer()
    peer.feed(("/send", 1), ("/ping", 2))
    await peer.handled_at_least(2)
    assert peer.transport.writes == []  # the ping's reply waits for the send's
    peer.sends[0].settle()
    assert [reply["id"] for reply in await peer.written(2)] == [1, 2]
    await peer.close()


async def test_a_later_read_while_the_send_is_owed_is_answered_after_it() -> None:
    peer = Peer()
    peer.feed(("/send", 1))
    await peer.handled_at_least(1)
    peer.feed(("/ping", 2))
    peer.feed(("/send", 3))
    await peer.handled_at_least(3)
    assert peer.transport.writes == []
    peer.sends[1].settle()  # the later send first: still behind the first one
    peer.sends[0].settle()
    assert [reply["id"] for reply in await peer.written(3)] == [1, 2, 3]
    await peer.close()


async def test_a_client_behind_in_reading_gets_the_reply_through_the_queue() -> None:
    """With the outbound buffer past the drain mark, the settle does not write: the queue
    does, waiting for the client (backpressure); what follows comes after it."""
    peer = Peer()
    peer.feed(("/send", 1))
    await peer.handled_at_least(1)
    peer.transport.buffered = DRAIN_ABOVE
    peer.sends[0].settle()
    assert peer.transport.writes == []
    assert peer.connection._queue is not None
    peer.transport.buffered = 0
    peer.feed(("/ping", 2))
    assert [reply["id"] for reply in await peer.written(2)] == [1, 2]
    await peer.close()


async def test_an_error_reply_known_at_once_is_written_at_once() -> None:
    peer = Peer()
    peer.feed(("/bad", 1))
    await peer.handled_at_least(1)
    assert peer.replies() == [{"id": 1, "code": 2, "msg": "not logged in"}]
    assert peer.connection._queue is None
    await peer.close()


async def test_a_send_owed_at_the_end_of_the_stream_is_answered_before_closing() -> None:
    peer = Peer()
    peer.feed(("/send", 1))
    await peer.handled_at_least(1)
    peer.reader.feed_eof()
    await asyncio.sleep(0)  # the connection sees the end and waits for what it owes
    assert not peer.closed
    peer.sends[0].settle()
    await peer.close()
    assert peer.replies() == [{"id": 1, "code": 0, "msg": "success"}]
    assert peer.closed == ["peer"]


async def test_a_settle_after_the_transport_closed_drops_the_connection() -> None:
    peer = Peer()
    peer.feed(("/send", 1))
    await peer.handled_at_least(1)
    peer.transport.closed = True
    peer.sends[0].settle()
    assert peer.transport.writes == []
    assert peer.connection._dropped == "dropped: cannot write replies (ConnectionResetError)"
    await peer.close()


def test_a_push_batch_writes_everything_held_when_it_closes() -> None:
    batch = PushBatch()
    written: list[str] = []

    def broken() -> None:
        raise RuntimeError("a connection that fails")

    batch.open = True
    batch.flushes += [lambda: written.append("a"), broken, lambda: written.append("b")]
    batch.close()
    assert written == ["a", "b"]  # one failing flush does not hold the others back
    assert not batch.open and batch.flushes == []
    batch.close()  # a scheduled close finding it closed already
    assert written == ["a", "b"]


# Over a real server: SQLite commits, a subscribed recipient.


async def test_paced_sends_are_answered_and_pushed_without_the_reply_queue(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = await harness.user("bob")
    await bob.request("/subscribe")
    alice = await harness.user("alice")
    # The first send checks the token against the store (not the paced path).
    await alice.request("/send", {"name": "bob", "msg": "first"})
    await bob.next_event(timeout=5)
    queued: list[object] = []
    put_nowait = _ReplyQueue.put_nowait

    def counted(queue: _ReplyQueue, reply: Any) -> None:
        queued.append(reply)
        put_nowait(queue, reply)

    monkeypatch.setattr(_ReplyQueue, "put_nowait", counted)
    for i in range(20):
        data = await alice.request("/send", {"name": "bob", "msg": f"m{i}"})
        event = await bob.next_event(timeout=5)
        assert event["data"]["id"] == data["id"] and event["data"]["msg"] == f"m{i}"
    assert queued == []  # each reply was written by its commit's settle


async def test_a_note_to_self_brings_its_push_and_its_reply(harness: Harness) -> None:
    """The push and the reply of one send on one connection: both come, the push first
    (protocol.md section 1 allows an event before the reply to its request)."""
    token = await (await harness.user("carol")).login("carol", "correct horse battery")
    raw = await RawPeer.open(harness.port)
    raw.send({"op": "/subscribe", "id": 1, "token": token})
    assert (await raw.reply())["code"] == 0
    # Until its (empty) catch-up has ended, a message for the stream waits behind it,
    # to come after whatever else is written meanwhile (the reply among them).
    for n in itertools.count(100):
        raw.send({"op": "/stats", "id": n, "token": token})
        if (await raw.reply())["data"]["catching_up"] == 0:
            break
    raw.send({"op": "/send", "id": 2, "token": token, "params": {"name": "carol", "msg": "hi"}})
    first, second = await raw.reply(), await raw.reply()
    assert first["event"] == "message" and first["data"]["msg"] == "hi"
    assert second["id"] == 2 and second["code"] == 0 and second["data"]["id"] == first["data"]["id"]
    raw.close()


async def test_a_send_and_a_ping_in_one_write_are_answered_in_order(harness: Harness) -> None:
    token = await (await harness.user("dave")).login("dave", "correct horse battery")
    raw = await RawPeer.open(harness.port)
    for round_ in range(20):
        send = {"op": "/send", "id": 2 * round_, "token": token,
                "params": {"name": "dave", "msg": "x"}}
        ping = {"op": "/ping", "id": 2 * round_ + 1}
        raw.writer.write(encode_frame(send) + encode_frame(ping))
        answered = [(await raw.reply())["id"], (await raw.reply())["id"]]
        assert answered == [2 * round_, 2 * round_ + 1]
    raw.close()


def test_a_read_of_exactly_one_frame_decodes_as_the_loop_would() -> None:
    """FrameDecoder.feed's short cut for one whole frame, and what it leaves to the loop."""
    frame = encode_frame({"op": "/ping", "id": 1})
    assert FrameDecoder().feed(frame) == [{"op": "/ping", "id": 1}]
    assert FrameDecoder().feed(frame, 1) == [{"op": "/ping", "id": 1}]
    held = FrameDecoder()
    assert held.feed(frame, 0) == [] and held.pending  # a spent budget holds it back
    assert held.feed(b"", 1) == [{"op": "/ping", "id": 1}]
    (bad,) = FrameDecoder().feed(b"\x00\x00\x00\x01\xc1")  # 0xc1: never valid msgpack
    assert isinstance(bad, Malformed)
    (small,) = FrameDecoder(max_frame_size=4).feed(frame)
    assert isinstance(small, Oversize)
    split = FrameDecoder()
    assert split.feed(frame[:3]) == [] and split.feed(frame[3:]) == [{"op": "/ping", "id": 1}]
    two = FrameDecoder()
    assert two.feed(frame + frame[:5]) == [{"op": "/ping", "id": 1}] and two.buffered == 5
