"""The pinned wire format, checked with raw bytes on a real socket."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack
import pytest

from chatd.codec import FrameDecoder, encode_frame
from tests.conftest import Harness, MakeHarness


class RawPeer:
    """A bare socket speaking frames by hand, to send what no well-behaved client would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 24)
        self.pending: list[Any] = []

    @classmethod
    async def open(cls, port: int, receive_buffer: int | None = None) -> RawPeer:
        """Connect; a small ``receive_buffer`` makes the server's buffers fill up quickly."""
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(*await asyncio.open_connection(sock=sock))

    def send_body(self, payload: bytes) -> None:
        self.writer.write(struct.pack(">I", len(payload)) + payload)

    def send(self, body: Any) -> None:
        self.send_body(msgpack.packb(body))

    async def reply(self) -> Any:
        async with asyncio.timeout(5):
            while not self.pending:
                data = await self.reader.read(65536)
                assert data, "connection closed before a reply"
                self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def closed(self) -> bool:
        """True once the server closes the stream (replies before that are read and kept)."""
        async with asyncio.timeout(5):
            try:
                while data := await self.reader.read(65536):
                    self.pending.extend(self.decoder.feed(data))
            except ConnectionResetError:
                pass  # closed with data we sent still unread: the kernel says reset
        return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def raw(harness: Harness) -> Any:
    peer = await RawPeer.open(harness.port)
    yield peer
    peer.close()


async def test_ping_reply_bytes_are_exactly_as_specified(raw: RawPeer) -> None:
    # {"op": "/ping", "id": 7}, written out by hand.
    raw.writer.write(bytes.fromhex("0000000e" "82" "a26f70" "a52f70696e67" "a26964" "07"))
    async with asyncio.timeout(5):
        header = await raw.reader.readexactly(4)
        (length,) = struct.unpack(">I", header)
        body = await raw.reader.readexactly(length)
    assert body == msgpack.packb({"id": 7, "code": 0, "msg": "success"})
    # 23 bytes: fixmap(3), "id" 7, "code" 0, "msg" "success".
    expected = "00000017" "83" "a26964" "07" "a4636f6465" "00" "a36d7367" "a773756363657373"
    assert (header + body).hex() == expected


async def test_id_is_echoed_only_when_given(raw: RawPeer) -> None:
    raw.send({"op": "/ping"})
    assert await raw.reply() == {"code": 0, "msg": "success"}
    raw.send({"op": "/ping", "id": -(2**63)})
    assert (await raw.reply())["id"] == -(2**63)
    raw.send({"op": "/ping", "id": 2**64 - 1})
    assert (await raw.reply())["id"] == 2**64 - 1


@pytest.mark.parametrize("bad_id", ["7", 1.5, True, [1], {"a": 1}])
async def test_non_integer_id_is_a_bad_request_without_id(raw: RawPeer, bad_id: Any) -> None:
    raw.send({"op": "/ping", "id": bad_id})
    reply = await raw.reply()
    assert reply["code"] == 1 and "id" not in reply


async def test_unknown_keys_are_ignored(raw: RawPeer) -> None:
    raw.send({"op": "/ping", "id": 1, "future": {"nested": [1, 2]}, "x": b"bin"})
    assert await raw.reply() == {"id": 1, "code": 0, "msg": "success"}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([1, 2, 3], "map"),
        ("just a string", "map"),
        ({"id": 3}, "op"),
        ({"op": 5, "id": 3}, "op"),
        ({"op": "/nope", "id": 3}, "unknown op"),
        ({"op": "ping", "id": 3}, "unknown op"),
        ({"op": "/ping", "id": 3, "params": [1]}, "params"),
        ({"op": "/ping", "id": 3, "token": 12}, "token"),
    ],
)
async def test_bad_envelopes_get_code_1_and_the_connection_stays_usable(
    raw: RawPeer, body: Any, reason: str
) -> None:
    raw.send(body)
    reply = await raw.reply()
    assert reply["code"] == 1
    assert reason in reply["msg"]
    raw.send({"op": "/ping", "id": 99})
    assert await raw.reply() == {"id": 99, "code": 0, "msg": "success"}


@pytest.mark.parametrize(
    "payload", [b"\xc1", b"", b"\x81\xa2op", msgpack.packb({"op": "/ping"}) + b"\x01"]
)
async def test_undecodable_body_gets_code_1_and_connection_survives(
    raw: RawPeer, payload: bytes
) -> None:
    raw.send_body(payload)
    reply = await raw.reply()
    assert reply["code"] == 1 and "id" not in reply
    raw.send({"op": "/ping", "id": 5})
    assert await raw.reply() == {"id": 5, "code": 0, "msg": "success"}


async def test_oversize_header_gets_code_7_and_the_connection_is_closed(
    harness: Harness, raw: RawPeer
) -> None:
    raw.writer.write(struct.pack(">I", harness.config.max_frame_size + 1))
    reply = await raw.reply()
    assert reply["code"] == 7 and "id" not in reply
    assert await raw.closed()
    # Everyone else is undisturbed.
    other = await harness.connect()
    assert (await other.call("/ping"))["code"] == 0


async def test_frame_of_exactly_the_limit_is_accepted(make_harness: MakeHarness) -> None:
    harness = await make_harness(max_frame_size=200)
    peer = await RawPeer.open(harness.port)
    filler = "x" * (200 - len(msgpack.packb({"op": "/ping", "id": 1, "pad": ""})) - 1)
    body = msgpack.packb({"op": "/ping", "id": 1, "pad": filler})
    assert len(body) == 200
    peer.send_body(body)
    assert (await peer.reply())["code"] == 0
    peer.send({"op": "/ping", "id": 2, "pad": filler + "x"})
    assert (await peer.reply())["code"] == 7
    assert await peer.closed()
    peer.close()


async def test_pipelined_requests_are_answered_in_order(raw: RawPeer) -> None:
    raw.writer.write(b"".join(encode_frame({"op": "/ping", "id": i}) for i in range(100)))
    assert [(await raw.reply())["id"] for _ in range(100)] == list(range(100))


async def test_a_frame_trickled_byte_by_byte_is_understood(raw: RawPeer) -> None:
    for byte in encode_frame({"op": "/ping", "id": 4}):
        raw.writer.write(bytes([byte]))
        await raw.writer.drain()
    assert await raw.reply() == {"id": 4, "code": 0, "msg": "success"}


async def test_error_reply_has_no_data_key(raw: RawPeer) -> None:
    raw.send({"op": "/user/info", "id": 1, "params": {"name": "x"}})
    assert await raw.reply() == {
        "id": 1,
        "code": 2,
        "msg": "not logged in: send /login first, or a token with the request",
    }


async def test_garbage_from_one_client_does_not_disturb_another(harness: Harness) -> None:
    alice = await harness.user("alice")
    await harness.user("bob")
    vandal = await RawPeer.open(harness.port)
    vandal.writer.write(b"\x00\x00\x00\x03abc" * 50 + b"\xff\xff\xff\xff")
    for i in range(20):
        await alice.request("/send", {"name": "bob", "msg": f"still here {i}"})
    assert await vandal.closed()
    assert [reply["code"] for reply in vandal.pending] == [1] * 50 + [7]
    vandal.close()


async def test_accepted_connections_have_tcp_keepalive(harness: Harness) -> None:
    """Set once on the listening socket, keepalive must reach every accepted one."""
    client = await harness.connect()
    await client.request("/ping")
    accepted = [c._writer.get_extra_info("socket") for c in harness.server._connections]
    assert len(accepted) == 1
    assert accepted[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
