"""protocol.md's worked examples (section 11), checked against a live server.

The document marks what is checked with HTML comments, each followed by a fenced block:

- ``<!-- hex: NAME -->``: a hex dump, one group of bytes per line: every leading token of
  exactly two hex digits is a byte, and the first other token starts the annotation;
- ``<!-- body: NAME -->``: one frame body as JSON, after an optional ``→`` or ``←``;
- ``<!-- minimal-client -->``: the minimal client, in a block opened by exactly ```python.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.conftest import Harness

DOC = Path(__file__).resolve().parent.parent / "protocol.md"
HEX_BYTE = re.compile(r"[0-9a-fA-F]{2}")
TOKEN_LENGTH = 43
STR8_TOKEN_HEADER = bytes([0xD9, TOKEN_LENGTH])  # the `d9 2b` the document annotates
WAIT = 5.0  # seconds: a bound on every wait on the server or the subprocess


@pytest.fixture(scope="module")
def doc() -> list[str]:
    return DOC.read_text(encoding="utf-8").splitlines()


def fenced_block(lines: list[str], marker: str, opening: str | None = None) -> list[str]:
    """The lines of the fenced block that follows the line ``marker`` (exactly one)."""
    places = [i for i, line in enumerate(lines) if line.strip() == marker]
    assert len(places) == 1, f"protocol.md must contain {marker!r} exactly once"
    start = places[0] + 1
    assert start < len(lines) and lines[start].startswith("```"), f"no block after {marker}"
    if opening is not None:
        assert lines[start] == opening, f"the block after {marker} must open with {opening}"
    for end in range(start + 1, len(lines)):
        if lines[end].startswith("```"):
            return lines[start + 1 : end]
    raise AssertionError(f"the block after {marker} is not closed")


def documented_hex(lines: list[str], name: str) -> bytes:
    data = bytearray()
    for line in fenced_block(lines, f"<!-- hex: {name} -->"):
        for token in line.split():
            if not HEX_BYTE.fullmatch(token):
                break  # the annotation starts here
            data.append(int(token, 16))
    assert data, f"hex block {name} is empty"
    return bytes(data)


def documented_body(lines: list[str], name: str) -> Any:
    block = [line for line in fenced_block(lines, f"<!-- body: {name} -->") if line.strip()]
    assert len(block) == 1, f"body block {name} must hold one line"
    return json.loads(block[0].strip().removeprefix("→").removeprefix("←"))


def frame(body: Any) -> bytes:
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def frame_body(data: bytes) -> bytes:
    """The body of one whole frame, after checking its length header counts exactly it."""
    assert len(data) >= 4, "a frame has a 4-byte header"
    (length,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + length, "the length header must count exactly the body"
    return data[4:]


async def exchange(port: int, request: bytes, *more: bytes) -> list[bytes]:
    """Send raw frames on a new connection; return each reply frame's raw bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        replies = []
        async with asyncio.timeout(WAIT):
            for raw in (request, *more):
                writer.write(raw)
                header = await reader.readexactly(4)
                (length,) = struct.unpack(">I", header)
                replies.append(header + await reader.readexactly(length))
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


async def test_ping_frames_are_the_bytes_the_server_exchanges(
    doc: list[str], harness: Harness
) -> None:
    request = documented_hex(doc, "ping-request")
    frame_body(request)
    assert request == frame({"op": "/ping", "id": 1})
    (reply,) = await exchange(harness.port, request)
    assert documented_hex(doc, "ping-reply") == reply


async def test_login_request_bytes_match_the_documented_request(doc: list[str]) -> None:
    body = documented_body(doc, "login-request")
    assert body["op"] == "/login"
    shown = documented_hex(doc, "login-request")
    assert shown == frame(body)
    assert msgpack.unpackb(frame_body(shown)) == body


async def test_login_reply_is_laid_out_as_a_live_server_sends_it(
    doc: list[str], harness: Harness
) -> None:
    request = documented_body(doc, "login-request")
    params = request["params"]
    shown = documented_hex(doc, "login-reply")

    # The document agrees with itself: the dump is the documented reply, byte for byte.
    assert shown == frame(documented_body(doc, "login-reply"))
    reply = msgpack.unpackb(frame_body(shown))
    assert list(reply) == ["id", "code", "msg", "data"]
    assert reply["id"] == request["id"] and reply["code"] == 0
    token = reply["data"]["token"]
    assert isinstance(token, str) and len(token) == TOKEN_LENGTH
    at = shown.index(STR8_TOKEN_HEADER + token.encode())

    # A live server sends the same bytes around a token of its own.
    register = {
        "op": "/register",
        "params": {
            "name": params["name"],
            "password": params["password"],
            "password_repete": params["password"],
        },
    }
    registered, live = await exchange(harness.port, frame(register), frame(request))
    assert msgpack.unpackb(registered[4:])["code"] == 0
    assert len(live) == len(shown) and live[:4] == shown[:4]
    token_start = at + len(STR8_TOKEN_HEADER)
    token_end = token_start + TOKEN_LENGTH
    assert live[:token_start] == shown[:token_start]
    assert live[token_end:] == shown[token_end:]
    live_reply = msgpack.unpackb(live[4:])
    assert list(live_reply) == ["id", "code", "msg", "data"]
    assert len(live_reply["data"]["token"]) == TOKEN_LENGTH
    assert live_reply["data"]["token"] != token


async def test_the_minimal_client_runs_against_a_live_server(
    doc: list[str], harness: Harness, tmp_path: Path
) -> None:
    source = fenced_block(doc, "<!-- minimal-client -->", opening="```python")
    script = tmp_path / "client.py"
    script.write_text("\n".join(source) + "\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "127.0.0.1", str(harness.port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert "demo: hello, me" in stdout.decode().splitlines(), stdout.decode()
