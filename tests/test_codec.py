"""The frame codec alone: bytes in, bodies out; no sockets, no event loop."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd import events
from chatd.codec import FrameDecoder, Malformed, Oversize, encode_frame
from chatd.errors import FrameTooLarge
from chatd.events import sent_reply
from chatd.model import InboxMessage
from chatd.protocol import event, format_datetime, success


def test_encode_is_length_prefixed_msgpack() -> None:
    frame = encode_frame({"op": "/ping", "id": 1})
    body = msgpack.packb({"op": "/ping", "id": 1})
    assert frame == struct.pack(">I", len(body)) + body
    # Byte by byte: length 14, fixmap of 2, fixstr "op", fixstr "/ping", fixstr "id", 1.
    assert frame.hex() == "0000000e" "82" "a26f70" "a52f70696e67" "a26964" "01"


def test_decoder_reassembles_frames_split_anywhere() -> None:
    bodies = [{"op": "/ping", "id": i, "params": {"x": "y" * i}} for i in range(20)]
    stream = b"".join(encode_frame(body) for body in bodies)
    for piece in (1, 2, 3, 7, 64, len(stream)):
        decoder = FrameDecoder()
        out = []
        for start in range(0, len(stream), piece):
            out.extend(decoder.feed(stream[start : start + piece]))
        assert out == bodies
        assert decoder.buffered == 0


def test_bad_body_is_malformed_and_stream_stays_in_sync() -> None:
    garbage = b"\xc1"  # a byte msgpack never uses
    stream = struct.pack(">I", 1) + garbage + encode_frame({"op": "/ping"})
    items = FrameDecoder().feed(stream)
    assert isinstance(items[0], Malformed)
    assert items[1] == {"op": "/ping"}


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # empty body
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        b"\xa3\xff\xfe\xfd",  # str with invalid UTF-8
        msgpack.packb({1: 2}),  # non-string key
        b"\x91" * 5000 + b"\x90",  # nesting deeper than msgpack allows
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
    ],
)
def test_every_undecodable_body_is_malformed(payload: bytes) -> None:
    (item,) = FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)
    assert isinstance(item, Malformed)


def test_oversize_header_is_reported_before_buffering_and_ends_the_stream() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    ok = encode_frame({"op": "/ping"})
    items = decoder.feed(ok + struct.pack(">I", 101))
    assert items[0] == {"op": "/ping"}
    assert items[1] == Oversize(101, 100)
    assert len(items) == 2
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"more")


def test_frame_at_the_limit_is_accepted() -> None:
    body = {"s": "x" * 90}
    frame = encode_frame(body)
    decoder = FrameDecoder(max_frame_size=len(frame) - 4)
    assert decoder.feed(frame) == [body]


@given(st.binary(max_size=2000), st.lists(st.integers(1, 64), max_size=50))
def test_arbitrary_bytes_never_raise_out_of_the_decoder(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=512)
    whole = FrameDecoder(max_frame_size=512).feed(data)
    pieces: list[object] = []
    offset = 0
    for cut in [*cuts, len(data)]:
        if pieces and isinstance(pieces[-1], Oversize):
            break  # the stream is over; feeding more would raise FrameTooLarge by design
        pieces.extend(decoder.feed(data[offset : offset + cut]))
        offset += cut
    assert pieces == whole


def test_a_custom_unpack_decodes_bodies_and_its_errors_make_them_malformed() -> None:
    seen: list[bytes] = []

    def unpack(body: bytes) -> object:
        seen.append(body)
        if body == msgpack.packb("bad"):
            raise ValueError("refused")
        return msgpack.unpackb(body)

    decoder = FrameDecoder(unpack=unpack)
    items = decoder.feed(encode_frame({"op": "/ping"}) + encode_frame("bad") + encode_frame(7))
    assert items[0] == {"op": "/ping"} and items[2] == 7
    assert isinstance(items[1], Malformed)
    assert seen == [msgpack.packb({"op": "/ping"}), msgpack.packb("bad"), msgpack.packb(7)]


def test_a_frame_dripped_in_byte_by_byte_comes_out_once_whole() -> None:
    frame = encode_frame({"s": "x" * 3000})
    decoder = FrameDecoder()
    for i in range(len(frame) - 1):
        assert decoder.feed(frame[i : i + 1]) == []
        assert decoder.buffered == i + 1
    assert decoder.feed(frame[-1:]) == [{"s": "x" * 3000}]
    assert decoder.buffered == 0


# The frames chatd assembles from pre-encoded pieces (chatd.events) must be the very bytes
# encode_frame makes of the maps protocol.md shows, whatever the values.
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
IDS = st.integers(min_value=1, max_value=2**63 - 1)
TIMES = st.floats(min_value=0, max_value=4_102_444_799, allow_nan=False)  # up to 2099


@given(st.none() | INT64, IDS, TIMES)
def test_a_sent_reply_is_the_success_map_encoded(rid: int | None, message_id: int,
                                                  created_at: float) -> None:
    data = {"id": message_id, "datetime": format_datetime(created_at)}
    assert sent_reply(rid, message_id, created_at) == encode_frame(success(rid, data))


@given(IDS, st.text(max_size=40), st.text(max_size=70_000), TIMES)
def test_an_inbox_push_is_the_message_event_encoded(message_id: int, sender: str, body: str,
                                                    created_at: float) -> None:
    item = InboxMessage(7, message_id, sender, body, created_at, seq=3)
    data = {"id": message_id, "name": sender, "msg": body,
            "datetime": format_datetime(created_at)}
    assert events.frame(item) == encode_frame(event("message", data))


def test_msgpacks_defaults_are_the_decoders_options() -> None:
    """FrameDecoder.feed calls unpackb without options: its defaults must be decode_body's
    (strings as str, arrays as lists, only string map keys)."""
    body = msgpack.packb({"a": ["b", b"c"]})
    assert msgpack.unpackb(body) == {"a": ["b", b"c"]}
    with pytest.raises(ValueError):
        msgpack.unpackb(msgpack.packb({1: "x"}))
    assert FrameDecoder().feed(encode_frame({1: "x"})) == [
        Malformed("frame body has a map key that is not a string")]
