"""The msgpack front-end's edge: events (chatd.model) as frames (protocol.md section 10).

:func:`frame` encodes an event once, however many msgpack connections receive it:
the frame is kept on the event (``Event.msgpack_frame``), so a channel message
costs one encoding for all its members.

The two frames made for every private message, its push and the reply to its send
(:func:`sent_reply`), are assembled from pre-encoded pieces: only the values are
packed. They are byte for byte what ``encode_frame`` makes of the same maps
(tests/test_codec.py checks it), at a third of the cost of building a map and
packing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from chatd.codec import HEADER, encode_frame
from chatd.model import (
    ChannelPost,
    Event,
    InboxMessage,
    Join,
    Leave,
    Ping,
    Presence,
    SentCopy,
)
from chatd.protocol import Data, event, format_datetime

__all__ = ["frame", "sent_reply"]


def frame(item: Event) -> bytes:
    """The event's frame, encoded on first use and shared from then on."""
    encoded = item.msgpack_frame
    if encoded is None:
        if type(item) is InboxMessage:
            # The hot one (a private message's push), assembled from pieces here, not in a
            # function of its own: {"event": "message", "data": {"id": ..., "name": ...,
            # "msg": ..., "datetime": ...}}.
            created_at = item.created_at
            datetime = _DATETIMES.get(int(created_at)) or _datetime_entry(created_at)
            name = _NAMES.get(item.sender) or _name_entry(item.sender)
            body = b"".join((_INBOX_HEAD, _pack(item.id), name, _MSG, _pack(item.body),
                             datetime))
            encoded = item.msgpack_frame = _frame_header(len(body)) + body
            return encoded
        kind = type(item)
        encode = _ENCODERS.get(kind)
        if encode is None:
            raise TypeError(f"no msgpack encoding for {kind.__name__}")
        encoded = item.msgpack_frame = encode_frame(encode(item))
    return encoded


# The keys in the order protocol.md shows them: the wire must not change.


# Each encoder builds its body itself: one is called for every message pushed.


# msgpack of the fixed parts: a fixmap's 0x80 | size, a fixstr's 0xa0 | length, then
# the string; 0x00 is the integer 0.
_INBOX_HEAD = b"\x82\xa5event\xa7message\xa4data\x84\xa2id"  # {"event": "message", "data": {"id":
_NAME, _MSG = b"\xa4name", b"\xa3msg"
_REPLY_WITH_ID = b"\x84\xa2id"  # {"id": rid, ...
_REPLY_WITHOUT_ID = b"\x83"  # {"code": ...
_SENT_MIDDLE = b"\xa4code\x00\xa3msg\xa7success\xa4data\x82\xa2id"  # "code": 0, ... "data": {"id":
_frame_header = HEADER.pack
# One packer for the pieces, shared by every thread: it only ever packs ints and strs,
# so each call runs in C under the GIL from start to end and calls cannot interleave
# (encode_frame's per-thread packer is for maps, whose packing is just as atomic, but
# a thread-local look-up per piece would cost more than the piece).
_pack = msgpack.Packer(use_bin_type=True).pack
_DATETIMES: dict[int, bytes] = {}  # the packed "datetime" entry, by second
_DATETIMES_KEPT = 64  # seconds: under load every frame of a second shares one


def _datetime_entry(timestamp: float) -> bytes:
    """``"datetime": format_datetime(timestamp)`` packed, as the last entry of a map."""
    second = int(timestamp)  # as format_datetime rounds it
    entry = _DATETIMES.get(second)
    if entry is None:
        if len(_DATETIMES) >= _DATETIMES_KEPT:
            _DATETIMES.clear()
        entry = _DATETIMES[second] = b"\xa8datetime" + _pack(format_datetime(second))
    return entry


_NAMES: dict[str, bytes] = {}  # the packed "name" entry, by sender: a few senders send a lot
_NAMES_KEPT = 4096


def _name_entry(name: str) -> bytes:
    """``"name": name`` packed, as an entry of a map."""
    if len(_NAMES) >= _NAMES_KEPT:
        _NAMES.clear()
    entry: bytes = _NAME + _pack(name)
    _NAMES[name] = entry
    return entry


def sent_reply(rid: int | None, message_id: int, created_at: float) -> bytes:
    """The reply frame to a stored send: encode_frame(success(rid, {"id": message_id,
    "datetime": format_datetime(created_at)})), from pieces (one per message sent)."""
    datetime = _DATETIMES.get(int(created_at)) or _datetime_entry(created_at)
    if rid is None:
        body = b"".join((_REPLY_WITHOUT_ID, _SENT_MIDDLE, _pack(message_id), datetime))
    else:
        body = b"".join((_REPLY_WITH_ID, _pack(rid), _SENT_MIDDLE, _pack(message_id), datetime))
    return _frame_header(len(body)) + body


def _sent_copy(item: SentCopy) -> Data:
    return event(
        "message",
        {
            "id": item.id,
            "name": item.sender,
            "msg": item.body,
            "datetime": format_datetime(item.created_at),
            "to": item.to,
        },
    )


def _channel_post(item: ChannelPost) -> Data:
    return event(
        "channel_message",
        {
            "id": item.id,
            "channel": item.channel,
            "name": item.sender,
            "msg": item.body,
            "datetime": format_datetime(item.created_at),
        },
    )


def _membership(item: Join | Leave) -> Data:
    return event(item.kind, {"channel": item.channel, "name": item.name})


def _presence(item: Presence) -> Data:
    return event("presence", {"name": item.name, "online": item.online})


def _ping(item: Ping) -> Data:
    return event("ping", {})


_ENCODERS: dict[type[Any], Callable[[Any], Data]] = {
    SentCopy: _sent_copy,
    ChannelPost: _channel_post,
    Join: _membership,
    Leave: _membership,
    Presence: _presence,
    Ping: _ping,
}
