"""chatd.streams: asyncio's streams with less held per idle connection, same behaviour.

Real sockets on loopback, on the event loop the tests run on; chatd's own server
(tests/test_live.py and the rest) runs on these streams too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from chatd import streams
from tests.conftest import Harness, MakeHarness
from tests.test_irc_live import SERVER, IrcClient, irc_harness

Accepted = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Served:
    """A streams.start_server listener and the connections it accepted, in order."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Accepted] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []  # both ends, closed at the end

    def accept(self, reader: streams.LeanStreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.put_nowait((reader, writer))

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def pair(self) -> tuple[Accepted, Accepted]:
        """A client connection and the server side of it: (reader, writer) each."""
        client = await asyncio.open_connection("127.0.0.1", self.port)
        server_side = await self.accepted.get()
        self.writers += [client[1], server_side[1]]
        return client, server_side

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    served = Served()
    served.server = await streams.start_server(served.accept, "127.0.0.1", 0)
    yield served
    await served.close()


def protocol_of(writer: asyncio.StreamWriter) -> Any:
    return cast(Any, writer)._protocol


def frames_under(task: asyncio.Task[Any]) -> list[str]:
    """The names of the coroutines suspended in the task, outermost first."""
    names: list[str] = []
    awaited: Any = task.get_coro()
    while hasattr(awaited, "cr_code"):  # down the chain of awaits, to the future
        names.append(awaited.cr_code.co_name)
        awaited = awaited.cr_await
    return names


async def test_reads_what_is_sent_in_order_then_end_of_stream(served: Served) -> None:
    (_, client), (reader, _) = await served.pair()
    for part in (b"one ", b"two ", b"three"):
        client.write(part)
    await client.drain()
    got = b""
    while len(got) < len(b"one two three"):
        got += await reader.read(4)
    assert got == b"one two three"
    client.close()
    assert await reader.read(100) == b""


async def test_more_than_the_limit_unread_pauses_reading_and_reading_resumes_it(
    served: Served,
) -> None:
    (_, client), (reader, _) = await served.pair()
    sent = bytes(range(256)) * (3 * streams.STREAM_LIMIT // 256 + 1)
    client.write(sent)
    client.write_eof()
    got = bytearray()
    while chunk := await reader.read(streams.STREAM_LIMIT):
        got += chunk
    assert bytes(got) == sent


async def test_a_cancelled_read_leaves_the_reader_usable(served: Served) -> None:
    """As Connection.interrupt_read does: cancel the read in progress, then read again."""
    (_, client), (reader, _) = await served.pair()
    pending = asyncio.ensure_future(reader.read(100))
    await asyncio.sleep(0)  # one turn: the read is now waiting
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    client.write(b"after")
    assert await reader.read(100) == b"after"


async def test_feed_eof_ends_a_waiting_read(served: Served) -> None:
    """Connection.abort() ends the read in progress this way."""
    _, (reader, _) = await served.pair()
    pending = asyncio.ensure_future(reader.read(100))
    await asyncio.sleep(0)
    reader.feed_eof()
    assert await pending == b""


async def test_drain_waits_for_a_client_that_does_not_read_then_returns(
    served: Served,
) -> None:
    (client_reader, _), (_, writer) = await served.pair()
    protocol = protocol_of(writer)
    payload = b"x" * (8 * 1024 * 1024)  # far more than the socket buffers take
    writer.write(payload)
    draining = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0)  # one turn: drain() is now waiting
    assert not draining.done()
    assert len(protocol._drain_waiters) == 1
    assert len(await client_reader.readexactly(len(payload))) == len(payload)
    await draining
    assert not protocol._drain_waiters


async def test_each_connection_holds_less(served: Served) -> None:
    """What chatd.streams saves, checked on its parts: the drain waiters are a list,
    a waiting read is one coroutine frame (asyncio's StreamReader suspends two), and
    the writers' _complete_fut and close waiter are one done future for all."""
    _, (reader, writer) = await served.pair()
    _, (_, other_writer) = await served.pair()
    protocol = protocol_of(writer)
    assert type(protocol._drain_waiters) is list

    async def wait_for_input() -> bytes:
        return await reader.read(100)

    waiting = asyncio.ensure_future(wait_for_input())
    await asyncio.sleep(0)
    assert frames_under(waiting) == ["wait_for_input", "read"]
    waiting.cancel()

    shared = cast(Any, writer)._complete_fut
    assert shared.done()
    assert shared is protocol._closed is cast(Any, other_writer)._complete_fut

    assert protocol._stream_reader_wr is None  # no weak reference
    assert protocol._stream_reader is reader


async def test_a_lost_connection_lets_go_of_its_reader(served: Served) -> None:
    (_, client), (reader, writer) = await served.pair()
    protocol = protocol_of(writer)
    client.close()
    assert await reader.read(100) == b""  # the end of stream
    writer.close()
    await writer.wait_closed()
    assert protocol._stream_reader is None


async def test_an_idle_chatd_connection_waits_in_one_frame(harness: Harness) -> None:
    """The server's own connections: the connection's loop awaits the reader's future
    itself (read_now), with no read() coroutine under it."""
    client = await harness.user()
    await client.call("/subscribe")
    (connection,) = cast(Any, harness.server)._connections
    assert frames_under(connection.task) == ["_run"]
    reader = connection._reader
    assert reader._waiter is not None and not reader._waiter.done()
    assert (await client.call("/ping"))["code"] == 0  # the future woken, the loop goes on
    assert frames_under(connection.task) == ["_run"]


async def test_an_idle_irc_connection_waits_in_its_own_frames(make_harness: MakeHarness) -> None:
    """The IRC port's connections too: lean streams (chatd.streams.start_server), and the
    read loop awaits the reader's future itself, with no read() coroutine under it."""
    harness, port = await irc_harness(make_harness)
    await harness.user("alice")
    irc = await IrcClient.connect(port)
    await irc.login("alice")
    assert harness.server.irc is not None
    (connection,) = harness.server.irc._connections
    assert connection.task is not None
    assert isinstance(protocol_of(connection._writer), streams.LeanStreamProtocol)
    for token in ("settled", "woken"):  # the login's work done; then a read woken
        # The PONG is written in the same step as the connection goes back to reading.
        await irc.send(f"PING {token}")
        await irc.expect(f"^:{SERVER} PONG {SERVER} :{token}$")
        assert frames_under(connection.task) == ["run", "_serve"]
        reader = cast(Any, connection._reader)
        assert reader._waiter is not None and not reader._waiter.done()
    await irc.close()


async def test_read_now_hands_out_bytes_or_a_future_and_survives_a_cancelled_wait(
    served: Served,
) -> None:
    """As Connection._run uses it: a future while nothing is buffered, bytes once data
    came; a wait cancelled (interrupt_read) is replaced by the next call, not refused."""
    (_, client), (reader, _) = await served.pair()
    lean = cast(streams.LeanStreamReader, reader)
    first = lean.read_now(100)
    assert isinstance(first, asyncio.Future)
    with pytest.raises(RuntimeError, match="another coroutine waits"):
        lean.read_now(100)  # a second reader while the first waits, as read() refuses
    first.cancel()
    second = lean.read_now(100)
    assert isinstance(second, asyncio.Future) and second is not first
    client.write(b"hello")
    await asyncio.wait_for(second, 10)
    assert lean.read_now(3) == b"hel"
    assert lean.read_now(100) == b"lo"
    client.close()
    assert await lean.read(100) == b""
