"""Error replies say what was wrong in the client's terms, never a Python exception name.

The texts are for humans (clients must not parse them, protocol.md section 3), but a
newcomer writing a client reads them first: each is pinned here exactly.
"""

from __future__ import annotations

import re
import struct
import time
from typing import Any

import msgpack
import pytest

from chatd.codec import FrameDecoder, Malformed, Oversize, decode_body
from tests.conftest import PASSWORD, Harness
from tests.test_wire import RawPeer

# Bodies that do not decode, each with the reply text it gets.
UNDECODABLE: list[tuple[str, bytes, str]] = [
    ("empty", b"", "frame body is empty: a request is one msgpack map"),
    ("cut short", b"\x82\xa2op", "frame body ends in the middle of a msgpack value"),
    (
        "two values",
        msgpack.packb({"op": "/ping"}) + b"\x01",
        "frame body has bytes after its msgpack value: one value per frame",
    ),
    ("bad utf-8", b"\x81\xa2op\xa2\xff\xfe", "frame body has a string that is not valid UTF-8"),
    ("integer key", b"\x81\x01\x01", "frame body has a map key that is not a string"),
    ("nil key, nested", b"\x81\xa1p\x81\xc0\x01", "frame body has a map key that is not a string"),
    ("array key", b"\x81\x90\x01", "frame body has a map key that is not a string"),
    ("deep", b"\x91" * 5000 + b"\x01", "frame body is nested too deeply"),
    ("reserved byte", b"\xc1", "frame body is not valid msgpack"),
    ("bad timestamp", b"\xd5\xff\x00\x00", "frame body is not valid msgpack"),
]

# Bodies that decode but are no valid request envelope, with their reply text.
BAD_ENVELOPES: list[tuple[Any, str]] = [
    ([1, 2], "frame body must be a map, not an array"),
    ("/ping", "frame body must be a map, not a string"),
    (None, "frame body must be a map, not nil"),
    ({"id": 1}, "missing 'op': the operation, such as \"/ping\""),
    ({"op": 7}, "'op' must be a string, not an integer"),
    ({"op": b"/ping"}, "'op' must be a string, not bin (bytes)"),
    ({"op": "/ping", "id": True}, "'id' must be an integer, not a boolean"),
    ({"op": "/ping", "id": 1.5}, "'id' must be an integer, not a float"),
    ({"op": "/ping", "params": [1]}, "'params' must be a map, not an array"),
    ({"op": "/ping", "token": 12}, "'token' must be a string, not an integer"),
    ({"op": "/nope"}, "unknown op '/nope'"),
]

PYTHON_WORDING = re.compile(r"Error\b|Exception|strict_map_key|Unpack|NoneType|\bdict\b|\blist\b")


@pytest.mark.parametrize(("case", "body", "text"), UNDECODABLE, ids=[c[0] for c in UNDECODABLE])
def test_undecodable_bodies_are_explained(case: str, body: bytes, text: str) -> None:
    decoded = decode_body(body)
    assert decoded == Malformed(text)
    (fed,) = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert fed == Malformed(text), "the decoder's hot loop must say the same"


def test_an_oversized_header_says_both_sizes() -> None:
    (item,) = FrameDecoder(max_frame_size=100).feed(struct.pack(">I", 101))
    assert isinstance(item, Oversize)
    assert item.reason == "frame of 101 bytes is over the limit of 100 bytes"


async def test_framing_and_envelope_errors_over_the_socket(harness: Harness) -> None:
    peer = await RawPeer.open(harness.port)
    try:
        for _, body, _ in UNDECODABLE:
            peer.send_body(body)
        for envelope, _ in BAD_ENVELOPES:
            peer.send(envelope)
        expected = [text for _, _, text in UNDECODABLE] + [text for _, text in BAD_ENVELOPES]
        replies = [await peer.reply() for _ in expected]
    finally:
        peer.close()
    assert [reply["msg"] for reply in replies] == expected
    assert {reply["code"] for reply in replies} == {1}
    for reply in replies:
        assert not PYTHON_WORDING.search(reply["msg"]), reply


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({"id": "5"}, "parameter 'id' must be an integer, not a string"),
        ({"id": 2.0}, "parameter 'id' must be an integer, not a float"),
        ({"id": 2**63}, "parameter 'id' must be a 64-bit integer, below 2^63"),
        ({"id": -1}, "parameter 'id' must be at least 0"),
        ({}, "missing parameter 'id'"),
        ({"id": 1, "channel": ["dev"]}, "parameter 'channel' must be a string, not an array"),
        ({"id": 1, "channel": {"a": 1}}, "parameter 'channel' must be a string, not a map"),
    ],
)
async def test_parameter_errors_name_the_parameter_and_the_type_sent(
    harness: Harness, params: dict[str, Any], text: str
) -> None:
    alice = await harness.user("alice")
    assert await alice.call("/ack", params) == {"id": 3, "code": 1, "msg": text}


async def test_authentication_errors_say_what_to_do(harness: Harness) -> None:
    anonymous = await harness.connect()
    reply = await anonymous.call("/channel/list")
    assert reply["msg"] == "not logged in: send /login first, or a token with the request"
    anonymous.token = "not-a-token"
    reply = await anonymous.call("/ping")
    assert reply["msg"] == "invalid, expired or revoked token: log in again"
    anonymous.token = None
    params = {"name": "ann", "password": PASSWORD, "password_repete": PASSWORD + "!"}
    reply = await anonymous.call("/register", params)
    assert reply == {"id": 3, "code": 1, "msg": "password and password_repete differ"}


async def test_an_expired_or_revoked_binding_says_so(harness: Harness) -> None:
    alice = await harness.user("alice")
    app = harness.server.app
    # Time moves on past the token re-check (not past the token's lifetime): the gate
    # looks the token up again and finds it revoked, as by `chatd admin revoke-tokens`.
    later = time.time() + harness.config.token_recheck + 1
    user = await app.store.find_user("alice")
    assert user is not None
    await app.store.revoke_tokens(user.id)
    app.clock = lambda: later
    without_token = {"op": "/channel/list", "token": None}  # through the gate alone
    reply = await alice.exchange(without_token)
    assert reply["msg"] == "token revoked: log in again"
    await alice.login("alice", PASSWORD)
    app.clock = lambda: later + harness.config.token_ttl
    reply = await alice.exchange(without_token)
    assert reply["msg"] == "token expired: log in again"
