"""The client library and chatcat where the peer misbehaves, answers late or not at all,
and chatcat's usage errors and Ctrl-C.

A "peer" here is a real listening socket whose bytes the test writes: a server that is not
chatd (an HTTP server on the wrong port) or one that breaks the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatd.chatcat import main, pipe_mode
from chatd.client import Client, RequestIdInUse
from chatd.codec import FrameDecoder, encode_frame
from tests.conftest import Harness

ROOT = Path(__file__).resolve().parent.parent
Link = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Peer:
    """Accepts connections; the test reads the requests and writes what it likes."""

    def __init__(self) -> None:
        self.links: asyncio.Queue[Link] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._decoder = FrameDecoder()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self.links.put((reader, writer))

    async def requests(self, reader: asyncio.StreamReader, count: int) -> list[dict[str, Any]]:
        """The next ``count`` request frames received."""
        found: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while len(found) < count:
                data = await reader.read(65536)
                assert data, "the client closed the connection"
                found += self._decoder.feed(data)
        return found

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self._server.wait_closed()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    running = Peer()
    await running.start()
    yield running
    await running.close()


async def connected(peer: Peer, **options: Any) -> tuple[Client, Link]:
    client = await Client.connect("127.0.0.1", peer.port, timeout=5, **options)
    async with asyncio.timeout(10):
        link = await peer.links.get()
    return client, link


def reply_to(request: dict[str, Any], **data: Any) -> bytes:
    return encode_frame({"id": request["id"], "code": 0, "msg": "success", "data": data})


async def test_a_peer_that_is_not_chatd_fails_the_request_at_once(peer: Peer) -> None:
    client, (reader, writer) = await connected(peer)
    asking = asyncio.create_task(client.call("/ping"))
    await peer.requests(reader, 1)
    # "HTTP" read as a length header is 1.2 GB: a bad frame, not a wait for 1.2 GB.
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ConnectionError):
        await asking  # well before the client's 5 s timeout
    assert not client.connected
    await client.close()


async def test_a_reply_that_came_before_a_bad_frame_stands(peer: Peer) -> None:
    client, (reader, writer) = await connected(peer)
    asking = asyncio.create_task(client.call("/ping"))
    [request] = await peer.requests(reader, 1)
    writer.write(reply_to(request, n=1) + b"\xff\xff\xff\xff")  # one read: both together
    assert (await asking)["data"] == {"n": 1}
    with pytest.raises(ConnectionError):
        await client.next_event()
    await client.close()


async def test_a_repeated_reply_is_dropped_and_the_connection_goes_on(peer: Peer) -> None:
    client, (reader, writer) = await connected(peer)
    asking = asyncio.create_task(client.call("/ping"))
    [request] = await peer.requests(reader, 1)
    writer.write(reply_to(request, n=1) + reply_to(request, n=2))
    assert (await asking)["data"] == {"n": 1}
    asking = asyncio.create_task(client.call("/ping"))
    [request] = await peer.requests(reader, 1)
    writer.write(reply_to(request, n=3))
    assert (await asking)["data"] == {"n": 3}
    assert client.waiting_events() == []  # the repeat did not surface as an event
    await client.close()


async def test_a_reply_after_its_request_timed_out_comes_out_as_an_event(peer: Peer) -> None:
    client, (reader, writer) = await connected(peer)
    with pytest.raises(TimeoutError):
        await client.call("/ping", timeout=0.1)
    [request] = await peer.requests(reader, 1)
    writer.write(reply_to(request, late=True))
    late = await client.next_event()
    assert late["id"] == request["id"] and late["data"] == {"late": True}
    await client.close()


async def test_events_left_after_the_close_can_still_be_taken(peer: Peer) -> None:
    client, (_, writer) = await connected(peer)
    writer.write(encode_frame({"event": "presence", "data": {"name": "a", "online": True}})
                 + encode_frame({"event": "presence", "data": {"name": "b", "online": True}}))
    writer.close()
    async with asyncio.timeout(10):
        while client.connected:  # noqa: ASYNC110 - the end of the read loop has no event
            await asyncio.sleep(0.01)
    assert [e["data"]["name"] for e in client.waiting_events()] == ["a", "b"]
    assert client.waiting_events() == []
    with pytest.raises(ConnectionError):  # the end stays after them
        await client.next_event()
    assert [event async for event in client.events()] == []
    await client.close()


async def test_a_timed_out_wait_for_an_event_does_not_lose_the_next_one(
    harness: Harness,
) -> None:
    alice, bob = await harness.user("alice"), await harness.user("bob")
    await bob.request("/subscribe")
    with pytest.raises(TimeoutError):
        await bob.next_event(timeout=0.05)
    await alice.request("/send", {"name": "bob", "msg": "after the timeout"})
    event = await bob.next_event()
    assert event["event"] == "message" and event["data"]["msg"] == "after the timeout"


async def test_a_client_made_from_streams_cannot_reconnect(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.port)
    async with Client(reader, writer) as client:
        assert (await client.call("/ping"))["code"] == 0
        with pytest.raises(RuntimeError, match=r"Client\.connect"):
            await client.reconnect()


async def test_request_ids_chosen_by_the_caller_and_assigned_ones_never_collide(
    harness: Harness,
) -> None:
    client = await harness.connect()
    # Sent together: the first is still waiting when the others are issued.
    chosen = asyncio.create_task(client.exchange({"op": "/ping", "id": 1}))
    again = asyncio.create_task(client.exchange({"op": "/ping", "id": 1}))
    assigned = asyncio.create_task(client.exchange({"op": "/ping"}))
    results = await asyncio.gather(chosen, again, assigned, return_exceptions=True)
    assert results[0] == {"id": 1, "code": 0, "msg": "success"}
    assert isinstance(results[1], RequestIdInUse)
    assert results[2] == {"id": 2, "code": 0, "msg": "success"}  # 1 was taken: skipped


# chatcat.


async def test_pipe_mode_refuses_a_line_whose_id_is_still_waiting(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    client, (reader, writer) = await connected(peer)
    stdin = io.StringIO('{"op": "/ping", "id": 7}\n{"op": "/ping", "id": 7}\n{"op": "/ping"}\n')
    out = io.StringIO()
    piping = asyncio.create_task(pipe_mode(client, stdin, out))
    requests = await peer.requests(reader, 2)  # only then are the replies written
    writer.write(b"".join(reply_to(request) for request in requests))
    assert await piping == 2
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [7, 1]
    assert "line 2: request id 7 is already waiting for its reply" in capsys.readouterr().err
    await client.close()


async def test_one_shot_prints_binary_values_as_hex(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["127.0.0.1", str(peer.port), "/file"]
    running = asyncio.create_task(asyncio.to_thread(main, argv))
    reader, writer = await peer.links.get()
    [request] = await peer.requests(reader, 1)
    writer.write(reply_to(request, blob=b"\x00\xff"))
    assert await running == 0
    assert json.loads(capsys.readouterr().out)["data"] == {"blob": "00ff"}


async def test_one_shot_against_a_peer_that_is_not_chatd_says_the_connection_is_lost(
    peer: Peer, capsys: pytest.CaptureFixture[str]
) -> None:
    port = peer.port
    argv = ["--timeout", "5", "127.0.0.1", str(port), "/ping"]
    running = asyncio.create_task(asyncio.to_thread(main, argv))
    reader, writer = await peer.links.get()
    await peer.requests(reader, 1)
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert await running == 2
    err = capsys.readouterr().err
    assert err == f"chatcat: connection to 127.0.0.1:{port} lost: connection closed\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["example.org", "7777", "ping"], "expected an op such as /ping, got 'ping'"),
        (["/ack", "id:=forty"], "not valid JSON after id:= : forty"),
    ],
)
def test_usage_errors_are_said_before_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2  # example.org is never looked up: no network needed
    assert capsys.readouterr().err == f"chatcat: {message}\n"


async def test_ctrl_c_in_pipe_mode_quits_at_once_while_stdin_is_open(harness: Harness) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatd.chatcat", "127.0.0.1", str(harness.port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b'{"op": "/ping"}\n')
        async with asyncio.timeout(20):
            assert json.loads(await proc.stdout.readline())["code"] == 0
        proc.send_signal(signal.SIGINT)  # stdin stays open: a read is waiting on it
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
        assert await proc.stderr.read() == b""  # no traceback
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
